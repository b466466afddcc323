"""Sensitivity mean |w · ∂L/∂w|: per-sample gradients from batched passes, sequential = whole model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import PROMPT, RESPONSE, assert_same_tensors, sum_tolerance

from lrsurgery.calibration import backward
from lrsurgery.calibration.runner import CalibrateConfig, run_calibrate
from lrsurgery.calibration.sensitivity import whole_model
from lrsurgery.calibration.stats_file import sensitivity_tensors
from lrsurgery.data.examples import DataSpec, build_examples, collate
from lrsurgery.hf.load import load_model
from lrsurgery.hf.tree import find_targets

BOTH = ("covariance", "sensitivity")


def direct(loaded, rows, name):
    """Reference: one backward per sample on the real weight gradient, |w · g| averaged over samples."""
    weight = loaded.model.base_model.get_submodule(name).weight
    total = torch.zeros_like(weight, dtype=torch.float64)
    for row in rows:
        weight.requires_grad_(True)
        weight.grad = None
        loaded.model(**collate([row], loaded.tokenizer.pad_token_id, "causal")).loss.backward()
        total += (weight.detach() * weight.grad).abs().double()
        weight.requires_grad_(False)
    return total / len(rows)


@pytest.mark.parametrize("data", ["lm", "sft"])
def test_batched_per_sample_sensitivity_equals_one_backward_per_sample(tiny_llama, bbc_small, data):
    """Batches of 3 (padded, for SFT) give the per-sample |w · g| of one backward per sample."""
    loaded = load_model(tiny_llama)
    spec = DataSpec(path=str(bbc_small), seq_len=24)
    if data == "sft":
        spec = DataSpec(path=str(bbc_small), seq_len=128, prompt_template=PROMPT, response_template=RESPONSE)
    rows = build_examples(spec, loaded.tokenizer).rows[:6]
    if data == "sft":
        assert len({len(r["input_ids"]) for r in rows}) > 1  # padding really happens
    batches = [collate(rows[i : i + 3], loaded.tokenizer.pad_token_id, "causal") for i in (0, 3)]
    targets = find_targets(loaded.model)
    got = whole_model(loaded.model, batches, targets)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)  # g·xᵀ sums over these, in fp32 both ways
    tol = sum_tolerance(tokens)
    for name in (targets[0], targets[-1]):
        expected = direct(loaded, rows, name)
        assert float(got[f"sens.{name}"]) == pytest.approx(float(expected.mean()), rel=tol)
        assert torch.allclose(got[f"sens_rows.{name}"].double(), expected.mean(dim=1), rtol=tol, atol=0)
        assert torch.allclose(got[f"sens_cols.{name}"].double(), expected.mean(dim=0), rtol=tol, atol=0)


def _sequential_vs_whole(folder, data, tmp_path, **options):
    cfg = dict(samples=4, seq_len=32, batch_size=2, collect=BOTH)
    whole = run_calibrate(
        str(folder), DataSpec(path=str(data)), CalibrateConfig(**cfg, sensitivity_path="whole"), tmp_path / "w"
    )
    seq = run_calibrate(str(folder), DataSpec(path=str(data)), CalibrateConfig(**cfg, **options), tmp_path / "s")
    reference, got = sensitivity_tensors(whole), sensitivity_tensors(seq)
    assert reference.keys() == got.keys()
    tokens = cfg["samples"] * cfg["seq_len"]  # the same fp32 gradients, by blocks or whole, summed over these
    for key, expected in reference.items():
        assert float((got[key] - expected).norm() / expected.norm()) <= sum_tolerance(tokens), key
    return seq


def test_sequential_equals_whole_model_tiny(tiny_llama, bbc_small, tmp_path):
    stats = _sequential_vs_whole(tiny_llama, bbc_small, tmp_path)
    assert len(sensitivity_tensors(stats)) == 3 * 14
    assert not list(stats.glob("grad_*")) and not list(stats.glob("sens_*"))  # working files removed


@pytest.mark.slow
def test_sequential_equals_whole_model_smollm2(smollm2, bbc_small, tmp_path):
    _sequential_vs_whole(smollm2, bbc_small, tmp_path)


@pytest.fixture(scope="module")
def tiny_gemma2_capped(tmp_path_factory, smollm2):
    """A 2-layer random Gemma 2, whose logits are soft-capped (30 · tanh(z / 30)): more than the head's product."""
    from conftest import _save_tiny
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        final_logit_softcapping=30.0,
        pad_token_id=2,
        eos_token_id=2,
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny_gemma2"), config, smollm2, Gemma2ForCausalLM, seed=5)


