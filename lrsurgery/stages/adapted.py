"""An init or train artifact applied to its base model, in memory (for train, eval and tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lrsurgery.errors import ArtifactError
from lrsurgery.hf.load import LoadedModel, load_model
from lrsurgery.hf.resolve import model_config, model_fingerprint
from lrsurgery.io.artifacts import Manifest, check_same_model
from lrsurgery.layers.adapted import head_parameters, inject
from lrsurgery.layers.adapter_file import read_adapters


def load_adapted(
    folder: Path,
    task: str | None = None,
    num_labels: int | None = None,
    model: str | None = None,
    force: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[LoadedModel, Manifest]:
    """Load the artifact's base model (or `model`) in `dtype`, check it is the right one, and apply the
    adapters (their factors cast to `dtype`, the edit log merged in fp64).

    `task` defaults to what the artifact was trained for ('causal' for an init artifact).
    """
    manifest, adapters, head = read_adapters(folder)
    head_info = manifest.extra.get("head") or {}
    task = task or head_info.get("task", "causal")
    num_labels = num_labels or head_info.get("num_labels")
    source = base_source(manifest, model)
    loaded = load_model(source, task=task, num_labels=num_labels, dtype=dtype)
    check_same_model(manifest, model_fingerprint(loaded.folder), source, force, model_config(loaded.folder))
    try:
        inject(loaded.model, adapters)
    except ValueError as exc:  # --force across architectures: fingerprints may be skipped, shapes never
        raise ArtifactError(f"the adapters of {folder} do not fit the model {source}: {exc}") from exc
    if head:
        load_head(loaded.model, head)
    if head_info.get("id2label"):
        loaded.model.config.id2label = {int(k): v for k, v in head_info["id2label"].items()}
        loaded.model.config.label2id = {v: int(k) for k, v in head_info["id2label"].items()}
    return loaded, manifest


def base_source(manifest: Manifest, model: str | None = None) -> str:
    """The base model to load for an artifact: `model` if given, else the recorded folder while it
    exists, else the recorded source (a named model re-materialises)."""
    if model:
        return model
    recorded = manifest.model.get("folder")
    if recorded and Path(recorded).is_dir():
        return recorded
    if not manifest.model.get("source"):
        raise ArtifactError("the artifact does not say which base model it was made from; pass --model")
    return manifest.model["source"]


def load_head(model: nn.Module, head: dict[str, torch.Tensor]) -> None:
    params = head_parameters(model)
    missing = sorted(set(head) - set(params))
    if missing:
        raise ArtifactError(f"artifact has task-head tensors the model lacks: {', '.join(missing)}")
    with torch.no_grad():
        for name, value in head.items():
            if params[name].shape != value.shape:
                raise ArtifactError(
                    f"head tensor {name} has shape {tuple(value.shape)}, model {tuple(params[name].shape)}"
                )
            params[name].copy_(value)
