"""PiSSA (Meng et al., 2024): the adapter starts as the top-r singular part of W.

With W ≈ U S Vᵀ and scale s = α/r:  B = U_r √(S_r/s),  A = √(S_r/s) V_rᵀ, so s·B·A = U_r S_r V_rᵀ,
and the frozen weight becomes the residual W_res = W − s·B·A, recorded as the low-rank edit
(−s·B, A) rather than a dense matrix. Output is unchanged at init up to fp32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lrsurgery.config import option
from lrsurgery.errors import check_choice, check_count
from lrsurgery.layers.spec import LowRank, ModuleAdapter
from lrsurgery.linalg.svd import truncated_svd
from lrsurgery.methods.base import Method, MethodError


@dataclass
class PiSSA(Method):
    """PiSSA with an exact or randomized SVD (`svd`: exact | randomized)."""

    name: ClassVar[str] = "pissa"
    svd: str = option("exact", "SVD of the weights: exact, or randomized (Halko et al. 2011).")
    oversample: int = option(10, "Randomized SVD: extra columns of the range finder.")
    power_iters: int = option(2, "Randomized SVD: power iterations.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("--svd", self.svd, ("exact", "randomized"), error=MethodError)
        check_count("--oversample", self.oversample, 0, error=MethodError)
        check_count("--power-iters", self.power_iters, 0, error=MethodError)

    def principal_factors(
        self, weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (d_out, rank), A (rank, d_in)) with s·B·A = the top-`rank` SVD part of `weight`."""
        u, s, vh = truncated_svd(weight, rank, self.svd, self.oversample, self.power_iters, generator)
        root = torch.sqrt(s / scale)
        return u * root, root[:, None] * vh

    def init_module(self, name: str, weight: torch.Tensor, generator: torch.Generator) -> ModuleAdapter:
        self.check_shape(name, weight, self.rank)
        scale = self.alpha_value / self.rank
        b, a = self.principal_factors(weight, self.rank, scale, generator)
        branch = LowRank(A=a, B=b, scale=scale, alpha=self.alpha_value, dropout=self.dropout)
        return ModuleAdapter([branch], edits=[(-scale * b, a)])
