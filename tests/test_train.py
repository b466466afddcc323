"""Training: resume is bit-identical on CPU, logs are complete, the output path is all-or-nothing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import PROMPT, RESPONSE, assert_same_tensors, cli, sum_tolerance

from lrsurgery.data.examples import DataSpec, collate
from lrsurgery.errors import ArtifactError
from lrsurgery.io.artifacts import load_tensors
from lrsurgery.layers.adapter_file import ADAPTER_FILE
from lrsurgery.methods import TrainHooks
from lrsurgery.stages.init import run_init
from lrsurgery.training.schedule import TrainConfig, lr_at
from lrsurgery.training.trainer import run_train


class Interrupt(TrainHooks):
    """Stops training (as a crash or Ctrl-C would) after optimizer step `at`."""

    def __init__(self, at: int):
        self.at = at

    def after_step(self, ctx):
        if ctx.step + 1 == self.at:
            raise KeyboardInterrupt
        return {}


def _resume_matches_uninterrupted(model_folder, data_path, tmp_path, steps, save_every, stop_at, **train):
    init = run_init(str(model_folder), "pissa", tmp_path / "init", {"rank": 4, "dropout": 0.1})
    data = DataSpec(path=str(data_path), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    cfg = TrainConfig(max_steps=steps, save_every=save_every, lr=5e-3, **train)
    whole = run_train(init, data, cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run_train(init, data, cfg, tmp_path / "resumed", hooks=[Interrupt(stop_at)])
    assert not (tmp_path / "resumed").exists()
    partial = tmp_path / "resumed.partial"
    assert json.loads((partial / "checkpoint" / "checkpoint.json").read_text())["step"] < stop_at
    with pytest.raises(ArtifactError, match="--resume"):
        run_train(init, data, cfg, tmp_path / "resumed")
    with pytest.raises(ArtifactError, match=r"different settings \(train.lr\)"):
        run_train(init, data, TrainConfig(**{**cfg.__dict__, "lr": 1e-3}), tmp_path / "resumed", resume=True)
    resumed = run_train(init, data, cfg, tmp_path / "resumed", resume=True)
    assert_same_tensors(whole / ADAPTER_FILE, resumed / ADAPTER_FILE)
    a = load_tensors(whole / ADAPTER_FILE)
    log_a = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == list(range(1, steps + 1))
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    init_a = load_tensors(init / ADAPTER_FILE)
    assert any(not torch.equal(init_a[k], a[k]) for k in a if k.endswith("lora_B"))


def test_resume_is_bitwise_identical_tiny(tiny_llama, bbc_small, tmp_path):
    _resume_matches_uninterrupted(
        tiny_llama, bbc_small, tmp_path, steps=7, save_every=2, stop_at=5, batch_size=2, grad_accum=2
    )


@pytest.mark.slow
def test_resume_is_bitwise_identical_smollm2(smollm2, bbc_small, tmp_path):
    _resume_matches_uninterrupted(smollm2, bbc_small, tmp_path, steps=3, save_every=1, stop_at=2, batch_size=2)


def test_metrics_log_and_manifest(tiny_llama, bbc_small, tmp_path):
    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    run = run_train(init, data, TrainConfig(epochs=0.5, batch_size=4), tmp_path / "run")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 5  # 0.5 epoch of 40 rows at 4 per step
    assert {"step", "loss", "lr", "grad_norm", "step_time"} <= set(records[0])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["kind"] == "train" and manifest["data"]["examples"] == 40
    assert len(manifest["data"]["fingerprint"]) == 64
    assert not (run / "checkpoint").exists()


def test_bf16_and_gradient_checkpointing_run(tiny_llama, bbc_small, tmp_path):
    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    cfg = TrainConfig(max_steps=2, batch_size=2, precision="bf16", gradient_checkpointing=True)
    run = run_train(init, data, cfg, tmp_path / "run")
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert load_tensors(run / ADAPTER_FILE)["layers.0.mlp.up_proj.lora_A"].dtype == torch.float32


class NaNLoss(TrainHooks):
    def extra_loss(self, ctx):
        return {"bad": torch.tensor(float("nan"))} if ctx.step == 2 else {}


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tiny_llama, bbc_small, tmp_path):
    from lrsurgery.training.trainer import TrainingDiverged

    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    cfg = TrainConfig(max_steps=5, batch_size=2, save_every=2)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3"):
        run_train(init, data, cfg, tmp_path / "run", hooks=[NaNLoss()])
    assert not (tmp_path / "run").exists()
    assert json.loads((tmp_path / "run.partial" / "checkpoint" / "checkpoint.json").read_text())["step"] == 2


def test_learning_rate_schedule():
    cfg = TrainConfig(max_steps=100, lr=1.0, warmup_ratio=0.1, schedule="linear")
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, cfg) == pytest.approx(0.5)
    cos = TrainConfig(max_steps=100, lr=1.0, warmup_ratio=0.0, schedule="cosine")
    assert lr_at(50, 100, cos) == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("method,lr", [("lora", 2e-3), ("pissa", 5e-4)])
def test_training_reduces_loss_on_real_data(smollm2, bbc_small, tmp_path, method, lr):
    init = run_init(str(smollm2), method, tmp_path / "init", {"rank": 8, "alpha": 16})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=64)
    cfg = TrainConfig(max_steps=12, batch_size=4, lr=lr, warmup_ratio=0.0)
    run = run_train(init, data, cfg, tmp_path / "r")
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


def test_eval_limit_takes_the_first_rows_of_the_held_out_data(tiny_llama, bbc, bbc_small, tmp_path):
    from lrsurgery.data.examples import build_examples
    from lrsurgery.hf.load import load_tokenizer

    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    flags = ["--data", bbc_small, "--prompt-template", PROMPT, "--response-template", RESPONSE, "--seq-len", "64"]
    flags += ["--max-steps", "1", "--batch-size", "2", "--eval-data", bbc / "test.jsonl"]
    code, out = cli("train", init, *flags, "--eval-limit", "0", "-o", tmp_path / "bad")
    assert code == 1 and "--eval-limit must be at least 1" in out and not (tmp_path / "bad").exists()
    code, out = cli("train", init, *flags, "--eval-limit", "3", "-o", tmp_path / "run")
    assert code == 0, out
    recorded = json.loads((tmp_path / "run" / "manifest.json").read_text())["extra"]["eval"]
    held = DataSpec(path=str(bbc / "test.jsonl"), prompt_template=PROMPT, response_template=RESPONSE, seq_len=64)
    rows = build_examples(held, load_tokenizer(tiny_llama)).rows[:3]
    assert recorded["data"]["limit"] == 3
    assert recorded["count"] == sum(sum(1 for t in row["labels"][1:] if t != -100) for row in rows)


def test_held_out_loss_is_logged_and_recorded(tiny_llama, bbc, bbc_small, tmp_path):
    from lrsurgery.data.examples import build_examples
    from lrsurgery.hf.load import load_model
    from lrsurgery.training.heldout import heldout_loss

    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 4})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=64)
    held = DataSpec(path=str(bbc / "test.jsonl"), prompt_template=PROMPT, response_template=RESPONSE, seq_len=64)
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=1e-2, eval_every=2)
    run = run_train(init, data, cfg, tmp_path / "run", eval_data=held)
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval_loss" in r] == [2, 4]
    recorded = json.loads((run / "manifest.json").read_text())["extra"]["eval"]
    assert recorded["loss"] == log[-1]["eval_loss"] and recorded["count"] > 0
    # the definition: token-weighted mean of per-example losses, whatever the batch size
    loaded = load_model(tiny_llama)
    examples = build_examples(held, loaded.tokenizer)
    weighted = tokens = 0.0
    for row in examples.rows:
        n = sum(1 for t in row["labels"][1:] if t != -100)
        with torch.no_grad():
            weighted += float(loaded.model(**collate([row], loaded.tokenizer.pad_token_id, "causal")).loss) * n
        tokens += n
    for batch_size in (1, 3):
        got = heldout_loss(loaded.model, examples, loaded.tokenizer.pad_token_id, "causal", batch_size)
        assert got["count"] == tokens and got["loss"] == pytest.approx(weighted / tokens, rel=sum_tolerance(tokens))
