"""A new method is one definition plus one registration line, with no edit of the trainer, the CLI, the
checkpoints or the layer: here a toy method that, at one step, fuses one rank-1 pair of every adapter into
the frozen weight, re-initialises the pair and zeroes its AdamW moments; `lrsurgery train --resume` across
that step is bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from helpers import PROMPT, RESPONSE, assert_same_tensors, cli
from test_train import Interrupt

from lrsurgery.data.examples import DataSpec
from lrsurgery.io.adapter_file import ADAPTER_FILE, read_adapters
from lrsurgery.methods import HookContext, TrainHooks, register
from lrsurgery.methods.lora import LoRA
from lrsurgery.stages.init import run_init
from lrsurgery.training.schedule import TrainConfig
from lrsurgery.training.trainer import run_train


@dataclass
class Recycle(LoRA):
    """LoRA, whose pair 0 is fused into W and started afresh after optimizer step `at`."""

    name: ClassVar[str] = "recycle"
    at: int = 3

    def hooks(self) -> TrainHooks:
        return RecycleHooks(self.at)


class RecycleHooks(TrainHooks):
    def __init__(self, at: int):
        self.at = at

    @torch.no_grad()
    def after_step(self, ctx: HookContext) -> dict[str, Any]:
        if ctx.step + 1 != self.at:
            return {}
        fresh = torch.Generator().manual_seed(ctx.step)
        for layer in ctx.layers().values():
            a, b = layer.lora_A, layer.lora_B
            ctx.edit_weight(layer, layer.scale * b[:, :1].clone(), a[:1].clone())  # W ← W + s·b₀a₀
            b[:, 0] = 0  # the pair adds nothing now: the model's function is unchanged
            a[0] = (torch.rand(a.shape[1], generator=fresh) * 2 - 1) / math.sqrt(a.shape[1])
            ctx.zero_moments(a, 0)
            ctx.zero_moments(b, (slice(None), 0))
        return {"recycled": 1}


register(Recycle)  # the one line a new method adds to lrsurgery/methods/__init__.py


class MomentsSpy(TrainHooks):
    """After the method's hooks: the recycled pair's moments are zero at that step, the others are not."""

    def __init__(self, at: int):
        self.at, self.seen = at, False

    def after_step(self, ctx: HookContext) -> dict[str, Any]:
        if ctx.step + 1 == self.at:
            layer = next(iter(ctx.layers().values()))
            moments = ctx.moments(layer.lora_A)
            assert set(moments) == {"exp_avg", "exp_avg_sq"}
            assert all(bool((m[0] == 0).all()) and bool((m[1] != 0).any()) for m in moments.values())
            assert bool((ctx.moments(layer.lora_B)["exp_avg"][:, 0] == 0).all())
            self.seen = True
        return {}


SFT = ["--prompt-template", PROMPT, "--response-template", RESPONSE, "--seq-len", 48, "--batch-size", 2]


@pytest.mark.parametrize("stop_at", [3, 4], ids=["interrupted-at-the-edit", "interrupted-after-the-edit"])
def test_a_method_that_edits_weights_resumes_bit_for_bit(tiny_llama, bbc_small, tmp_path, stop_at):
    init = run_init(str(tiny_llama), "recycle", tmp_path / "init", {"rank": 2, "at": 3})
    train = ["train", init, "--data", bbc_small, *SFT, "--max-steps", 5, "--save-every", 1, "--lr", "1e-2"]
    code, out = cli(*train, "-o", tmp_path / "whole")
    assert code == 0, out
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    cfg = TrainConfig(max_steps=5, save_every=1, lr=1e-2, batch_size=2)
    spy = MomentsSpy(3)
    with pytest.raises(KeyboardInterrupt):  # stopped in step `stop_at`, before its checkpoint: at or after the edit
        run_train(init, data, cfg, tmp_path / "resumed", hooks=[spy, Interrupt(stop_at)])
    assert spy.seen
    code, out = cli(*train, "--resume", "-o", tmp_path / "resumed")
    assert code == 0, out
    assert_same_tensors(tmp_path / "whole" / ADAPTER_FILE, tmp_path / "resumed" / ADAPTER_FILE)
    losses = [
        [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("whole", "resumed")
    ]
    assert losses[0] == losses[1]
    _, adapters, _ = read_adapters(tmp_path / "whole")
    assert all(len(spec.edits) == 1 and spec.edits[0][0].abs().max() > 0 for spec in adapters.values())
