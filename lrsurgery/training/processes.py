"""What training with several processes (torchrun, `accelerate launch`) checks beyond what DDP does."""

from __future__ import annotations

from typing import Any

import torch

from lrsurgery.layers.adapted import AdaptedLinear


def weight_checksums(layers: dict[str, AdaptedLinear]) -> torch.Tensor:
    """Two fp64 checksums of each layer's frozen weight (its sum and a position-weighted sum): shape (2·layers,)."""
    sums = []
    for layer in layers.values():
        w = layer.base.weight.detach().double().flatten()
        ramp = torch.linspace(1.0, 2.0, w.numel(), dtype=torch.float64, device=w.device)
        sums += [w.sum(), (w * ramp).sum()]
    return torch.stack(sums)


def check_same_frozen_weights(accelerator: Any, layers: dict[str, AdaptedLinear], step: int) -> None:
    """Raise RuntimeError unless every process holds the same frozen weights in `layers` after `step`.

    A hook that edits frozen weights (SRLoRA's switch) computes its edits on every process from the same
    synchronised gradients and adapter values, so the processes must agree bit for bit; a difference is a
    bug, stopped here before the processes go on training different models."""
    every = accelerator.gather(weight_checksums(layers).unsqueeze(0))  # (processes, 2·layers)
    names = list(layers)
    differ = sorted({names[i // 2] for i in range(every.shape[1]) if not bool((every[:, i] == every[0, i]).all())})
    if differ:
        where = ", ".join(differ[:3])
        raise RuntimeError(f"after step {step + 1} the processes hold different frozen weights in {where}")
