"""Small numerical helpers shared by the inits: finiteness checks, dtype floors, fp64 work space."""

from __future__ import annotations

import math

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or ±Inf; one reduction, far cheaper than `isfinite(t).all()`.

    A sum is non-finite exactly when an entry is, or when finite entries are so large that the sum
    overflows, which for weights, activations and their statistics means they are unusable anyway.
    """
    work = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
    return bool(torch.isfinite(work.sum()))


class Workspace:
    """fp64 scratch buffers kept between batches, one per role, grown when a batch needs more.

    Batched linear algebra over a model's modules allocates the same large stacks batch after batch;
    fresh allocations of that size are new pages from the OS, each zero-filled on first touch, which
    costs about as much as a BLAS pass over them. Reused buffers are touched once.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """An uninitialised fp64 tensor of `shape` on `device`, a view of the buffer kept for `role`."""
        size = math.prod(shape)
        buffer = self.buffers.get(role)
        if buffer is None or buffer.numel() < size or buffer.device != torch.device(device):
            self.buffers.pop(role, None)  # free the old buffer before the new one is allocated
            buffer = self.buffers[role] = torch.empty(size, dtype=torch.float64, device=device)
        return buffer[:size].view(shape)


def stack_fp64(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Same-shaped tensors as one fp64 (batch, ...) stack (into `out` if given, which may be on another
    device than the tensors), converted in a single pass."""
    if out is None:
        out = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.float64, device=tensors[0].device)
    for slot, tensor in zip(out, tensors, strict=True):
        slot.copy_(tensor)
    return out


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` upcast to fp32 when it is in a narrower float type (bf16, fp16); fp32 and fp64 as they are."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
