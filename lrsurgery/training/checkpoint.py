"""Training checkpoints as safetensors + JSON (no pickle): parameters, AdamW state, RNG state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from lrsurgery.errors import ArtifactError
from lrsurgery.io.artifacts import load_tensors, save_tensors
from lrsurgery.io.outputs import swap_into, write_text_atomic
from lrsurgery.training.flat import FlatParameters, inner_optimizer

STATE_FILE = "state.safetensors"


INFO_FILE = "checkpoint.json"


def save_checkpoint(
    folder: Path,
    step: int,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    extra: dict[str, torch.Tensor] | None = None,
    flat: FlatParameters | None = None,
) -> None:
    """Write the trainable parameters, optimizer state, RNG state and `extra` tensors (e.g. method state)
    after `step` steps, atomically. With `flat` (the optimizer holds its flat buffers), each parameter's
    optimizer state is its slice of the buffers' state, so the file is the same either way."""
    tensors: dict[str, torch.Tensor] = {f"extra.{k}": v.detach() for k, v in (extra or {}).items()}
    for name, p in params.items():
        tensors[f"param.{name}"] = p.detach()
        for key, value in _state_of(p, optimizer, flat).items():
            tensors[f"optim.{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / STATE_FILE, tensors)
    write_text_atomic(tmp / INFO_FILE, json.dumps({"step": step, "params": sorted(params)}))
    swap_into(tmp, folder)


def _state_of(p: torch.Tensor, optimizer: torch.optim.Optimizer, flat: FlatParameters | None) -> dict:
    """p's optimizer state: its own entry, or its slice of its flat buffer's entry."""
    if flat is None:
        return inner_optimizer(optimizer).state.get(p, {})
    return flat.state_of(p, optimizer)  # a per-buffer scalar (AdamW's step) comes as a copy: safetensors
    # stores no two names over one storage


def load_checkpoint(
    folder: Path,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    flat: FlatParameters | None = None,
) -> int:
    """Restore parameters, optimizer and RNG state in place; return the step to continue from."""
    step, names = _info(folder)
    if sorted(params) != names:
        raise ArtifactError(f"checkpoint {folder} was written for different trainable parameters")
    tensors = load_tensors(folder / STATE_FILE)
    state = inner_optimizer(optimizer).state
    with torch.no_grad():
        for name, p in params.items():
            saved = tensors.get(f"param.{name}")
            if saved is None or saved.shape != p.shape:
                raise ArtifactError(
                    f"checkpoint {folder} does not hold {name} as trained here; start over with --overwrite"
                )
            p.copy_(saved)
            prefix = f"optim.{name}."
            entry = {k[len(prefix) :]: v.to(p.device) for k, v in tensors.items() if k.startswith(prefix)}
            if not entry:
                continue
            if flat is None:
                state[p] = entry
                continue
            whole = flat.flat_of(p)
            target = state.setdefault(whole, {})
            for key, value in entry.items():
                if value.shape == p.shape and key != "step":
                    target.setdefault(key, torch.zeros_like(whole))
                    flat.view(p, target[key]).copy_(value)
                else:  # a per-tensor scalar such as AdamW's step count, the same for every slice
                    target[key] = value.clone()
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return step


def checkpoint_step(folder: Path) -> int:
    """The number of steps the checkpoint in `folder` was saved after."""
    return _info(folder)[0]


def _info(folder: Path) -> tuple[int, list[str]]:
    """The checkpoint's step and the names of the parameters it holds."""
    try:
        info = json.loads((folder / INFO_FILE).read_text())
        return int(info["step"]), list(info["params"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"checkpoint {folder} is damaged ({exc}); start over with --overwrite") from exc


def load_checkpoint_extra(folder: Path) -> dict[str, torch.Tensor]:
    """The `extra` tensors a checkpoint was saved with."""
    tensors = load_tensors(folder / STATE_FILE)
    return {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}


def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to `step` (those after it were written after the checkpoint a resumed run
    starts from) and drop a line cut short by a crash or a full disk."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))
