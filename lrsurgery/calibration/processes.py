"""Calibration over several processes (`torchrun` / `accelerate launch`): each process runs every N-th
micro-batch, and the sums the statistics are made of (Σ xᵀx, token and sample counts, the per-sequence
sums, the sensitivities' row and column sums) are added across the processes before the main process
writes them. The artifact equals a one-process run's up to the order of those additions.

The sums travel over gloo on the CPU whatever the compute device: they are a few matrices per block,
small beside the block's own work, and gloo runs everywhere."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from lrsurgery.calibration.covariance import CalibrationError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place among `world` calibration processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, items: list[T]) -> list[T]:
        """The micro-batches this process runs: every `world`-th, from its rank on."""
        return items[self.rank :: self.world]

    def add(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The element-wise sums over processes of each tensor in `tensors` (same names and shapes on every
        process), as new tensors on each one's device."""
        if self.world == 1:
            return tensors
        out = {}
        for name in sorted(tensors):  # one order on every process
            total = tensors[name].detach().to("cpu", copy=True)
            dist.all_reduce(total)
            out[name] = total.to(tensors[name].device)
        return out

    def sync(self) -> None:
        """Wait until every process has reached this point."""
        if self.world > 1:
            dist.barrier()

    def add_count(self, value: int) -> int:
        """The sum of an integer count over processes."""
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(total)
        return int(total.item())

    def interleave(self, parts: list[T]) -> list[T]:
        """Every process's `parts` (one per micro-batch it ran) back in the micro-batches' order."""
        if self.world == 1:
            return parts
        gathered: list[list[T] | None] = [None] * self.world
        dist.all_gather_object(gathered, parts)
        ordered: list[T] = []
        for k in range(max(len(g or []) for g in gathered)):
            ordered += [g[k] for g in gathered if g is not None and k < len(g)]
        return ordered


def current_shard(batches: int) -> Shard:
    """This process's Shard: rank and world from torchrun's / accelerate's environment (one process
    without it), the gloo process group started when there are several. Refuses more processes than
    micro-batches, since a process with none would measure nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Shard()
    if batches < world:
        raise CalibrationError(
            f"--samples / --batch-size give {batches} micro-batch(es) for {world} processes; calibrate with more "
            "samples, a smaller --batch-size, or fewer processes"
        )
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Shard(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """`device`, or with several processes on CUDA and no index given, the process's own GPU (LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
