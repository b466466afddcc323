"""Bad input gets one clear error line from the CLI (exit code 1, no traceback) and loses nothing."""

from __future__ import annotations

import json

import pytest
from helpers import cli as run
from helpers import write_jsonl

from lrsurgery.stages.init import run_init


@pytest.fixture
def init_dir(tiny_llama, tmp_path):
    return run_init(str(tiny_llama), "lora", tmp_path / "init", {"rank": 2})


def test_rank_larger_than_matrix(tiny_llama, tmp_path):
    code, out = run("init", tiny_llama, "--rank", "40", "-o", tmp_path / "i")
    assert code == 1 and "rank 40 is larger than module" in out and "at most 32" in out
    assert not (tmp_path / "i").exists()


def test_unknown_method_and_bad_regex(tiny_llama, tmp_path):
    code, out = run("init", tiny_llama, "--method", "nope", "-o", tmp_path / "i")
    assert code == 1 and "unknown method 'nope'" in out and "pissa" in out
    code, out = run("init", tiny_llama, "--method", "lora", "--svd", "randomized", "-o", tmp_path / "i")
    assert code == 1 and "does not take --svd" in out
    code, out = run("init", tiny_llama, "--targets", "(", "-o", tmp_path / "i")
    assert code == 1 and "not a valid regular expression" in out
    code, out = run("init", tiny_llama, "--targets", "no_such_layer", "-o", tmp_path / "i")
    assert code == 1 and "no nn.Linear layers matching" in out


def test_nan_weights(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "nan")
    code, out = run("init", tmp_path / "nan", "--method", "pissa", "--rank", "2", "-o", tmp_path / "i")
    assert code == 1 and "layers.1.mlp.up_proj" in out and "NaN" in out


def test_missing_model(tmp_path):
    code, out = run("init", tmp_path / "nowhere", "-o", tmp_path / "i")
    assert code == 1 and "does not exist" in out
    code, out = run("init", "someone/not-cached-model", "-o", tmp_path / "i")
    assert code == 1 and "local Hugging Face cache" in out


def test_missing_column(init_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"body": "hello"}])
    code, out = run("train", init_dir, "--data", data, "--max-steps", "1", "-o", tmp_path / "r")
    assert code == 1 and "no column(s) 'text'" in out and "it has: body" in out
    assert not (tmp_path / "r").exists()


def test_template_names_absent_field(init_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "2+2?", "answer": "4"}])
    code, out = run(
        "train",
        init_dir,
        "--data",
        data,
        "--prompt-template",
        "Q: {question} {context}",
        "--response-template",
        " {answer}",
        "--max-steps",
        "1",
        "-o",
        tmp_path / "r",
    )
    assert code == 1 and "'context'" in out and "prompt/response templates" in out


def test_empty_data(init_dir, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    code, out = run("train", init_dir, "--data", data, "--max-steps", "1", "-o", tmp_path / "r")
    assert code == 1 and "empty" in out


def test_text_too_short_for_one_block(init_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hi"}])
    code, out = run("train", init_dir, "--data", data, "--max-steps", "1", "-o", tmp_path / "r")
    assert code == 1 and "no training examples" in out


def test_classification_needs_label_column(init_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    code, out = run(
        "train", init_dir, "--data", data, "--task", "classification", "--max-steps", "1", "-o", tmp_path / "r"
    )
    assert code == 1 and "'label'" in out


def test_malformed_json(init_dir, tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    code, out = run("train", init_dir, "--data", bad, "--max-steps", "1", "-o", tmp_path / "r")
    assert code == 1 and "cannot load data" in out and "d.jsonl" in out


def test_unsupported_file_and_missing_data(init_dir, tmp_path):
    bad = tmp_path / "d.xml"
    bad.write_text("<a/>")
    code, out = run("train", init_dir, "--data", bad, "--max-steps", "1", "-o", tmp_path / "r")
    assert code == 1 and "unsupported file type" in out
    code, out = run("train", init_dir, "--data", tmp_path / "none.jsonl", "--max-steps", "1", "-o", tmp_path / "r")
    assert code == 1 and "does not exist" in out


def test_steps_or_epochs(init_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello " * 400}])
    code, out = run("train", init_dir, "--data", data, "-o", tmp_path / "r")
    assert code == 1 and "--max-steps or --epochs" in out


def test_not_an_artifact(tiny_llama, tmp_path):
    code, out = run("fuse", tiny_llama, "-o", tmp_path / "m")
    assert code == 1 and "not an lrsurgery artifact" in out


def test_calibrate_unknown_statistic(tmp_path):
    code, out = run(
        "calibrate", "smollm2-135m", "--data", "x.jsonl", "--collect", "covariance,fisher", "-o", tmp_path / "s"
    )
    assert code == 1 and "--collect takes covariance and/or sensitivity" in out


def test_config_file_and_flag_override(tiny_llama, tmp_path):
    cfg = tmp_path / "init.yaml"
    cfg.write_text(f"method: pissa\nrank: 3\nout: {tmp_path / 'from_config'}\n")
    code, out = run("init", tiny_llama, "--config", cfg, "--rank", "2")
    assert code == 0, out
    manifest = json.loads((tmp_path / "from_config" / "manifest.json").read_text())
    assert manifest["config"]["method"] == "pissa" and manifest["config"]["options"]["rank"] == 2
