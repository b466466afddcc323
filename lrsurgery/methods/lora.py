"""LoRA (Hu et al., 2021): A Kaiming-uniform as in the reference implementation, B = 0, scale α/r."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lrsurgery.layers.spec import LowRank, ModuleAdapter
from lrsurgery.methods.base import Method


def random_a(rank: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's random A, (rank, d_in) fp32: `kaiming_uniform_(a=√5)` as the reference implementation and PEFT
    draw it, i.e. uniform on ±1/√d_in (std 1/√(3·d_in)). Every method that starts from "a LoRA A" uses this."""
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=generator) * 2 - 1) * bound


@dataclass
class LoRA(Method):
    """Plain LoRA. B = 0 leaves the model's output unchanged at init."""

    name: ClassVar[str] = "lora"

    def init_module(self, name: str, weight: torch.Tensor, generator: torch.Generator) -> ModuleAdapter:
        self.check_shape(name, weight, self.rank)
        d_out, d_in = weight.shape
        branch = LowRank(
            A=random_a(self.rank, d_in, generator),
            B=torch.zeros(d_out, self.rank),
            scale=self.alpha_value / self.rank,
            alpha=self.alpha_value,
            dropout=self.dropout,
        )
        return ModuleAdapter([branch])
