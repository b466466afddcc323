"""What an adapted layer is made of, as plain tensors: low-rank branches and the edit log of a module."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LowRank:
    """One low-rank branch s·B·diag(E ⊙ mask)·A: A (r, d_in), B (d_out, r), gate E and mask (r,) optional."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float
    dropout: float = 0.0
    E: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    frozen: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def gate(self) -> torch.Tensor | None:
        """The effective (r,) gate E ⊙ mask, or None for an ungated branch."""
        if self.E is None:
            return None
        return self.E if self.mask is None else self.E * self.mask.to(self.E.dtype)

    def product(self) -> torch.Tensor:
        """The dense (d_out, d_in) s·B·diag(E ⊙ mask)·A in fp64."""
        return low_rank_product(self.B, self.A, self.scale, self.gate())


@dataclass
class ModuleAdapter(LowRank):
    """Everything needed to rebuild one adapted layer: the main branch, an optional expert branch, the edit log."""

    edits: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    expert: LowRank | None = None

    def delta(self) -> torch.Tensor:
        """The dense (d_out, d_in) update Σ B_k A_k + s·B·diag(E)·A (+ the expert branch), in fp64."""
        out = self.edit_delta() + self.product()
        if self.expert is not None:
            out += self.expert.product()
        return out

    def edit_delta(self) -> torch.Tensor:
        """Σ B_k A_k over the edit log, in fp64 (merges round once, to the weight's dtype)."""
        out = torch.zeros(self.B.shape[0], self.A.shape[1], dtype=torch.float64)
        for b, a in self.edits:
            out += b.double() @ a.double()
        return out


def low_rank_product(b: torch.Tensor, a: torch.Tensor, scale: float, gate: torch.Tensor | None) -> torch.Tensor:
    """s·B·diag(E)·A in fp64 on B's device."""
    b64 = b.detach().double()
    if gate is not None:
        b64 = b64 * gate.detach().double()
    return scale * b64 @ a.detach().double().to(b64.device)
