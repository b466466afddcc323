"""Pushing to the Hub with the real huggingface_hub client: a stand-in endpoint, offline, unauthorised."""

from __future__ import annotations

import json

import pytest
from helpers import cli as invoke
from hub_standin import HubStandIn

from lrsurgery.stages.init import run_init


@pytest.fixture
def init_dir(tiny_llama, tmp_path):
    return run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    with HubStandIn() as hub:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        yield hub


def test_push_uploads_the_fused_folder(init_dir, tmp_path, online):
    code, out = invoke("fuse", init_dir, "-o", tmp_path / "merged", "--push-to-hub", "someone/tiny-lora")
    assert code == 0, out
    uploaded = online.files["someone/tiny-lora"]
    local = {p.name for p in (tmp_path / "merged").iterdir()}
    assert set(uploaded) == local and {"model.safetensors", "config.json", "README.md"} <= local
    assert uploaded["model.safetensors"] == (tmp_path / "merged" / "model.safetensors").read_bytes()
    card = uploaded["README.md"].decode()
    assert "lora" in card and "base weights fingerprint" in card
    for content in uploaded.values():  # the token never lands in a file
        assert online.token.encode() not in content


def test_push_peft_export_with_private_repo(init_dir, tmp_path, online):
    code, out = invoke(
        "fuse",
        init_dir,
        "--format",
        "peft",
        "-o",
        tmp_path / "peft",
        "--push-to-hub",
        "someone/tiny-adapter",
        "--private",
    )
    assert code == 0, out
    spec = online.repos["someone/tiny-adapter"]  # newer clients send visibility, older ones private
    assert spec.get("visibility") == "private" or spec.get("private") is True
    assert json.loads(online.files["someone/tiny-adapter"]["adapter_config.json"])["peft_type"] == "LORA"


def test_unauthorised_push_is_one_clear_error(init_dir, tmp_path, online, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code, out = invoke("fuse", init_dir, "-o", tmp_path / "merged", "--push-to-hub", "someone/x")
    assert code == 1 and "not authorised" in out and "intact" in out
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert "hf_wrong" not in out


def test_offline_push_is_one_clear_error(init_dir, tmp_path):
    code, out = invoke("fuse", init_dir, "-o", tmp_path / "merged", "--push-to-hub", "someone/x")
    assert code == 1 and "offline" in out and "intact" in out
    assert (tmp_path / "merged" / "config.json").is_file()


def test_dry_run_lists_files(init_dir, tmp_path):
    code, out = invoke("fuse", init_dir, "-o", tmp_path / "merged", "--push-to-hub", "someone/x", "--dry-run")
    assert code == 0 and "would upload" in out and "model.safetensors" in out and "README.md" in out


def test_model_card_reports_method_data_and_eval_results(tiny_llama, bbc_small, tmp_path):
    from helpers import PROMPT, RESPONSE

    from lrsurgery.data.examples import DataSpec
    from lrsurgery.stages.fuse import run_fuse
    from lrsurgery.training.schedule import TrainConfig
    from lrsurgery.training.trainer import run_train

    init = run_init(str(tiny_llama), "pissa", tmp_path / "init", {"rank": 2})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    run = run_train(init, data, TrainConfig(max_steps=1, batch_size=2), tmp_path / "run")
    report = {"results": {str(run): {"bbc_topic": {"acc": 0.8125, "acc_stderr": 0.1, "n": 16}}}}
    (run / "results.json").write_text(json.dumps(report))
    card = (run_fuse(run, tmp_path / "merged") / "README.md").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert "`pissa`" in card and "rank 2" in card and manifest["data"]["fingerprint"][:16] in card
    assert manifest["model"]["fingerprint"][:16] in card
    assert "| bbc_topic | acc | 0.8125 |" in card and "acc_stderr" not in card
