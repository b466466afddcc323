"""Fused folders are plain transformers models whose logits equal the adapted model's (fp32, ≤ 1e-4)."""

from __future__ import annotations

import json

import pytest
from helpers import PROMPT, RESPONSE, max_abs, outputs
from test_init_exact import PISSA_SMOLLM2_FP32

from lrsurgery.data import DataSpec
from lrsurgery.fuse import run_fuse
from lrsurgery.surgery import load_adapted, run_init
from lrsurgery.train import TrainConfig, run_train


@pytest.mark.slow
@pytest.mark.parametrize("method,tol", [("lora", 1e-4), ("pissa", PISSA_SMOLLM2_FP32)])
def test_fused_smollm2_equals_adapted(smollm2, bbc_small, tmp_path, method, tol):
    from transformers import AutoModelForCausalLM

    init = run_init(str(smollm2), method, tmp_path / "init", {"rank": 8, "alpha": 16})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    run = run_train(init, data, TrainConfig(max_steps=3, batch_size=2, lr=2e-3), tmp_path / "run")
    adapted, _ = load_adapted(run)
    expected = outputs(adapted.model, adapted.tokenizer)
    base = outputs(AutoModelForCausalLM.from_pretrained(smollm2), adapted.tokenizer)
    assert max_abs(expected, base) > 1e-2  # the adapters really change the model
    fused = run_fuse(run, tmp_path / "merged", shard_size="200MB")
    index = json.loads((fused / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2 and index["metadata"]["total_size"] > 0
    plain = AutoModelForCausalLM.from_pretrained(fused)
    assert max_abs(outputs(plain, adapted.tokenizer), expected) <= tol
    assert (fused / "tokenizer.json").is_file() and (fused / "generation_config.json").is_file()


@pytest.mark.slow
def test_fused_minilm_classifier_equals_adapted(minilm, bbc_small, tmp_path):
    """Encoder + trained classification head: the fused folder carries the head and the labels."""
    from transformers import AutoModelForSequenceClassification

    init = run_init(str(minilm), "pissa", tmp_path / "init", {"rank": 4})
    data = DataSpec(path=str(bbc_small), task="classification", seq_len=64)
    run = run_train(init, data, TrainConfig(max_steps=3, batch_size=4, lr=1e-3), tmp_path / "run")
    adapted, manifest = load_adapted(run)
    assert manifest.extra["head"]["num_labels"] == 5
    expected = outputs(adapted.model, adapted.tokenizer)
    fused = run_fuse(run, tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(fused)
    assert plain.config.id2label[0] == "business" and plain.config.num_labels == 5
    assert max_abs(outputs(plain, adapted.tokenizer), expected) <= 1e-4


def test_fused_tiny_after_training_equals_adapted(tiny_llama, bbc_small, tmp_path):
    from transformers import AutoModelForCausalLM

    init = run_init(str(tiny_llama), "pissa", tmp_path / "init", {"rank": 4, "dropout": 0.1})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=64)
    run = run_train(init, data, TrainConfig(max_steps=3, batch_size=2, lr=1e-2), tmp_path / "run")
    adapted, _ = load_adapted(run)
    adapted.model.eval()
    fused = run_fuse(run, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(fused)
    assert max_abs(outputs(plain, adapted.tokenizer), outputs(adapted.model, adapted.tokenizer)) <= 1e-4


def test_fuse_bf16_and_refuses_existing_output(tiny_llama, tmp_path):
    from lrsurgery.artifacts import ArtifactError

    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    fused = run_fuse(init, tmp_path / "merged", dtype="bf16")
    config = json.loads((fused / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with pytest.raises(ArtifactError, match="already exists"):
        run_fuse(init, tmp_path / "merged")
