"""Sensitivity |w · ∂L/∂w|: the sequential block-by-block backward equals the whole-model one."""

from __future__ import annotations

import pytest
import torch

from lrsurgery.calibrate import capture_block_inputs
from lrsurgery.data import DataSpec, build_examples, collate
from lrsurgery.models import block_list, find_targets, load_model
from lrsurgery.sensitivity import sequential, whole_model


def _samples(folder, data_path, n, seq_len):
    loaded = load_model(folder)
    rows = build_examples(DataSpec(path=str(data_path), seq_len=seq_len), loaded.tokenizer).rows[:n]
    return loaded, [collate([r], loaded.tokenizer.pad_token_id, "causal") for r in rows]


def _compare(folder, data_path, n, seq_len):
    loaded, samples = _samples(folder, data_path, n, seq_len)
    targets = find_targets(loaded.model)
    reference = whole_model(loaded.model, samples, targets)
    _, blocks = block_list(loaded.model)
    with torch.no_grad():
        captured = capture_block_inputs(loaded.model, blocks, samples)
    got = sequential(loaded.model, samples, targets, captured)
    assert reference.keys() == got.keys() and len(reference) == 3 * len(targets)
    for key, expected in reference.items():
        assert float((got[key] - expected).norm() / expected.norm()) <= 1e-4, key
    return reference, loaded, samples, targets


def test_sequential_equals_whole_model_tiny(tiny_llama, bbc_small):
    reference, loaded, samples, targets = _compare(tiny_llama, bbc_small, n=3, seq_len=24)
    # against a direct computation: mean over samples of mean |w * grad|
    name = targets[-1]
    weight = loaded.model.base_model.get_submodule(name).weight
    total = torch.zeros_like(weight, dtype=torch.float64)
    for sample in samples:
        weight.requires_grad_(True)
        weight.grad = None
        loaded.model(**sample).loss.backward()
        total += (weight.detach() * weight.grad).abs().double()
        weight.requires_grad_(False)
    assert float(reference[f"sens.{name}"]) == pytest.approx(float(total.mean() / len(samples)), rel=1e-5)
    rows = total.mean(dim=1) / len(samples)
    assert torch.allclose(reference[f"sens_rows.{name}"].double(), rows, rtol=1e-5)


@pytest.mark.slow
def test_sequential_equals_whole_model_smollm2(smollm2, bbc_small):
    _compare(smollm2, bbc_small, n=2, seq_len=32)
