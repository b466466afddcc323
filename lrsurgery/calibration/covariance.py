"""Input-activation covariance of target linears: Σ xᵀx over the tokens that count, and their number.

C = XᵀX / n is formed only when read, so two artifacts of one model merge by adding sums and counts.
Linears that read the same tensor (q/k/v; gate/up) share one covariance, computed and stored once."""

from __future__ import annotations

import torch
from torch import nn

from lrsurgery.errors import UserError
from lrsurgery.linalg.basics import all_finite
from lrsurgery.linalg.gram import add_gram_upper, symmetrize_upper_


class CalibrationError(UserError, ValueError):
    """Calibration cannot run on this model or data."""


class CovarianceCollector:
    """Forward hooks on one block's target linears accumulating Σ xᵀx over non-padding tokens."""

    def __init__(self, modules: dict[str, nn.Linear], dtype: torch.dtype):
        self.modules = modules
        self.dtype = dtype
        self.upper: dict[str, torch.Tensor] = {}  # Σ xᵀx on and above the diagonal
        self.tokens = 0
        self.share: dict[str, str] = {}  # module name → the module whose covariance it shares
        self.keep: torch.Tensor | None = None
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
            if self.keep is not None:
                rows = rows[self.keep.to(rows.device)]
            rows = rows.to(self.dtype)
            if not all_finite(rows):
                raise CalibrationError(f"activations entering {name} contain NaN or Inf")
            self.upper[name] = add_gram_upper(self.upper.get(name), rows)

        return hook

    def finish(self) -> dict[str, torch.Tensor]:
        """Σ xᵀx of each covariance owner, full and symmetric (made so in place: call it once, at the end)."""
        return {name: symmetrize_upper_(upper) for name, upper in self.upper.items()}

    def start_batch(self, mask: torch.Tensor) -> None:
        mask = mask.bool().reshape(-1)
        counted = int(mask.sum())
        self.keep = None if counted == mask.numel() else mask  # no copy when every token counts
        self.tokens += counted
        self._seen = {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
