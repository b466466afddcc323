"""The `init` stage and loading an artifact back onto its base model.

An init or train artifact holds `adapter.safetensors` (factors, gates, edit log, and a task head if
one was trained) and a manifest whose `extra.modules` describes each adapted module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsurgery.adapters import HEAD_PREFIX, ModuleAdapter, from_tensors, head_parameters, inject, to_tensors
from lrsurgery.artifacts import (
    ArtifactError,
    Manifest,
    check_same_model,
    load_tensors,
    read_manifest,
    save_tensors,
    write_manifest,
)
from lrsurgery.errors import SEED_MAX, check_count
from lrsurgery.linalg import all_finite
from lrsurgery.methods import MethodError, get_method
from lrsurgery.models import (
    LoadedModel,
    backbone,
    compute_device,
    empty_model,
    find_targets,
    load_model,
    model_fingerprint,
    resolve_model,
    target_weights,
)
from lrsurgery.outputs import check_output, output_folder
from lrsurgery.progress import bar as progress_bar

ADAPTER_FILE = "adapter.safetensors"
ADAPTED_KINDS = ("init", "train")


def model_record(loaded: LoadedModel) -> dict[str, Any]:
    """What a manifest says about the model an artifact was made from."""
    config = loaded.model.config
    source = Path(loaded.source)
    return {  # local paths absolute, so the artifact finds its base model from any working folder
        "source": str(source.resolve()) if source.exists() else loaded.source,
        "folder": str(Path(loaded.folder).resolve()),
        "fingerprint": model_fingerprint(loaded.folder),
        "model_type": getattr(config, "model_type", None),
        "architectures": getattr(config, "architectures", None),
    }


def run_init(
    model: str,
    method: str,
    out: Path,
    options: dict[str, Any],
    targets: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    force: bool = False,
    device: str = "cpu",
) -> Path:
    """Cut adapters out of `model` with `method` and write an init artifact to `out`; return `out`.

    The model is never built: its module tree comes from an empty (meta-device) instance and each
    target's weight is read from the safetensors files when its group is initialised, so the memory
    held is one group's weights and the adapters, not the model. The groups' linear algebra (SVDs,
    TLoRA's W·C products and Grams) runs on `device`, the eigensolves of the small Grams on the CPU
    cores (`linalg.top_eigenpairs`); random draws come from a CPU generator, so they are the same on
    every device, and the adapters are written from the CPU.
    """
    check_count("--seed", seed, 0, SEED_MAX)
    compute = compute_device(device)
    config = get_method(method, **options)
    check_output(out, overwrite=overwrite, kind="init")  # before any model is resolved or read
    folder = resolve_model(model)
    inputs = [folder, options.get("stats")]
    skeleton = empty_model(folder, buffers=False)  # names and shapes only: weights are read one target at a time
    names = find_targets(skeleton, targets)
    read = target_weights(folder, skeleton, names)
    root = backbone(skeleton)
    shapes = {name: tuple(root.get_submodule(name).weight.shape) for name in names}
    record = model_record(LoadedModel(skeleton, None, folder, str(model)))
    planned = config.prepare(shapes, record, force)
    generator = torch.Generator().manual_seed(seed)
    adapters: dict[str, ModuleAdapter] = {}
    bar = progress_bar(len(names), desc=f"init {method}", unit="module")
    for group in init_groups(shapes, config.batch_by_shape):
        adapters.update(config.init_modules({name: read(name).to(compute) for name in group}, generator))
        bar.update(len(group))
    bar.close()
    adapters = {name: adapters[name] for name in names if name in adapters}
    tensors, meta = to_tensors(adapters)
    tensors = {key: value.cpu() for key, value in tensors.items()}
    overflow = next((key for key, value in tensors.items() if not all_finite(value)), None)
    if overflow:
        raise MethodError(f"{method} init overflows fp32 in {overflow} with these options; use a smaller --alpha")
    manifest = Manifest(
        kind="init",
        config={"method": method, "options": options, "targets": targets, "seed": seed, "device": str(compute)},
        model=record,
        extra={"modules": meta, "trainable_parameters": trainable_count(meta), "method": planned},
    )
    with output_folder(out, "init", inputs, overwrite) as work:
        save_tensors(work.folder / ADAPTER_FILE, tensors)
        write_manifest(work.folder, manifest)
    return Path(out)


def init_groups(
    shapes: dict[str, tuple[int, int]], by_shape: bool, size: int = 16, budget_bytes: int = 2 << 30
) -> list[list[str]]:
    """Module names in model order, one at a time, or in chunks of same-shaped modules: up to `size`, and
    no more than fit `budget_bytes` of fp64 working memory (weight, its product with a d_in × d_in
    covariance, and the covariance: 8·(2·d_out·d_in + d_in²) bytes each), so a large model's big
    matrices go a few at a time."""
    if not by_shape:
        return [[name] for name in shapes]
    groups: dict[tuple[int, int], list[str]] = {}
    for name, shape in shapes.items():
        groups.setdefault(tuple(shape), []).append(name)
    out = []
    for (d_out, d_in), names in groups.items():
        per_module = 8 * (2 * d_out * d_in + d_in * d_in)
        step = max(1, min(size, budget_bytes // per_module))
        out += [names[i : i + step] for i in range(0, len(names), step)]
    return out


def trainable_count(meta: dict[str, Any]) -> int:
    """Adapter parameters that receive gradients, from a manifest's module table."""
    total = 0
    for info in meta.values():
        d_out, d_in = info["shape"]
        for branch in (info, info.get("expert")):
            if branch is None:
                continue
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
    check_same_model(manifest, model_fingerprint(loaded.folder), source, force)
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
