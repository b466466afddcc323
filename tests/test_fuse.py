"""Fused folders are plain transformers models whose logits equal the adapted model's (to fp32 rounding)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import PROMPT, RESPONSE, assert_same_function, max_abs, outputs

from lrsurgery.data.examples import DataSpec
from lrsurgery.io.shards import LazyWeights
from lrsurgery.stages.adapted import load_adapted
from lrsurgery.stages.fuse import run_fuse
from lrsurgery.stages.init import run_init
from lrsurgery.training.schedule import TrainConfig
from lrsurgery.training.trainer import run_train


def assert_fuse_is_exact(artifact, tmp_path, model_cls, task=None, **fuse_options):
    """Fuse `artifact` in fp32 (with `fuse_options`) and in fp64, and check both against the adapted model:

    - every fp32 tensor is the fp64 merge rounded once (bitwise), so nothing is lost before the cast;
    - in fp64 the fused model equals the adapted model exactly (W0 + edits + s·B·diag(E)·A is the same
      function as the base plus its branches);
    - in fp32 the two differ by no more than their own rounding, measured in fp64 (assert_same_function).

    Returns the fp32 fused folder.
    """
    fused = run_fuse(artifact, tmp_path / "merged", **fuse_options)
    fused64 = run_fuse(artifact, tmp_path / "merged64", dtype="fp64")
    weights, weights64 = LazyWeights(fused), LazyWeights(fused64)
    assert sorted(weights.keys()) == sorted(weights64.keys())
    for key in weights.keys():
        assert torch.equal(weights.get(key), weights64.get(key).to(weights.dtype(key))), key
    adapted, _ = load_adapted(artifact, task=task)
    adapted64, _ = load_adapted(artifact, task=task, dtype=torch.float64)
    tokenizer = adapted.tokenizer
    assert_same_function(
        outputs(model_cls.from_pretrained(fused), tokenizer),
        outputs(model_cls.from_pretrained(fused64, dtype=torch.float64), tokenizer),
        outputs(adapted.model, tokenizer),
        outputs(adapted64.model, tokenizer),
        f"fused {artifact.name}",
    )
    return fused


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_fused_smollm2_equals_adapted(smollm2, bbc_small, tmp_path, method):
    """Trained adapters (B ≠ 0) run through a separate fp32 branch in the adapted model, so in fp32 the
    two differ by the rounding of a branch-carrying model; in fp64 they are the same function."""
    from transformers import AutoModelForCausalLM

    init = run_init(str(smollm2), method, tmp_path / "init", {"rank": 8, "alpha": 16})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    run = run_train(init, data, TrainConfig(max_steps=3, batch_size=2, lr=2e-3), tmp_path / "run")
    adapted, _ = load_adapted(run)
    expected = outputs(adapted.model, adapted.tokenizer)
    base = outputs(AutoModelForCausalLM.from_pretrained(smollm2), adapted.tokenizer)
    assert max_abs(expected, base) > 1e-2  # the adapters really change the model
    fused = assert_fuse_is_exact(run, tmp_path, AutoModelForCausalLM, shard_size="200MB")
    index = json.loads((fused / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2 and index["metadata"]["total_size"] > 0
    assert (fused / "tokenizer.json").is_file() and (fused / "generation_config.json").is_file()


@pytest.mark.slow
def test_fused_minilm_classifier_equals_adapted(minilm, bbc_small, tmp_path):
    """Encoder + trained classification head: the fused folder carries the head and the labels."""
    from transformers import AutoModelForSequenceClassification

    init = run_init(str(minilm), "pissa", tmp_path / "init", {"rank": 4})
    data = DataSpec(path=str(bbc_small), task="classification", seq_len=64)
    run = run_train(init, data, TrainConfig(max_steps=3, batch_size=4, lr=1e-3), tmp_path / "run")
    _, manifest = load_adapted(run)
    assert manifest.extra["head"]["num_labels"] == 5
    fused = assert_fuse_is_exact(run, tmp_path, AutoModelForSequenceClassification)
    plain = AutoModelForSequenceClassification.from_pretrained(fused)
    assert plain.config.id2label[0] == "business" and plain.config.num_labels == 5


def test_fused_tiny_after_training_equals_adapted(tiny_llama, bbc_small, tmp_path):
    from transformers import AutoModelForCausalLM

    init = run_init(str(tiny_llama), "pissa", tmp_path / "init", {"rank": 4, "dropout": 0.1})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=64)
    run = run_train(init, data, TrainConfig(max_steps=3, batch_size=2, lr=1e-2), tmp_path / "run")
    assert_fuse_is_exact(run, tmp_path, AutoModelForCausalLM)


def test_fuse_bf16_and_refuses_existing_output(tiny_llama, tmp_path):
    from lrsurgery.errors import ArtifactError

    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    fused = run_fuse(init, tmp_path / "merged", dtype="bf16")
    config = json.loads((fused / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with pytest.raises(ArtifactError, match="already exists"):
        run_fuse(init, tmp_path / "merged")


def test_fused_bare_encoder_is_a_bare_encoder(tiny_bert, tmp_path):
    """An encoder saved without a head fuses into the same class, not a model with a random LM head."""
    from transformers import AutoModel

    init = run_init(str(tiny_bert), "pissa", tmp_path / "init", {"rank": 4})
    fused = assert_fuse_is_exact(init, tmp_path, AutoModel, task="base")
    assert json.loads((fused / "config.json").read_text())["architectures"] == ["BertModel"]


def test_fp16_overflow_names_the_tensor(tiny_llama, tmp_path):
    from lrsurgery.io.artifacts import save_tensors
    from lrsurgery.layers.adapter_file import ADAPTER_FILE, read_adapters, to_tensors

    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    _, adapters, _ = read_adapters(init)
    adapters["layers.1.mlp.down_proj"].B = torch.full_like(adapters["layers.1.mlp.down_proj"].B, 1e7)
    save_tensors(init / ADAPTER_FILE, to_tensors(adapters)[0])
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight .*fp16 range"):
        run_fuse(init, tmp_path / "merged", dtype="fp16")
    assert not (tmp_path / "merged").exists()
    run_fuse(init, tmp_path / "merged", dtype="bf16")


def test_not_enough_disk_is_refused_before_writing(tiny_llama, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**5, 10**5))
    with pytest.raises(OSError, match="not enough disk space"):
        run_fuse(init, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_missing_or_different_base_weights(tiny_llama, tiny_llama_other, tmp_path):
    from lrsurgery.errors import ArtifactError
    from lrsurgery.hf.resolve import ModelError

    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    with pytest.raises(ArtifactError, match="was made for model"):
        run_fuse(init, tmp_path / "merged", model=str(tiny_llama_other))
    with pytest.raises(ModelError, match="does not exist"):
        run_fuse(init, tmp_path / "merged", model=str(tmp_path / "gone"))
    assert not (tmp_path / "merged").exists()


def test_streaming_fuse_memory_does_not_hold_the_model(tiny_llama, tmp_path):
    """The merge reads one tensor at a time: with 1 MB shards, every shard stays near 1 MB."""
    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    fused = run_fuse(init, tmp_path / "merged", shard_size="1MB")
    index = json.loads((fused / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    sizes = [(fused / f).stat().st_size for f in files]
    embedding = 49152 * 32 * 4
    assert len(files) >= 2 and all(s <= max(1_000_000, embedding) + 100_000 for s in sizes)
    assert index["metadata"]["total_size"] == sum(s - _header(fused / f) for f, s in zip(files, sizes, strict=True))


def _header(path):
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_fuse_reads_a_sharded_base(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded_base"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(sharded, max_shard_size="1MB")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) >= 2
    init = run_init(str(sharded), "pissa", tmp_path / "init", {"rank": 4})
    assert_fuse_is_exact(init, tmp_path, AutoModelForCausalLM, dtype="fp32")
