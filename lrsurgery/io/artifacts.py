"""Artifacts: a folder holding `manifest.json` plus safetensors files, written atomically.

Every stage reads the previous stage's artifact and writes its own. The manifest records the kind of
artifact, the format version, the lrsurgery version, the full configuration used, and the fingerprints
of the model and data it came from. Nothing is ever pickled."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from lrsurgery import __version__
from lrsurgery.errors import ArtifactError
from lrsurgery.io.outputs import write_bytes_atomic, write_text_atomic

__all__ = ["ArtifactError", "Manifest", "read_manifest", "write_manifest", "save_tensors", "load_tensors"]


FORMAT_VERSION = 1


MANIFEST = "manifest.json"


BASE_SCHEMA: dict[str, type] = {"kind": str, "config": dict, "model": dict, "extra": dict, "format_version": int}


# what each kind of artifact must hold, by dotted path, for the stages that read it
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "init": {
        "config.method": str,
        "config.options": dict,
        "model.fingerprint": str,
        "model.source": str,
        "extra.modules": dict,
    },
    "train": {
        "config.method": str,
        "config.options": dict,
        "model.fingerprint": str,
        "model.source": str,
        "extra.modules": dict,
    },
    "stats": {
        "config.collect": list,
        "config.dtype": str,
        "model.fingerprint": str,
        "data": dict,
        "extra.modules": dict,
        "extra.blocks": int,
        "extra.completed": int,
        "extra.tokens": int,
    },
}


@dataclass
class Manifest:
    """What an artifact is and where it came from."""

    kind: str
    config: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    parent: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    lrsurgery_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True, default=str)


def read_manifest(folder: str | Path, expect_kind: str | tuple[str, ...] | None = None) -> Manifest:
    """Read and validate `folder/manifest.json`; raise ArtifactError naming the problem."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not an lrsurgery artifact folder (it does not exist)")
    if not path.is_file():
        raise ArtifactError(f"{folder} is not an lrsurgery artifact (no {MANIFEST})")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is corrupt: {exc}") from exc
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path} is corrupt: it is not a JSON object")
    version = raw.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ArtifactError(f"{folder} uses artifact format {version}; this lrsurgery reads up to {FORMAT_VERSION}")
    unknown = sorted(set(raw) - set(Manifest.__dataclass_fields__))
    if unknown:
        raise ArtifactError(f"{path} is corrupt: unknown field(s) {', '.join(unknown)}")
    manifest = Manifest(**raw)
    _check_schema(manifest, path, BASE_SCHEMA)
    if expect_kind is not None:
        kinds = (expect_kind,) if isinstance(expect_kind, str) else expect_kind
        if manifest.kind not in kinds:
            raise ArtifactError(
                f"{folder} is a '{manifest.kind}' artifact; this stage needs one of: {', '.join(kinds)}"
            )
    _check_schema(manifest, path, SCHEMA.get(manifest.kind, {}))
    return manifest


def _check_schema(manifest: Manifest, path: Path, required: dict[str, Any]) -> None:
    """Refuse a manifest whose fields in `required` (dotted path → type) are missing or of the wrong type."""
    for dotted, kind in required.items():
        value: Any = manifest.__dict__
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            raise ArtifactError(f"{path} is corrupt: '{dotted}' is missing or of the wrong type")


def check_same_model(
    manifest: Manifest, fingerprint: str, source: str, force: bool = False, config: dict | None = None
) -> None:
    """Refuse an artifact made for a model other than the one whose weights have `fingerprint`, or whose
    config (`config`, when known) gives another value to a field the recorded config has, unless forced.
    Fields only one of them has are not compared: newer transformers versions add some when saving."""
    expected = manifest.model.get("fingerprint")
    if expected and expected != fingerprint and not force:
        raise ArtifactError(
            f"this {manifest.kind} artifact was made for model {manifest.model.get('source')!r} "
            f"(fingerprint {expected[:12]}), but {source!r} has fingerprint {fingerprint[:12]}. "
            "Use the model the artifact was made from, or pass --force to override."
        )
    recorded = manifest.model.get("config")
    if isinstance(recorded, dict) and config and not force:
        changed = sorted(k for k in recorded.keys() & config.keys() if recorded[k] != config[k])
        if changed:
            raise ArtifactError(
                f"the config.json of {source!r} differs from the one this {manifest.kind} artifact was made with "
                f"({', '.join(changed[:5])}): restore it, or pass --force to override"
            )


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write `folder/manifest.json` atomically."""
    write_text_atomic(folder / MANIFEST, manifest.to_json())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file atomically (contiguous CPU copies).

    The bytes are written by Python's file I/O, so a full disk is an OSError (ENOSPC) like any other. Tensors
    that share memory (an adapter's A that is also its first edit's A) are written as copies, as safetensors
    stores no shared memory."""
    seen: set[int] = set()
    prepared = {}
    for name, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        key = value.untyped_storage().data_ptr()
        prepared[name] = value.clone() if key in seen and value.numel() else value
        seen.add(key)
    data = serialize(prepared, metadata=metadata)
    write_bytes_atomic(path, data)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a corrupt or missing file into an ArtifactError."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several error types for damaged files
        raise ArtifactError(f"{path} is corrupt or not a safetensors file: {exc}") from exc


def fingerprint_weights(files: list[Path], rows_per_tensor: int = 8) -> str:
    """A cheap content fingerprint of a model's safetensors weights; returns a sha256 hex string.

    Hashes every tensor's name, dtype and shape plus a few evenly spaced rows of its values, read
    lazily, so two different models (or two weight files of one architecture) get different
    fingerprints without reading whole files. Independent of how the tensors are split into shards.
    """
    entries: list[tuple[str, str, tuple[int, ...], bytes]] = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                sl = handle.get_slice(name)
                shape = tuple(sl.get_shape())
                if len(shape) < 2 or shape[0] <= rows_per_tensor:
                    values = handle.get_tensor(name)
                else:
                    picks = torch.linspace(0, shape[0] - 1, rows_per_tensor).long().tolist()
                    values = torch.cat([sl[i : i + 1] for i in picks])
                entries.append((name, str(sl.get_dtype()), shape, values.float().numpy().tobytes()))
    digest = hashlib.sha256()
    for name, dtype, shape, values in sorted(entries):
        digest.update(f"{name}|{dtype}|{shape}|".encode())
        digest.update(values)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks (as fast as larger ones, and no large buffer)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_tensors(tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> str:
    """Exact sha256 over a collection of tensors (used for data and adapter fingerprints)."""
    digest = hashlib.sha256()
    items = sorted(tensors.items()) if isinstance(tensors, dict) else enumerate(tensors)
    for key, value in items:
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
