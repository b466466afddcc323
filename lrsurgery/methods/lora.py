"""LoRA (Hu et al., 2021): A Kaiming-uniform as in the reference implementation, B = 0, scale α/r."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lrsurgery.layers.spec import LowRank, ModuleAdapter
from lrsurgery.methods.base import Method


@dataclass
class LoRA(Method):
    """Plain LoRA. B = 0 leaves the model's output unchanged at init."""

    name: ClassVar[str] = "lora"

    def init_module(self, name: str, weight: torch.Tensor, generator: torch.Generator) -> ModuleAdapter:
        self.check_shape(name, weight, self.rank)
        d_out, d_in = weight.shape
        # kaiming_uniform_(a=sqrt(5)) on an (r, d_in) matrix: bound = 1/sqrt(d_in)
        bound = 1.0 / math.sqrt(d_in)
        a = (torch.rand(self.rank, d_in, generator=generator) * 2 - 1) * bound
        branch = LowRank(
            A=a,
            B=torch.zeros(d_out, self.rank),
            scale=self.alpha_value / self.rank,
            alpha=self.alpha_value,
            dropout=self.dropout,
        )
        return ModuleAdapter([branch])
