"""What a method may do during training: the hooks the trainer calls, and the one context they receive."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsurgery.layers.adapted import AdaptedLinear, adapted_layers


@dataclass
class HookContext:
    """What every hook receives: the unwrapped model, the flat buffers of the trainable tensors
    (`training.flat.FlatParameters`) and the optimizer over them, the accelerator, the run's number of
    optimizer steps, the step being taken (0-based; after it, `step + 1` steps are done) and the folder of
    the artifact being trained (where a method's init may have left data: `layers.adapter_file.METHOD_FILE`).

    Through it a hook may read or zero the AdamW moments of any part of a trainable tensor and edit a
    frozen weight in place (recorded in its layer's edit log). The trainer checkpoints both, so a resumed
    run equals an uninterrupted one.
    """

    model: nn.Module
    flat: Any
    optimizer: Any
    accelerator: Any
    total_steps: int
    step: int = 0
    artifact: Path | None = None
    on_edit: Callable[[AdaptedLinear], None] | None = None  # the trainer moves each new edit to disk

    def __post_init__(self) -> None:
        self._layers = adapted_layers(self.model)  # the model's layers do not change while it trains

    def layers(self) -> dict[str, AdaptedLinear]:
        """Every adapted layer of the model, by name relative to the backbone."""
        return self._layers

    def moments(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """AdamW's first and second moments of `param` (`exp_avg`, `exp_avg_sq`) as writable views of its
        shape; empty before the first optimizer step (AdamW creates its state then)."""
        return {k: v for k, v in self.flat.state_of(param, self.optimizer).items() if k.startswith("exp_avg")}

    def zero_moments(self, param: torch.Tensor, index: Any = ...) -> None:
        """Zero the AdamW moments of `param[index]` (rows, columns or any index; all of it by default).

        AdamW keeps one step count per buffer, so a zeroed entry restarts its moments but not the bias
        correction: its next update is (1 − β1)·g / (1 − β1^t) over √((1 − β2)·g² / (1 − β2^t)), about
        (1 − β1)/√(1 − β2) times the learning rate (3.2× with β = 0.9, 0.999), not the first step's 1×."""
        for moment in self.moments(param).values():
            moment[index] = 0

    def edit_weight(self, layer: AdaptedLinear, b: torch.Tensor, a: torch.Tensor) -> None:
        """W ← W + B·A on `layer`'s frozen weight, appended to its edit log (see AdaptedLinear.add_edit)."""
        layer.add_edit(b, a)
        if self.on_edit is not None:
            self.on_edit(layer)


class TrainHooks:
    """Training-time callbacks a method may override; the defaults do nothing. Each receives the
    `HookContext` of the step.

    `setup` runs once before the first step (also on `--resume`, before `load_state_dict`). Order within
    one optimizer step: forward → `extra_loss` added → backward (every micro-batch) → `add_gradients` →
    gradient clipping → `after_backward` (on exactly the gradients the optimizer applies, identical on
    every process) → optimizer step → `after_step`. State that changes during training goes through
    `state_dict`/`load_state_dict` into checkpoints (weight edits and optimizer moments are checkpointed
    by the trainer), so a resumed run equals an uninterrupted one; `summary` goes into the run's manifest.
    """

    def setup(self, ctx: HookContext) -> None:
        """Called once before training: `ctx.step` is the step training starts from and, on `--resume`, the
        frozen weights hold the edits made before it; `load_state_dict` is called after this."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (names without dots at the start)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned."""

    def summary(self) -> dict[str, Any]:
        """JSON-able facts about the finished run, stored in the train manifest's `extra`."""
        return {}

    def files(self) -> dict[str, str]:
        """Text files (name → content) written into the finished run's artifact, e.g. a JSON record."""
        return {}

    def extra_loss(self, ctx: HookContext) -> dict[str, torch.Tensor]:
        """Named loss terms added to the task loss of every micro-batch (logged separately)."""
        return {}

    def add_gradients(self, ctx: HookContext) -> dict[str, float]:
        """Add the gradient of a penalty that depends on the parameters alone straight into their `.grad`,
        once per optimizer step, and return the penalty's value(s) to log.

        Equivalent to adding the penalty to every micro-batch's loss (divided by the accumulation steps,
        and averaged over processes, it sums to one gradient), without an autograd graph over the
        parameters. The gradients are unscaled here: lrsurgery trains in fp32 or bf16, with no loss scaling.
        """
        return {}

    def after_backward(self, ctx: HookContext) -> None:
        """Called once per optimizer step, after clipping, on the gradients that will be applied."""

    def after_step(self, ctx: HookContext) -> dict[str, Any]:
        """Called after the optimizer step; may edit the model and the optimizer state; returns values to log."""
        return {}
