"""The one place lrsurgery reaches into a library's private API: a fresh accelerate state for each run."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch


def new_accelerator(precision: str) -> Any:
    """An `accelerate.Accelerator` for one training run: on the CPU when there is no CUDA device (so
    torchrun and `accelerate launch` can start several CPU processes over gloo), bf16 autocast for
    `precision` "bf16".

    accelerate keeps one process-wide state (`AcceleratorState`, a singleton) and refuses an Accelerator
    with other settings than the first one's, so a second run in the same process (tests, a notebook, a
    comparison of methods) would fail or silently keep the first run's settings. accelerate has no public
    reset; its private `_reset_state` is called here, and nowhere else. A launch with `--use_fsdp` gets a
    plain Accelerator: the trainer shards the frozen weights itself (training/sharding.py).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if os.environ.get("ACCELERATE_USE_CPU") == "True" and "WORLD_SIZE" not in os.environ:
        print(
            "note: `accelerate launch --cpu` starts one process; for several CPU processes use "
            "`accelerate launch --multi_gpu --num_processes N` (gloo on a machine without CUDA) or torchrun",
            file=sys.stderr,
        )
    AcceleratorState._reset_state()
    # `accelerate launch --use_fsdp` asks for sharding, which the trainer does itself (training/sharding.py,
    # which reads the request): accelerate's own FSDP wrapper would also shard the adapters, and needs a GPU
    hidden = {k: os.environ.pop(k) for k in ("ACCELERATE_USE_FSDP",) if k in os.environ}
    try:
        return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if precision == "bf16" else "no")
    finally:
        os.environ.update(hidden)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory so far (`rss`, MiB) and, on CUDA, the peak allocated on `device`."""
    import resource

    peak = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB
    if device.type == "cuda":
        peak["cuda"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak
