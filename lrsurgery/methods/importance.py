"""Sensitivity × uncertainty importance of low-rank factors (DMC-LoRA Eq. 8-13, as in AdaLoRA).

Per element w with gradient g, at every update:
    S = |w · g|                      (Eq. 8)
    S̄ ← β1·S̄ + (1 − β1)·S            (Eq. 9; the paper prints (1 + β1), a misprint)
    U = |S − S̄|                      (Eq. 10, with the S̄ just updated)
    Ū ← β2·Ū + (1 − β2)·U            (Eq. 11, same misprint)
    I = S̄ · Ū                        (Eq. 12)
and the importance of rank-1 triplet i of a module (B (d_out, r), E (r,), A (r, d_in)) is
    I(E_i) + mean_j I(B_ji) + mean_j I(A_ij)       (Eq. 13).

`ImportanceEMA` keeps S̄ and Ū (fp32, or fp64 for fp64 parameters; zero at the start) for a fixed list
of parameters and updates all of them with a handful of `torch._foreach_*` calls per step;
`triplet_scores` reduces them per triplet with one batched mean per group of same-shaped factors."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from lrsurgery.linalg.basics import at_least_fp32


class ImportanceEMA:
    """EMAs S̄ and Ū of |w · ∂L/∂w| for the parameters `params` (any shapes), updated together."""

    def __init__(self, params: list[torch.Tensor], beta1: float = 0.85, beta2: float = 0.85):
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1} and {beta2}")
        self.params = list(params)
        self.beta1, self.beta2 = beta1, beta2
        self.sbar = [at_least_fp32(torch.zeros_like(p)) for p in self.params]
        self.ubar = [at_least_fp32(torch.zeros_like(p)) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the parameters' current `.grad` (a missing gradient counts as zero)."""
        weights = [at_least_fp32(p.detach()) for p in self.params]
        grads = [
            at_least_fp32(p.grad) if p.grad is not None else torch.zeros_like(w)
            for p, w in zip(self.params, weights, strict=True)
        ]
        s = torch._foreach_mul(weights, grads)
        torch._foreach_abs_(s)  # S, Eq. 8
        torch._foreach_lerp_(self.sbar, s, 1 - self.beta1)  # S̄ ← β1·S̄ + (1 − β1)·S, Eq. 9, in one pass
        torch._foreach_sub_(s, self.sbar)
        torch._foreach_abs_(s)  # U, Eq. 10
        torch._foreach_lerp_(self.ubar, s, 1 - self.beta2)  # Ū, Eq. 11

    @torch.no_grad()
    def reset(self, i: int, index: Any = ...) -> None:
        """Forget the history of `params[i][index]` (all of it by default): S̄ and Ū start again from 0."""
        self.sbar[i][index] = 0
        self.ubar[i][index] = 0

    @torch.no_grad()
    def scores(self) -> list[torch.Tensor]:
        """Per-element importance I = S̄ · Ū (Eq. 12), one tensor per parameter."""
        return torch._foreach_mul(self.sbar, self.ubar)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"sbar.{i}": t for i, t in enumerate(self.sbar)}
        out.update({f"ubar.{i}": t for i, t in enumerate(self.ubar)})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i in range(len(self.params)):
            self.sbar[i].copy_(state[f"sbar.{i}"])
            self.ubar[i].copy_(state[f"ubar.{i}"])


def _grouped_mean(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Stack-and-mean per group of same-shaped tensors; returns (len(tensors), r) in input order."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[tuple(t.shape)].append(i)
    r = tensors[0].shape[1 - dim]
    out = torch.empty(len(tensors), r, dtype=tensors[0].dtype, device=tensors[0].device)
    for idx in groups.values():
        out[idx] = torch.stack([tensors[i] for i in idx]).mean(dim=dim + 1)
    return out


def triplet_scores(
    imp_a: list[torch.Tensor], imp_b: list[torch.Tensor], imp_e: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """Eq. 13 for M modules of equal rank r: I(E_i) + mean over B's column i + mean over A's row i.

    imp_a: M tensors (r, d_in); imp_b: M tensors (d_out, r); imp_e: M tensors (r,) or None. Returns (M, r).
    """
    out = _grouped_mean(imp_a, dim=1) + _grouped_mean(imp_b, dim=0)
    if imp_e is not None:
        out += torch.stack(imp_e)
    return out