@pytest.mark.parametrize(
    ("model", "whole_reads"),
    [("tiny_llama", []), ("tiny_llama_untied", []), ("tiny_gemma2_capped", ["model.embed_tokens.weight"])],
)
def test_sequential_with_disk_offload_equals_whole_model(request, model, whole_reads, bbc_small, tmp_path, monkeypatch):
    """Offloaded, the vocabulary-sized matrices are never read whole: the embedding gives only the rows
    of the tokens seen, and the loss gradient streams the head (tied: the embedding matrix) in chunks of
    rows (calibration/head.py), except for a model with soft-capped logits, whose head is read once,
    whole, for that step; the blocks' inputs for the backward pass go to files. The sensitivities equal
    the whole model's either way."""
    from lrsurgery.calibration import head
    from lrsurgery.io.shards import LazyWeights

    folder = request.getfixturevalue(model)
    read_whole = []
    original = LazyWeights.get
    monkeypatch.setattr(
        LazyWeights, "get", lambda self, key, dtype=None: read_whole.append(key) or original(self, key, dtype)
    )
    monkeypatch.setattr(head, "LOGIT_ELEMENTS", 4 * 32 * 1000)  # several chunks of the 49,152 rows
    spilled = []  # the block inputs the backward pass reads back, from files (not held in memory)
    pop = backward.BlockInputs.pop
    monkeypatch.setattr(backward.BlockInputs, "pop", lambda self, i: spilled.append(self._file(i)) or pop(self, i))
    stats = _sequential_vs_whole(folder, bbc_small, tmp_path, offload="disk")
    vocabulary = [k for k in read_whole if k in ("model.embed_tokens.weight", "lm_head.weight")]
    assert vocabulary == whole_reads  # (the whole-model run loads through transformers)
    assert [f.name for f in spilled] == ["input_0001.safetensors", "input_0000.safetensors"]
    assert not list(stats.glob("inputs.*")) and not list(stats.glob("*/input_*"))  # removed when done


def test_sensitivity_resumes_from_the_last_finished_block(tiny_llama, bbc_small, tmp_path, monkeypatch):
    cfg = CalibrateConfig(samples=4, seq_len=32, batch_size=2, collect=BOTH)
    data = DataSpec(path=str(bbc_small))
    whole = run_calibrate(str(tiny_llama), data, cfg, tmp_path / "once")
    original = backward._write_sensitivity_block

    def crash_at_block_zero(work, index, tensors, grads):
        if index == 0:
            raise KeyboardInterrupt
        original(work, index, tensors, grads)

    monkeypatch.setattr(backward, "_write_sensitivity_block", crash_at_block_zero)
    with pytest.raises(KeyboardInterrupt):
        run_calibrate(str(tiny_llama), data, cfg, tmp_path / "again")
    monkeypatch.setattr(backward, "_write_sensitivity_block", original)
    extra = json.loads((tmp_path / "again.partial" / "manifest.json").read_text())["extra"]
    assert extra["completed"] == 2 and extra["sensitivity_next"] == 1
    again = run_calibrate(str(tiny_llama), data, cfg, tmp_path / "again", resume=True)
    for file in ["sensitivity.safetensors", *(f.name for f in whole.glob("block_*"))]:
        assert_same_tensors(whole / file, again / file)
