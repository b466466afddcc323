"""SRLoRA: a switch leaves the model's function unchanged and refills pairs with W0's next singular
directions; the importance and moment rules hold; the reserve runs out cleanly; --resume across a switch
is bit-identical; fuse and the PEFT export reproduce the model after several switches; bad options are
refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import FP32_UNIT, PROMPT, RESPONSE, assert_same_function, assert_same_tensors, cli, outputs
from hostile import refused
from test_train import Interrupt

from lrsurgery.data.examples import DataSpec
from lrsurgery.hf.load import load_model
from lrsurgery.hf.tree import backbone
from lrsurgery.io.shards import LazyWeights
from lrsurgery.layers.adapted import adapted_layers
from lrsurgery.layers.adapter_file import ADAPTER_FILE, METHOD_FILE, read_adapters
from lrsurgery.methods import HookContext, TrainHooks, get_method
from lrsurgery.methods.srlora import INTERVALS_FILE, SRLoRA, SRLoRAHooks
from lrsurgery.stages.adapted import load_adapted
from lrsurgery.stages.init import run_init
from lrsurgery.training.flat import FlatParameters
from lrsurgery.training.schedule import TrainConfig, adamw
from lrsurgery.training.trainer import run_train

SFT = ["--prompt-template", PROMPT, "--response-template", RESPONSE, "--seq-len", 48, "--batch-size", 2]


def _data(path) -> DataSpec:
    return DataSpec(path=str(path), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)


def _init(model, tmp_path, **options):
    return run_init(str(model), "srlora", tmp_path / "init", {"rank": 2, "r_target": 6, **options})


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- one switch, by hand: the function is unchanged ---------------------------------------------------------


def _switched_outputs(artifact, dtype: torch.dtype, switches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The adapted model's outputs before and after each of `switches` switches in a row, run by the method's
    hooks on a model held in `dtype`. Before each, the adapters move as training would move them (to the
    same fp32 numbers in either dtype) and a backward pass feeds the importance."""
    loaded, manifest = load_adapted(artifact, dtype=dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    layers = adapted_layers(model)
    method = get_method("srlora", **{**manifest.config["options"], "switch_interval": 1})
    flat = FlatParameters([p for p in model.parameters() if p.requires_grad])
    ctx = HookContext(model, flat, adamw(flat.flats, lr=1e-3), None, total_steps=switches + 1, artifact=artifact)
    hooks = method.hooks()
    hooks.setup(ctx)
    batch = tokenizer(["The striker scored twice in the second half."], return_tensors="pt")
    noise = torch.Generator().manual_seed(0)
    seen = []
    for k in range(switches):
        with torch.no_grad():
            for layer in layers.values():
                for p in (layer.lora_A, layer.lora_B):
                    step = torch.randn(p.shape, generator=noise) * p.float().abs().mean()
                    p.copy_(p.float() + step)  # fp32 numbers, held exactly in fp64 too
        flat.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        hooks.after_backward(ctx)
        before = outputs(model, tokenizer)
        ctx.step = k
        assert hooks.after_step(ctx)["srlora_switch"] == method.recycled
        assert all(len(layer.edits) == 2 + k for layer in layers.values())
        seen.append((before, outputs(model, tokenizer)))
    return seen


def _assert_switches_keep_the_function(artifact, switches: int) -> None:
    seen32 = _switched_outputs(artifact, torch.float32, switches)
    seen64 = _switched_outputs(artifact, torch.float64, switches)
    for k, ((before32, after32), (before64, after64)) in enumerate(zip(seen32, seen64, strict=True)):
        # exact in fp64 (the fused pairs and the refills are fp32 numbers and s = α/r = 1, so the logged edit
        # is exactly the branch's change); in fp32 within the two models' own rounding
        assert_same_function(after32, after64, before32, before64, f"outputs across switch {k + 1}")


def test_switches_leave_the_function_unchanged(tiny_llama, tmp_path):
    _assert_switches_keep_the_function(_init(tiny_llama, tmp_path), switches=4)


@pytest.mark.slow
def test_switches_leave_smollm2_unchanged(smollm2, tmp_path):
    init = run_init(str(smollm2), "srlora", tmp_path / "init", {"rank": 4, "r_target": 10})
    _assert_switches_keep_the_function(init, switches=3)


# -- switches inside `lrsurgery train`: refills, importance and moment rules --------------------------------


class Watch:
    """Wraps the method's after_step: keeps the moments, importance and factors just before each switch."""

    def __init__(self, monkeypatch):
        self.hooks: list[SRLoRAHooks] = []
        self.seen: list[dict] = []
        original = SRLoRA.hooks

        def hooks(method):
            made = original(method)
            inner = made.after_step

            def after_step(ctx):
                before = self.snapshot(made, ctx)
                logged = inner(ctx)
                if "srlora_switch" in logged:
                    self.seen.append({"before": before, "after": self.snapshot(made, ctx), "step": ctx.step + 1})
                return logged

            made.after_step = after_step
            self.hooks.append(made)
            return made

        monkeypatch.setattr(SRLoRA, "hooks", hooks)

    @staticmethod
    def snapshot(hooks: SRLoRAHooks, ctx: HookContext) -> dict:
        layer = next(iter(hooks.layers.values()))
        return {
            "A": layer.lora_A.detach().clone(),
            "B": layer.lora_B.detach().clone(),
            "moments_A": {k: v.clone() for k, v in ctx.moments(layer.lora_A).items()},
            "moments_B": {k: v.clone() for k, v in ctx.moments(layer.lora_B).items()},
            "sbar": [t.clone() for t in hooks.importance.sbar],
            "direction": hooks.direction[0].clone(),
            "edits": len(layer.edits),
        }


def _singular_pairs(weight: torch.Tensor, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(B (d_out, k), A (k, d_in)) of PiSSA's split of every singular triplet, from SciPy's fp64 SVD."""
    u, s, vh = scipy.linalg.svd(weight.double().numpy(), full_matrices=False)
    root = np.sqrt(s / scale)
    return u * root, root[:, None] * vh


@pytest.mark.parametrize("moments", ["reset", "keep"])
@pytest.mark.parametrize("importance_reset", ["recycled", "all"])
def test_switches_refill_from_the_next_singular_directions(
    tiny_llama, bbc_small, tmp_path, monkeypatch, moments, importance_reset
):
    watch = Watch(monkeypatch)
    init = _init(tiny_llama, tmp_path)
    options = {"switch_interval": 2, "moments": moments, "importance_reset": importance_reset}
    run = run_train(
        init,
        _data(bbc_small),
        TrainConfig(max_steps=6, batch_size=2, lr=1e-2),
        tmp_path / "run",
        method_options=options,
    )
    assert [s["step"] for s in watch.seen] == [2, 4]  # the switch after the last step (6) is skipped
    hooks = watch.hooks[0]
    name = hooks.names[0]
    reserve = LazyWeights(init / METHOD_FILE)
    w0 = backbone(load_model(tiny_llama).model).get_submodule(name).weight.detach()
    b_svd, a_svd = _singular_pairs(w0, scale=1.0)
    for k, seen in enumerate(watch.seen):
        before, after = seen["before"], seen["after"]
        refilled = torch.nonzero(after["direction"] != before["direction"]).flatten()
        assert len(refilled) == 1  # r′ = round(0.5 · 2)
        directions = after["direction"][refilled]
        assert directions.tolist() == [2 + k]  # the next unused singular direction, in order
        rows = (k, k + 1)
        assert torch.equal(after["A"][refilled], reserve.rows(f"{name}.reserve_A", *rows))
        assert torch.equal(after["B"][:, refilled], reserve.rows(f"{name}.reserve_Bt", *rows).T)
        # the reserve is W0's singular direction 2 + k, PiSSA-split, to fp32 rounding (SVD signs are arbitrary:
        # the rank-1 product is compared)
        j = 2 + k
        got = after["B"][:, refilled].double() @ after["A"][refilled].double()
        want = np.outer(b_svd[:, j], a_svd[j])
        bound = 3 * FP32_UNIT * np.abs(np.outer(b_svd[:, j], a_svd[j])) + 1e-12 * np.abs(want).max()
        assert (np.abs(got.numpy() - want) <= bound).all()
        kept = torch.ones(2, dtype=torch.bool)
        kept[refilled] = False
        assert torch.equal(after["A"][kept], before["A"][kept])  # the other pair is untouched
        for key, index in (("moments_A", refilled), ("moments_B", (slice(None), refilled))):
            for moment, value in after[key].items():
                if moments == "reset":
                    assert bool((value[index] == 0).all())
                else:
                    assert torch.equal(value[index], before[key][moment][index])
        a_imp = after["sbar"][0]  # module 0's A
        if importance_reset == "all":
            assert all(bool((t == 0).all()) for t in after["sbar"])
        else:
            assert bool((a_imp[refilled] == 0).all()) and torch.equal(a_imp[kept], before["sbar"][0][kept])
            assert bool((before["sbar"][0][refilled] != 0).any())
    intervals = json.loads((run / INTERVALS_FILE).read_text())
    spans = {d: (start, end) for d, _, start, end in intervals["modules"][name]}
    assert spans[2] == (2, 4) or spans[2] == (2, 6)
    assert spans[3] == (4, 6)
    summary = json.loads((run / "manifest.json").read_text())["extra"]["srlora"]
    assert summary["switch_steps"] == [2, 4] and summary["directions_used"] == 4 and summary["interval"] == 2


def test_the_reserve_runs_out_cleanly(tiny_llama, bbc_small, tmp_path):
    # r = 2, r_target = 5, γ = 1: switches recycle 2 pairs, then the last 1, then stop
    init = _init(tiny_llama, tmp_path, r_target=5)
    code, out = cli(
        "train",
        init,
        "--data",
        bbc_small,
        *SFT,
        "--max-steps",
        6,
        "--lr",
        "1e-2",
        "--fusion-ratio",
        1,
        "--switch-interval",
        1,
        "-o",
        tmp_path / "run",
    )
    assert code == 0, out
    logged = [(m["step"], m.get("srlora_switch"), m.get("srlora")) for m in _metrics(tmp_path / "run")]
    assert logged == [(1, 2, None), (2, 1, None), (3, None, "reserve exhausted")] + [(t, None, None) for t in (4, 5, 6)]
    summary = json.loads((tmp_path / "run" / "manifest.json").read_text())["extra"]["srlora"]
    assert summary["switch_steps"] == [1, 2] and summary["directions_used"] == 5 and summary["reserve_exhausted"]
    _, adapters, _ = read_adapters(tmp_path / "run")
    assert all(len(spec.edits) == 3 for spec in adapters.values())  # init's residual + two switches


@pytest.mark.parametrize("stop_at", [2, 3], ids=["interrupted-at-the-switch", "interrupted-after-the-switch"])
def test_resume_across_a_switch_is_bit_identical(tiny_llama, bbc_small, tmp_path, stop_at):
    init = _init(tiny_llama, tmp_path)
    train = [
        "train",
        init,
        "--data",
        bbc_small,
        *SFT,
        "--max-steps",
        5,
        "--save-every",
        1,
        "--lr",
        "1e-2",
        "--switch-interval",
        2,
    ]
    code, out = cli(*train, "-o", tmp_path / "whole")
    assert code == 0, out
    cfg = TrainConfig(max_steps=5, save_every=1, lr=1e-2, batch_size=2)
    with pytest.raises(KeyboardInterrupt):  # in step `stop_at`: the last checkpoint is the step before
        run_train(
            init,
            _data(bbc_small),
            cfg,
            tmp_path / "resumed",
            hooks=[Interrupt(stop_at)],
            method_options={"switch_interval": 2},
        )
    code, out = cli(*train, "--resume", "-o", tmp_path / "resumed")
    assert code == 0, out
    assert_same_tensors(tmp_path / "whole" / ADAPTER_FILE, tmp_path / "resumed" / ADAPTER_FILE)
    assert [m["loss"] for m in _metrics(tmp_path / "whole")] == [m["loss"] for m in _metrics(tmp_path / "resumed")]
    for name in (INTERVALS_FILE,):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "resumed" / name).read_text()


class EditsOnDisk(TrainHooks):
    """After a switch, the layers' newest edit is in the run's work folder, byte for byte."""

    def __init__(self, work):
        self.work, self.checked = work, 0

    def after_step(self, ctx: HookContext) -> dict:
        for name, layer in ctx.layers().items():
            if len(layer.edits) > 1:
                k = len(layer.edits) - 1
                for which, tensor in zip("BA", layer.edits[k], strict=True):
                    assert (self.work / "edits" / f"{name}.{k}.{which}").read_bytes() == tensor.numpy().tobytes()
                self.checked += 1
        return {}


def test_the_edit_log_lives_on_disk_while_training(tiny_llama, bbc_small, tmp_path):
    init = _init(tiny_llama, tmp_path)
    spy = EditsOnDisk(tmp_path / "run.partial")
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-2, save_every=1)
    run_train(init, _data(bbc_small), cfg, tmp_path / "run", hooks=[spy], method_options={"switch_interval": 1})
    assert spy.checked > 0
    assert not (tmp_path / "run" / "edits").exists()  # gone with the checkpoint; the artifact holds the log
    _, adapters, _ = read_adapters(tmp_path / "run")
    assert all(len(spec.edits) == 4 for spec in adapters.values())


# -- fuse and export after several switches -----------------------------------------------------------------


def test_fuse_and_peft_export_reproduce_the_model_after_several_switches(tiny_llama, bbc_small, tmp_path):
    from test_export import assert_peft_export_is_exact
    from test_fuse import assert_fuse_is_exact
    from transformers import AutoModelForCausalLM

    # r = 4, r′ = 2, six switches: k_proj (16 x 32) logs 4 + 6·4 directions beside its rank-4 branch, more
    # than its rank: the export reduces them exactly to 16
    init = run_init(str(tiny_llama), "srlora", tmp_path / "init", {"rank": 4, "r_target": 16})
    run = run_train(
        init,
        _data(bbc_small),
        TrainConfig(max_steps=8, batch_size=2, lr=1e-2),
        tmp_path / "run",
        method_options={"switch_interval": 1},
    )
    _, adapters, _ = read_adapters(run)
    assert all(len(spec.edits) == 7 for spec in adapters.values())
    assert_fuse_is_exact(run, tmp_path / "fuse", AutoModelForCausalLM)
    assert_peft_export_is_exact(run, tmp_path / "export", AutoModelForCausalLM, tiny_llama)
    config = json.loads((tmp_path / "export" / "peft" / "adapter_config.json").read_text())
    ranks = config["rank_pattern"]
    assert ranks["model.layers.0.self_attn.k_proj"] == 16 and ranks["model.layers.0.self_attn.q_proj"] == 32


@pytest.mark.slow
def test_fuse_and_peft_export_after_switches_on_smollm2(smollm2, bbc_small, tmp_path):
    from test_export import assert_peft_export_is_exact
    from test_fuse import assert_fuse_is_exact
    from transformers import AutoModelForCausalLM

    init = run_init(str(smollm2), "srlora", tmp_path / "init", {"rank": 4, "r_target": 10, "svd": "randomized"})
    run = run_train(
        init,
        _data(bbc_small),
        TrainConfig(max_steps=4, batch_size=2, lr=2e-3),
        tmp_path / "run",
        method_options={"switch_interval": 1},
    )
    assert json.loads((run / "manifest.json").read_text())["extra"]["srlora"]["switch_steps"] == [1, 2, 3]
    assert_fuse_is_exact(run, tmp_path / "fuse", AutoModelForCausalLM)
    assert_peft_export_is_exact(run, tmp_path / "export", AutoModelForCausalLM, smollm2)


# -- the record ---------------------------------------------------------------------------------------------


def test_inspect_draws_the_active_intervals(tiny_llama, bbc_small, tmp_path):
    pytest.importorskip("matplotlib")
    init = _init(tiny_llama, tmp_path)
    run = run_train(
        init,
        _data(bbc_small),
        TrainConfig(max_steps=4, batch_size=2, lr=1e-2),
        tmp_path / "run",
        method_options={"switch_interval": 1},
    )
    code, out = cli("inspect", run, "--plot", tmp_path / "intervals.png")
    assert code == 0, out
    assert (tmp_path / "intervals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "switches at steps 1, 2, 3" in out
    intervals = json.loads((run / INTERVALS_FILE).read_text())
    for rows in intervals["modules"].values():  # every direction used, each slot busy from 0 to the end
        assert sorted(d for d, *_ in rows) == list(range(5))
        for slot in (0, 1):
            spans = sorted((start, end) for _, s, start, end in rows if s == slot)
            assert spans[0][0] == 0 and spans[-1][1] == 4
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


# -- bad options --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, expect",
    [
        (["--rank", 4, "--r-target", 3], "--r-target 3 must be larger than --rank 4"),
        (["--rank", 4, "--r-target", 4], "--r-target 4 must be larger than --rank 4"),
        (["--rank", 2, "--r-target", 17], "--r-target 17 is larger than module .*k_proj allows: .*16x32"),
        (["--rank", 2, "--r-target", 0], "--r-target"),
    ],
)
def test_init_refuses_bad_options(tiny_llama, tmp_path, options, expect):
    refused(
        "init",
        tiny_llama,
        "--method",
        "srlora",
        *options,
        "-o",
        tmp_path / "init",
        expect=expect,
        out=tmp_path / "init",
        inputs=(tiny_llama,),
    )


def _refused_train(artifact, data, out, *options, expect, inputs):
    refused(
        "train",
        artifact,
        "--data",
        data,
        *SFT,
        "--max-steps",
        4,
        *options,
        "-o",
        out,
        expect=expect,
        out=out,
        inputs=inputs,
    )


@pytest.mark.parametrize(
    "options, expect",
    [
        (["--fusion-ratio", 0], "--fusion-ratio"),
        (["--fusion-ratio", 1.5], "--fusion-ratio"),
        (["--fusion-ratio", "nan"], "--fusion-ratio"),
        (["--fusion-ratio", "inf"], "--fusion-ratio"),
        (["--switch-interval", 0], "--switch-interval"),
        (["--switch-interval", 4], "--switch-interval 4 is not shorter than the run \\(4 optimizer steps\\)"),
        (["--moments", "zero"], "--moments"),
        (["--importance-reset", "none"], "--importance-reset"),
        (["--beta1", 1], "--beta1"),
    ],
)
def test_train_refuses_bad_options(tiny_llama, bbc_small, tmp_path, options, expect):
    init = _init(tiny_llama, tmp_path)
    _refused_train(init, bbc_small, tmp_path / "run", *options, expect=expect, inputs=(init, bbc_small))


def test_train_refuses_an_artifact_without_its_reserve(tiny_llama, bbc_small, tmp_path):
    init = _init(tiny_llama, tmp_path)
    run = run_train(init, _data(bbc_small), TrainConfig(max_steps=3, batch_size=2), tmp_path / "run")
    expect = "srlora trains from its init artifact"
    _refused_train(run, bbc_small, tmp_path / "again", expect=expect, inputs=(run,))
    reserve = init / METHOD_FILE
    reserve.write_bytes(reserve.read_bytes()[:-4] + b"\0\0\0\0")
    expect = "method.safetensors does not match the digest"
    _refused_train(init, bbc_small, tmp_path / "tampered", expect=expect, inputs=(init,))


def test_inspect_refuses_a_block_or_a_run_it_cannot_draw(tiny_llama, bbc_small, tmp_path):
    init = _init(tiny_llama, tmp_path)
    run = run_train(init, _data(bbc_small), TrainConfig(max_steps=2, batch_size=2), tmp_path / "run")
    png = tmp_path / "intervals.png"
    refused("inspect", run, "--plot", png, "--block", 7, expect="--block 7: the run has blocks 0, 1", out=png)
    lora = run_init(str(tiny_llama), "lora", tmp_path / "lora-init", {"rank": 2})
    lora_run = run_train(lora, _data(bbc_small), TrainConfig(max_steps=2, batch_size=2), tmp_path / "lora-run")
    refused("inspect", lora_run, "--plot", png, expect="only an srlora train run records active intervals", out=png)


def test_init_keeps_the_adapter_options(tiny_llama, tmp_path):
    init = _init(tiny_llama, tmp_path, alpha=4.0, dropout=0.1)
    _, adapters, _ = read_adapters(init)
    spec = adapters["layers.0.self_attn.q_proj"]
    assert (spec.rank, spec.alpha, spec.scale, spec.dropout) == (2, 4.0, 2.0, 0.1)
    reserve = LazyWeights(init / METHOD_FILE)
    assert reserve.shape("layers.0.self_attn.q_proj.reserve_A") == (4, 32)


def test_resume_refuses_a_damaged_edit_file(tiny_llama, bbc_small, tmp_path):
    init = _init(tiny_llama, tmp_path)
    train = ["train", init, "--data", bbc_small, *SFT, "--max-steps", 5, "--save-every", 1, "--switch-interval", 2]
    cfg = TrainConfig(max_steps=5, save_every=1, batch_size=2)
    with pytest.raises(KeyboardInterrupt):  # in step 4: the checkpoint after step 3 holds the switch of step 2
        run_train(
            init, _data(bbc_small), cfg, tmp_path / "run", hooks=[Interrupt(4)], method_options={"switch_interval": 2}
        )
    damaged = sorted((tmp_path / "run.partial" / "edits").iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:-4])
    work = tmp_path / "run.partial"
    refused(*train, "--resume", "-o", tmp_path / "run", expect=f"{damaged} is missing or damaged", inputs=(init,))
    assert work.is_dir()  # the interrupted run is kept, as it was
