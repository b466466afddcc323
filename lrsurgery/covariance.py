"""Input-activation covariance of target linears: Σ xᵀx over the tokens that count, and their number.

C = XᵀX / n is formed only when read, so two artifacts of one model merge by adding sums and counts.
Linears that read the same tensor (q/k/v; gate/up) share one covariance, computed and stored once.
"""

from __future__ import annotations

import torch
from torch import nn


class CalibrationError(ValueError):
    """Calibration cannot run on this model or data."""


class CovarianceCollector:
    """Forward hooks on one block's target linears accumulating Σ xᵀx over non-padding tokens."""

    def __init__(self, modules: dict[str, nn.Linear], dtype: torch.dtype):
        self.modules = modules
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.share: dict[str, str] = {}  # module name → the module whose covariance it shares
        self.mask: torch.Tensor | None = None
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            # the same tensor object feeds q/k/v (gate/up); holding it for the batch keeps its address
            # from being reused by a later, different tensor
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            owner, _ = self._seen.setdefault(key, (name, x))
            if name not in self.share:
                self.share[name] = owner
            if owner != name:
                return
            rows = x.reshape(-1, x.shape[-1])
            if self.mask is not None:
                rows = rows[self.mask.reshape(-1).to(rows.device)]
            rows = rows.to(self.dtype)
            if not torch.isfinite(rows).all():
                raise CalibrationError(f"activations entering {name} contain NaN or Inf")
            if name in self.sums:
                self.sums[name].addmm_(rows.T, rows)
            else:
                self.sums[name] = rows.T @ rows

        return hook

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()
        self.tokens += int(self.mask.sum())
        self._seen = {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
