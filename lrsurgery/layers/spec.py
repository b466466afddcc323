"""What an adapted layer is made of, as plain tensors: its low-rank branches and the edit log of its weight.

A module's adapter is a list of branches s·B·diag(E ⊙ mask)·A (the first, unnamed, is the main one; a
method may add named ones, such as the dual method's "expert") plus the *edit log*: the low-rank edits
Σ_k B_k A_k made to the frozen weight, by init (PiSSA's residual) or during training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LowRank:
    """One low-rank branch s·B·diag(E ⊙ mask)·A: A (r, d_in), B (d_out, r), gate E and mask (r,) optional.

    `name` is "" for a module's main branch; another branch is stored and named after it ("expert")."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float
    dropout: float = 0.0
    E: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    frozen: tuple[str, ...] = ()
    name: str = ""

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


MAIN_PREFIX = "lora"  # the parameter prefix of a layer's main (unnamed) branch

# the main branch's attributes a ModuleAdapter reads and writes through
MAIN_FIELDS = frozenset({"A", "B", "E", "mask", "scale", "alpha", "dropout", "frozen", "rank", "gate", "product"})


@dataclass
class ModuleAdapter:
    """Everything needed to rebuild one adapted layer: its branches (the main one first) and the edit log.

    The main branch's fields read and write through (`spec.A`, `spec.scale`, `spec.gate()`, ...)."""

    branches: list[LowRank]
    edits: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # per-module tensors a method keeps for training, outside the layer's function (SRLoRA's reserve of
    # singular directions): init writes them to the artifact's method file, hooks read them from there
    method_data: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name in MAIN_FIELDS:
            return getattr(self.branches[0], name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in MAIN_FIELDS:
            setattr(self.branches[0], name, value)
        else:
            super().__setattr__(name, value)

    def __post_init__(self) -> None:
        names = [b.name for b in self.branches]
        # a named branch's parameters are `{name}_A`, ... beside the main branch's `lora_A`, ... (layers/adapted.py)
        named = all(n.isidentifier() and n != MAIN_PREFIX for n in names[1:])
        if not names or names[0] != "" or not named or len(set(names)) != len(names):
            raise ValueError(
                f"an adapter needs one unnamed main branch first and others named by distinct identifiers "
                f"other than {MAIN_PREFIX!r}, got {names}"
            )

    @property
    def main(self) -> LowRank:
        return self.branches[0]

    def branch(self, name: str) -> LowRank | None:
        """The branch called `name`, or None."""
        return next((b for b in self.branches if b.name == name), None)

    @property
    def expert(self) -> LowRank | None:
        """The dual method's gated expert branch, if any."""
        return self.branch("expert")

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the adapted weight."""
        return self.main.B.shape[0], self.main.A.shape[1]

    def delta(self) -> torch.Tensor:
        """The dense (d_out, d_in) update Σ B_k A_k + Σ over branches s·B·diag(E ⊙ mask)·A, in fp64."""
        out = self.edit_delta()
        for branch in self.branches:
            out += branch.product()
        return out

    def edit_delta(self) -> torch.Tensor:
        """Σ B_k A_k over the edit log, in fp64 (merges round once, to the weight's dtype)."""
        out = torch.zeros(self.shape, dtype=torch.float64)
        for b, a in self.edits:
            out += b.double() @ a.double()
        return out


def low_rank_product(b: torch.Tensor, a: torch.Tensor, scale: float, gate: torch.Tensor | None) -> torch.Tensor:
    """s·B·diag(E)·A in fp64 on B's device."""
    b64 = b.detach().double()
    if gate is not None:
        b64 = b64 * gate.detach().double()
    return scale * b64 @ a.detach().double().to(b64.device)
