"""Artifacts: fingerprints tell models apart, wrong models and kinds are refused, writes are atomic."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import PROMPT

from lrsurgery.data.examples import DataSpec
from lrsurgery.errors import ArtifactError
from lrsurgery.hf.resolve import model_fingerprint
from lrsurgery.io.artifacts import fingerprint_tensors
from lrsurgery.io.outputs import output_folder, swap_into
from lrsurgery.layers.adapter_file import ADAPTER_FILE
from lrsurgery.stages import init as surgery
from lrsurgery.stages.adapted import load_adapted
from lrsurgery.stages.fuse import run_fuse
from lrsurgery.stages.init import run_init
from lrsurgery.training.schedule import TrainConfig
from lrsurgery.training.trainer import run_train


def test_fingerprint_tells_weights_apart_and_ignores_sharding(tiny_llama, tiny_llama_other, tmp_path):
    from transformers import AutoModelForCausalLM

    assert model_fingerprint(tiny_llama) == model_fingerprint(tiny_llama)
    assert model_fingerprint(tiny_llama) != model_fingerprint(tiny_llama_other)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert model_fingerprint(tmp_path / "sharded") == model_fingerprint(tiny_llama)


def test_wrong_model_is_refused(tiny_llama, tiny_llama_other, tmp_path):
    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    with pytest.raises(ArtifactError, match="was made for model"):
        load_adapted(init, model=str(tiny_llama_other))
    loaded, _ = load_adapted(init, model=str(tiny_llama_other), force=True)
    assert loaded.folder == tiny_llama_other


def test_wrong_kind_is_refused(tiny_llama, tmp_path):
    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    manifest = json.loads((init / "manifest.json").read_text())
    manifest["kind"] = "stats"
    (init / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="'stats' artifact; this stage needs one of: init, train"):
        run_fuse(init, tmp_path / "merged")
    with pytest.raises(ArtifactError, match="not an lrsurgery artifact"):
        load_adapted(tiny_llama)


def test_corrupt_adapter_file_is_a_clear_error(tiny_llama, tmp_path):
    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    (init / ADAPTER_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArtifactError, match="corrupt"):
        load_adapted(init)
    (init / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_adapted(init)


def test_failure_mid_write_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    def broken(path, tensors, metadata=None):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(surgery, "save_tensors", broken)
    with pytest.raises(OSError, match="No space"):
        run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_init_keeps_previous_artifact(tiny_llama, tmp_path):
    first = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    before = (first / ADAPTER_FILE).read_bytes()
    with pytest.raises(Exception, match="rank 999"):
        run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 999}, overwrite=True)
    assert (first / ADAPTER_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init"]


def test_failed_training_leaves_no_output(tiny_llama, bbc_small, tmp_path):
    init = run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template="{missing}")
    with pytest.raises(Exception, match="missing"):
        run_train(init, data, TrainConfig(max_steps=2), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_output_folder_replaces_only_when_complete(tmp_path):
    out = tmp_path / "a"
    marker = json.dumps({"lrsurgery_version": "0", "kind": "test"})  # an lrsurgery output: may be replaced
    with output_folder(out, "test") as work:
        (work.folder / "x").write_text("1")
        (work.folder / "manifest.json").write_text(marker)
    with pytest.raises(RuntimeError), output_folder(out, "test", overwrite=True) as work:
        (work.folder / "x").write_text("2")
        raise RuntimeError
    assert (out / "x").read_text() == "1"
    with output_folder(out, "test", overwrite=True) as work:
        (work.folder / "x").write_text("3")
    assert (out / "x").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_tensor_fingerprint_is_exact():
    a = {"x": torch.zeros(3)}
    b = {"x": torch.tensor([0.0, 0.0, 1e-30])}
    assert fingerprint_tensors(a) != fingerprint_tensors(b)
    assert fingerprint_tensors(a) == fingerprint_tensors({"x": torch.zeros(3)})


def test_swap_into_replaces_a_folder_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """Through the atomic exchange (where the kernel has it) and through the two-rename fallback alike, the
    destination ends as the new folder and neither the old one nor a temporary name remains."""
    from lrsurgery.io import outputs

    for exchange in (outputs._exchange, lambda a, b: False):
        monkeypatch.setattr(outputs, "_exchange", exchange)
        dest, new = tmp_path / "dest", tmp_path / "new"
        dest.mkdir(exist_ok=True)
        (dest / "f").write_text("old")
        new.mkdir()
        (new / "f").write_text("new")
        swap_into(new, dest)
        assert (dest / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
