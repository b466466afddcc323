"""The `init` stage: cut adapters out of a model's weights and write an init artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lrsurgery.errors import SEED_MAX, check_count
from lrsurgery.hf.load import LoadedModel, compute_device, empty_model, model_record
from lrsurgery.hf.resolve import resolve_model
from lrsurgery.hf.tree import backbone, find_targets, target_weights
from lrsurgery.io.artifacts import Manifest, file_digest, save_tensors, write_manifest
from lrsurgery.io.memory import available_memory, return_freed_memory
from lrsurgery.io.outputs import check_output, output_folder
from lrsurgery.layers.adapter_file import ADAPTER_FILE, METHOD_FILE, to_tensors, trainable_count
from lrsurgery.layers.spec import ModuleAdapter
from lrsurgery.linalg.basics import all_finite
from lrsurgery.methods import MethodError, get_method
from lrsurgery.progress import bar as progress_bar

WORKSPACE_BYTES = 2 << 30  # a group's fp64 working memory where the machine has room (init_groups)


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
    preset: str | None = None,
) -> Path:
    """Cut adapters out of `model` with `method` and write an init artifact to `out`; return `out`.
    `preset`, the `--preset` name the settings came from, is recorded in the manifest's config.

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
    for group in init_groups(shapes, config.batch_by_shape, budget_bytes=workspace_budget(compute)):
        adapters.update(config.init_modules({name: read(name).to(compute) for name in group}, generator))
        return_freed_memory()  # else glibc's heap, fragmented by the adapters kept between the freed weights, grows
        bar.update(len(group))
    bar.close()
    adapters = {name: adapters[name] for name in names if name in adapters}
    tensors, meta = to_tensors(adapters)
    tensors = {key: value.cpu() for key, value in tensors.items()}
    method_data = {f"{n}.{k}": t.cpu() for n, spec in adapters.items() for k, t in spec.method_data.items()}
    overflow = next((key for key, value in tensors.items() if not all_finite(value)), None)
    if overflow:
        raise MethodError(f"{method} init overflows fp32 in {overflow} with these options; use a smaller --alpha")
    manifest = Manifest(
        kind="init",
        config={
            "method": method,
            "options": config.options(),  # every option's value as used, defaults resolved
            "targets": targets,
            "seed": seed,
            "device": str(compute),
            "stats_fingerprint": planned.pop("stats_fingerprint", None),  # the calibration a data-driven init read
            **({"preset": preset} if preset else {}),
        },
        model=record,
        extra={"modules": meta, "trainable_parameters": trainable_count(meta), "method": planned},
    )
    with output_folder(out, "init", inputs, overwrite) as work:
        save_tensors(work.folder / ADAPTER_FILE, tensors)
        if method_data:  # read back by the method's training hooks, checked against this digest
            save_tensors(work.folder / METHOD_FILE, method_data)
            manifest.extra["method_file"] = {"file": METHOD_FILE, "sha256": file_digest(work.folder / METHOD_FILE)}
        write_manifest(work.folder, manifest)
    return Path(out)


def workspace_budget(device: torch.device) -> int:
    """Bytes of fp64 working memory a group of modules may take on `device`: 2 GiB, or a third of what the
    machine (or the process's memory cgroup) has left, if that is less."""
    available = available_memory(device)
    return WORKSPACE_BYTES if available is None else min(WORKSPACE_BYTES, available // 3)


def init_groups(
    shapes: dict[str, tuple[int, int]], by_shape: bool, size: int = 16, budget_bytes: int = WORKSPACE_BYTES
) -> list[list[str]]:
    """Module names in model order, one at a time, or in chunks of same-shaped modules: up to `size`, and
    no more than fit `budget_bytes` of fp64 working memory (weight, its product with a d_in × d_in
    covariance, and the covariance: 8·(2·d_out·d_in + d_in²) bytes each), so a large model's big
    matrices go a few at a time (one at a time if even one does not fit)."""
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
