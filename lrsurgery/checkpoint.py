"""Training checkpoints as safetensors + JSON (no pickle): parameters, AdamW state, RNG state."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from lrsurgery.artifacts import ArtifactError, load_tensors, save_tensors

STATE_FILE = "state.safetensors"
INFO_FILE = "checkpoint.json"


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


def save_checkpoint(
    folder: Path,
    step: int,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the trainable parameters, optimizer state, RNG state and `extra` tensors (e.g. method state)
    after `step` steps, atomically."""
    tensors: dict[str, torch.Tensor] = {f"extra.{k}": v.detach() for k, v in (extra or {}).items()}
    state = _inner(optimizer).state
    for name, p in params.items():
        tensors[f"param.{name}"] = p.detach()
        for key, value in state.get(p, {}).items():
            tensors[f"optim.{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / STATE_FILE, tensors)
    (tmp / INFO_FILE).write_text(json.dumps({"step": step, "params": sorted(params)}))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Restore parameters, optimizer and RNG state in place; return the step to continue from."""
    info = json.loads((folder / INFO_FILE).read_text())
    if sorted(params) != info["params"]:
        raise ArtifactError(f"checkpoint {folder} was written for different trainable parameters")
    tensors = load_tensors(folder / STATE_FILE)
    state = _inner(optimizer).state
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
            prefix = f"optim.{name}."
            entry = {k[len(prefix) :]: v.to(p.device) for k, v in tensors.items() if k.startswith(prefix)}
            if entry:
                state[p] = entry
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(info["step"])


def load_checkpoint_extra(folder: Path) -> dict[str, torch.Tensor]:
    """The `extra` tensors a checkpoint was saved with."""
    tensors = load_tensors(folder / STATE_FILE)
    return {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
