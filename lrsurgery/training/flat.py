"""Trainable parameters in one contiguous buffer, their gradients in another.

An adapted model has a few hundred to a few thousand small trainable tensors (the dual method: five per
layer). Every per-step pass over them (zeroing, clipping's norm, the optimizer, importance EMAs) then
pays a per-tensor cost that dwarfs the arithmetic. `FlatParameters` moves each parameter's data into a
slice of one buffer per (device, dtype) and makes its `.grad` the matching slice of a gradient buffer,
so those passes see one tensor each:

- autograd accumulates each parameter's gradient into its slice in place (a defined `.grad` is added
  to, never replaced, when backward runs without `create_graph`);
- `flats` are leaf parameters over the whole buffers, with the gradient buffers as their `.grad`: give
  them to the optimizer and to gradient clipping;
- `zero_grad` zeroes the gradient buffers. Setting a parameter's `.grad` to None (as
  `Optimizer.zero_grad(set_to_none=True)` or `Module.zero_grad()` do) would cut it loose from the
  buffer; `check` finds that and raises, rather than letting the optimizer read a stale buffer.

The parameters keep their identity, names, shapes and values; only their storage moves."""

from __future__ import annotations

import torch
from torch import nn


class FlatParameters:
    """See the module docstring. `params` must be leaf tensors that require grad."""

    def __init__(self, params: list[torch.Tensor]):
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:
            groups.setdefault((p.device, p.dtype), []).append(p)
        self.params = list(params)
        self.flats: list[nn.Parameter] = []
        self.slices: dict[int, tuple[int, int, int]] = {}  # id(param) -> (flat index, start, numel)
        with torch.no_grad():
            for (device, dtype), members in groups.items():
                total = sum(p.numel() for p in members)
                data = torch.empty(total, device=device, dtype=dtype)
                grad = torch.zeros(total, device=device, dtype=dtype)
                start = 0
                for p in members:
                    n = p.numel()
                    data[start : start + n].copy_(p.detach().reshape(-1))
                    p.data = data[start : start + n].view_as(p)
                    p.grad = grad[start : start + n].view_as(p)
                    self.slices[id(p)] = (len(self.flats), start, n)
                    start += n
                flat = nn.Parameter(data)
                flat.grad = grad
                self.flats.append(flat)

    def zero_grad(self) -> None:
        for flat in self.flats:
            flat.grad.zero_()

    def check(self) -> None:
        """Raise if a parameter's data or `.grad` is no longer its slice of the buffers."""
        for p in self.params:
            index, start, _ = self.slices[id(p)]
            flat = self.flats[index]
            offset = start * flat.element_size()
            if (
                p.data_ptr() != flat.data_ptr() + offset
                or p.grad is None
                or p.grad.data_ptr() != flat.grad.data_ptr() + offset
            ):
                raise RuntimeError(
                    "a trainable parameter's data or .grad was replaced (e.g. by zero_grad(set_to_none=True)); "
                    "with flat parameters, zero gradients with FlatParameters.zero_grad()"
                )

    def view(self, p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        """The slice of `whole` (a tensor shaped like p's flat buffer, e.g. optimizer state) that belongs to p."""
        _, start, n = self.slices[id(p)]
        return whole[start : start + n].view_as(p)

    def flat_of(self, p: torch.Tensor) -> nn.Parameter:
        return self.flats[self.slices[id(p)][0]]

    def state_of(self, p: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """p's optimizer state: the p-shaped slice (a view) of each per-element state tensor of its buffer
        (AdamW's exp_avg, exp_avg_sq) and a copy of each per-buffer scalar (AdamW's step)."""
        whole = inner_optimizer(optimizer).state.get(self.flat_of(p), {})
        shape = self.flat_of(p).shape
        return {k: self.view(p, v) if v.shape == shape else v.clone() for k, v in whole.items() if torch.is_tensor(v)}


def inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer itself, inside accelerate's wrapper if there is one."""
    return getattr(optimizer, "optimizer", optimizer)
