"""The adapter file of an init or train artifact: `adapter.safetensors` (factors, gates, masks, the edit log,
a task head) beside the manifest's per-module table, written and read back with every tensor checked."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lrsurgery.errors import ArtifactError
from lrsurgery.io.artifacts import Manifest, load_tensors, read_manifest
from lrsurgery.layers.adapted import HEAD_PREFIX
from lrsurgery.layers.spec import LowRank, ModuleAdapter


def to_tensors(adapters: dict[str, ModuleAdapter]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten adapters into safetensors-ready tensors plus a JSON-able per-module description.

    Module NAME's main branch is `NAME.lora_A/B/E` and `NAME.mask`, described at the top of its entry; a
    named branch is `NAME.{branch}.lora_A/...`, described under the entry's key `{branch}`; the edit log
    is `NAME.edit.{k}.B/A`."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, spec in adapters.items():
        meta[name] = _branch_tensors(tensors, name, spec.main)
        for branch in spec.branches[1:]:
            meta[name][branch.name] = _branch_tensors(tensors, f"{name}.{branch.name}", branch)
        for k, (b, a) in enumerate(spec.edits):
            tensors[f"{name}.edit.{k}.B"] = b
            tensors[f"{name}.edit.{k}.A"] = a
        meta[name].update(edits=len(spec.edits), shape=list(spec.shape))
    return tensors, meta


def branch_entries(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A module entry's branches by name: the main one ("") and every named one (an entry with a rank)."""
    named = {k: v for k, v in info.items() if isinstance(v, dict) and "rank" in v}
    return {"": info, **named}


def _branch_tensors(tensors: dict[str, torch.Tensor], prefix: str, branch: LowRank) -> dict[str, Any]:
    tensors[f"{prefix}.lora_A"] = branch.A
    tensors[f"{prefix}.lora_B"] = branch.B
    if branch.E is not None:
        tensors[f"{prefix}.lora_E"] = branch.E
    if branch.mask is not None:
        tensors[f"{prefix}.mask"] = branch.mask
    return {
        "rank": branch.rank,
        "alpha": branch.alpha,
        "scale": branch.scale,
        "dropout": branch.dropout,
        "frozen": list(branch.frozen),
        "gated": branch.E is not None,
    }


def _branch(tensors: dict[str, torch.Tensor], prefix: str, info: Any, d_out: int, d_in: int) -> LowRank:
    """One branch's fields from its tensors, each checked against the manifest: shape, dtype, finite."""
    if not isinstance(info, dict) or not isinstance(info.get("rank"), int) or info["rank"] < 0:
        raise ValueError(f"{prefix}: the manifest's entry has no valid rank")
    r = info["rank"]
    shapes = {"lora_A": (r, d_in), "lora_B": (d_out, r), "lora_E": (r,), "mask": (r,)}
    found = {}
    for key, shape in shapes.items():
        tensor = tensors.get(f"{prefix}.{key}")
        if tensor is None:
            if key in ("lora_A", "lora_B") or (key == "lora_E" and info.get("gated")):
                raise ValueError(f"tensor {prefix}.{key} is missing")
            continue
        _check_tensor(f"{prefix}.{key}", tensor, shape)
        found[key] = tensor
    numbers = {}
    for key in ("scale", "alpha", "dropout"):
        value = info.get(key, 0.0 if key == "dropout" else None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{prefix}: the manifest's {key} is {value!r}, not a finite number")
        numbers[key] = float(value)
    return LowRank(
        A=found["lora_A"],
        B=found["lora_B"],
        E=found.get("lora_E"),
        mask=found.get("mask"),
        **numbers,
        frozen=tuple(info.get("frozen", ())),
    )


def _check_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}; the manifest says {shape}")
    if not tensor.is_floating_point():
        raise ValueError(f"tensor {name} holds {tensor.dtype} values, not floating point")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"tensor {name} holds NaN or Inf values")


def from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, ModuleAdapter]:
    """Inverse of `to_tensors`, checking every tensor against the description (ValueError naming it)."""
    out: dict[str, ModuleAdapter] = {}
    described = {k for k in tensors if k.startswith(HEAD_PREFIX)}
    for name, info in meta.items():
        described |= {k for k in tensors if k.startswith(f"{name}.")}
        shape = info.get("shape") if isinstance(info, dict) else None
        edits = info.get("edits") if isinstance(info, dict) else None
        valid = isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)
        if not valid or not isinstance(edits, int) or edits < 0:
            raise ValueError(f"module {name}: the manifest's entry has no valid shape or edit count")
        d_out, d_in = shape
        log = []
        for k in range(edits):
            b, a = tensors.get(f"{name}.edit.{k}.B"), tensors.get(f"{name}.edit.{k}.A")
            if b is None or a is None:
                raise ValueError(f"tensor {name}.edit.{k}.{'B' if b is None else 'A'} is missing")
            width = b.shape[1] if b.ndim == 2 else 0
            _check_tensor(f"{name}.edit.{k}.B", b, (d_out, width))
            _check_tensor(f"{name}.edit.{k}.A", a, (width, d_in))
            log.append((b, a))
        branches = []
        for key, entry in branch_entries(info).items():
            branch = _branch(tensors, f"{name}.{key}" if key else name, entry, d_out, d_in)
            branch.name = key
            branches.append(branch)
        out[name] = ModuleAdapter(branches, edits=log)
    extra = sorted(set(tensors) - described)
    if extra:
        raise ValueError(f"it holds tensors its manifest does not describe, e.g. {extra[0]}")
    return out


ADAPTER_FILE = "adapter.safetensors"
METHOD_FILE = "method.safetensors"  # an init artifact's per-module method data (ModuleAdapter.method_data)


ADAPTED_KINDS = ("init", "train")


def trainable_count(meta: dict[str, Any]) -> int:
    """Adapter parameters that receive gradients, from a manifest's module table."""
    total = 0
    for info in meta.values():
        d_out, d_in = info["shape"]
        for branch in branch_entries(info).values():
            r, frozen = branch["rank"], set(branch.get("frozen", ()))
            total += (0 if "A" in frozen else r * d_in) + (0 if "B" in frozen else r * d_out)
            total += r if branch.get("gated") and "E" not in frozen else 0
    return total


def read_adapters(folder: Path) -> tuple[Manifest, dict[str, ModuleAdapter], dict[str, torch.Tensor]]:
    """Read an init/train artifact: its manifest, its module adapters and any task-head tensors."""
    manifest = read_manifest(folder, ADAPTED_KINDS)
    tensors = load_tensors(Path(folder) / ADAPTER_FILE)
    try:
        adapters = from_tensors(tensors, manifest.extra["modules"])
    except ValueError as exc:
        raise ArtifactError(f"{Path(folder) / ADAPTER_FILE} does not match its manifest: {exc}") from exc
    head = {k[len(HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    return manifest, adapters, head
