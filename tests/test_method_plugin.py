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
from lrsurgery.layers.adapter_file import ADAPTER_FILE, read_adapters
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


class WeightsSpy(TrainHooks):
    """Keeps the step and one layer's frozen weight its `setup` sees, and that weight after optimizer step `at`."""

    def __init__(self, at: int = 0):
        self.at, self.after = at, None

    def setup(self, ctx: HookContext) -> None:
        self.step, self.weight = ctx.step, _first_weight(ctx)

    def after_step(self, ctx: HookContext) -> dict[str, Any]:
        if ctx.step + 1 == self.at:
            self.after = _first_weight(ctx)
        return {}


def _first_weight(ctx: HookContext) -> torch.Tensor:
    return next(iter(ctx.layers().values())).base.weight.detach().clone()


def test_setup_on_resume_sees_the_step_and_the_edits_it_continues_from(tiny_llama, bbc_small, tmp_path):
    init = run_init(str(tiny_llama), "recycle", tmp_path / "init", {"rank": 2, "at": 2})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    cfg = TrainConfig(max_steps=4, save_every=1, lr=1e-2, batch_size=2)
    whole = WeightsSpy(at=2)  # the weight after step 2, the recycling edit included
    run_train(init, data, cfg, tmp_path / "whole", hooks=[whole])
    with pytest.raises(KeyboardInterrupt):  # in step 3: the last checkpoint is after step 2
        run_train(init, data, cfg, tmp_path / "resumed", hooks=[Interrupt(3)])
    resumed = WeightsSpy()
    run_train(init, data, cfg, tmp_path / "resumed", resume=True, hooks=[resumed])
    assert (whole.step, resumed.step) == (0, 2)
    assert not torch.equal(whole.weight, whole.after)  # the edit changed the weight
    assert torch.equal(resumed.weight, whole.after)


def test_an_edit_changes_the_weight_by_what_its_log_records(tiny_llama):
    from lrsurgery.hf.load import load_model
    from lrsurgery.layers.adapted import AdaptedLinear
    from lrsurgery.layers.spec import LowRank, ModuleAdapter

    base = load_model(tiny_llama).model.model.layers[0].self_attn.q_proj
    d_out, d_in = base.weight.shape
    layer = AdaptedLinear(base, ModuleAdapter([LowRank(torch.zeros(1, d_in), torch.zeros(d_out, 1), 1.0, 1.0, 0.0)]))
    before = layer.base.weight.detach().clone()
    b, a = torch.randn(d_out, 2, dtype=torch.float64) / 3, torch.randn(2, d_in, dtype=torch.float64) / 3
    layer.add_edit(b, a)  # fp64 factors: the log keeps them in fp32, and the weight moves by those
    logged_b, logged_a = layer.edits[-1]
    assert logged_b.dtype == logged_a.dtype == torch.float32
    assert not torch.equal(logged_b.double(), b)  # the rounding this test is about happens
    expected = (before.double() + logged_b.double() @ logged_a.double()).float()
    assert torch.equal(layer.base.weight, expected)
