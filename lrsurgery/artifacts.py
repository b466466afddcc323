"""Artifacts: a folder holding `manifest.json` plus safetensors files, written atomically.

Every stage reads the previous stage's artifact and writes its own. The manifest records the kind of
artifact, the format version, the lrsurgery version, the full configuration used, and the fingerprints
of the model and data it came from. Nothing is ever pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lrsurgery import __version__

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(Exception):
    """An artifact is missing, corrupt, of the wrong kind, or made for another model."""


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
        manifest = Manifest(**raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ArtifactError(f"{path} is corrupt: {exc}") from exc
    if manifest.format_version > FORMAT_VERSION:
        raise ArtifactError(
            f"{folder} uses artifact format {manifest.format_version}; this lrsurgery reads up to {FORMAT_VERSION}"
        )
    if expect_kind is not None:
        kinds = (expect_kind,) if isinstance(expect_kind, str) else expect_kind
        if manifest.kind not in kinds:
            raise ArtifactError(
                f"{folder} is a '{manifest.kind}' artifact; this stage needs one of: {', '.join(kinds)}"
            )
    return manifest


def check_same_model(manifest: Manifest, fingerprint: str, source: str, force: bool = False) -> None:
    """Refuse an artifact made for a model other than the one with `fingerprint`, unless forced."""
    expected = manifest.model.get("fingerprint")
    if expected and expected != fingerprint and not force:
        raise ArtifactError(
            f"this {manifest.kind} artifact was made for model {manifest.model.get('source')!r} "
            f"(fingerprint {expected[:12]}), but {source!r} has fingerprint {fingerprint[:12]}. "
            "Use the model the artifact was made from, or pass --force to override."
        )


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success rename it to `out`, on failure delete it.

    The output path therefore either holds a complete artifact or nothing new. With `overwrite`, an
    existing folder at `out` is replaced only after the new one is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another output or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_text_atomic(folder / MANIFEST, manifest.to_json())


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block completes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        tmp.chmod(0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file atomically (contiguous CPU copies)."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


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


def fingerprint_tensors(tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> str:
    """Exact sha256 over a collection of tensors (used for data and adapter fingerprints)."""
    digest = hashlib.sha256()
    items = sorted(tensors.items()) if isinstance(tensors, dict) else enumerate(tensors)
    for key, value in items:
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
