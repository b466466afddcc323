"""Input-activation covariance of target linears: Σ xᵀx over the tokens that count, and their number, plus
each sequence's sum of x and count of tokens.

C = XᵀX / n is formed only when read, so two artifacts of one model merge by adding sums and counts.
The per-sequence sums S_s (and counts n_s) let a reader centre each sequence on its own mean without
recalibrating: Σ_s Σ_t (x_t − x̄_s)(x_t − x̄_s)ᵀ = XᵀX − Σ_s S_s S_sᵀ / n_s (as TLoRA's released code
centres its calibration activations). Linears that read the same tensor (q/k/v; gate/up) share one
covariance, computed and stored once."""

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
        self.sequence_sums: dict[str, list[torch.Tensor]] = {}  # per micro-batch: (batch, d_in) Σ_t x_t
        self.sequence_tokens: list[torch.Tensor] = []  # per micro-batch: (batch,) tokens counted
        self.tokens = 0
        self.share: dict[str, str] = {}  # module name → the module whose covariance it shares
        self.keep: torch.Tensor | None = None
        self.batch_mask: torch.Tensor | None = None  # (batch, seq) 0/1 of the tokens that count
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
            mask = self.batch_mask.to(device=x.device, dtype=self.dtype)
            per_sequence = torch.einsum("bs,bsd->bd", mask, x.to(self.dtype)).cpu()
            self.sequence_sums.setdefault(name, []).append(per_sequence)

        return hook

    def finish(self) -> dict[str, torch.Tensor]:
        """Σ xᵀx of each covariance owner, full and symmetric (made so in place: call it once, at the end)."""
        return {name: symmetrize_upper_(upper) for name, upper in self.upper.items()}

    def sequences(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each covariance owner's per-sequence sums Σ_t x_t, (sequences, d_in), and the tokens counted in
        each sequence, (sequences,) int64, in calibration order."""
        sums = {name: torch.cat(parts) for name, parts in self.sequence_sums.items()}
        return sums, torch.cat(self.sequence_tokens) if self.sequence_tokens else torch.zeros(0, dtype=torch.int64)

    def start_batch(self, mask: torch.Tensor) -> None:
        """Begin a micro-batch whose tokens that count are the non-zero entries of `mask` (batch, seq)."""
        self.batch_mask = mask.bool()
        self.sequence_tokens.append(self.batch_mask.sum(dim=1).to(torch.int64))
        flat = self.batch_mask.reshape(-1)
        counted = int(flat.sum())
        self.keep = None if counted == flat.numel() else flat  # no copy when every token counts
        self.tokens += counted
        self._seen = {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
