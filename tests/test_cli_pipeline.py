"""The stages composed through the CLI, as users script them: init → train → fuse → eval."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from helpers import EXAMPLES, cli


def invoke(*args) -> str:
    code, output = cli(*args)
    assert code == 0, output
    return output


def test_cli_pipeline_with_config_file(tiny_llama, bbc, tmp_path, monkeypatch):
    config = yaml.safe_load((EXAMPLES / "configs" / "bbc_sft.yaml").read_text())
    config.update(data=str(bbc / "train.jsonl"), max_steps=3, batch_size=2, save_every=2, limit=16)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    invoke("init", tiny_llama, "--method", "pissa", "--rank", "4", "-o", tmp_path / "init")
    invoke("train", tmp_path / "init", "--config", tmp_path / "train.yaml", "--lr", "1e-2", "-o", tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["train"]["lr"] == 1e-2 and manifest["config"]["train"]["max_steps"] == 3
    assert manifest["config"]["data"]["prompt_template"] == "Article: {text:.400}\nTopic:"
    invoke("fuse", tmp_path / "run", "-o", tmp_path / "merged")
    monkeypatch.setenv("BBC_DATA", str(bbc))
    out = invoke(
        "eval",
        tiny_llama,
        tmp_path / "run",
        tmp_path / "merged",
        "--task",
        EXAMPLES / "tasks" / "bbc_topic.yaml",
        "--limit",
        "5",
        "-o",
        tmp_path / "results.json",
    )
    assert "| bbc_topic | acc |" in out
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    adapter = results[str(tmp_path / "run")]["bbc_topic"]
    merged = results[str(tmp_path / "merged")]["bbc_topic"]
    assert adapter["n"] == 5 and adapter["acc"] == merged["acc"] and adapter["acc_norm"] == merged["acc_norm"]


def test_classification_through_cli(tiny_bert, bbc, tmp_path, monkeypatch):
    invoke("init", tiny_bert, "--method", "lora", "--rank", "4", "-o", tmp_path / "init")
    invoke(
        "train",
        tmp_path / "init",
        "--data",
        bbc / "train.jsonl",
        "--task",
        "classification",
        "--limit",
        "32",
        "--seq-len",
        "64",
        "--max-steps",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "-o",
        tmp_path / "run",
    )
    invoke("fuse", tmp_path / "run", "-o", tmp_path / "merged")
    task = {
        "task": "bbc_cls",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "${BBC_DATA}/test.jsonl"}},
        "test_split": "test",
        "output_type": "classification",
        "doc_to_text": "text",
        "doc_to_target": "label",
    }
    (tmp_path / "cls.yaml").write_text(yaml.safe_dump(task))
    monkeypatch.setenv("BBC_DATA", str(bbc))
    invoke("eval", tmp_path / "run", tmp_path / "merged", "--task", tmp_path / "cls.yaml", "-o", tmp_path / "r.json")
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    a, b = (results[str(tmp_path / name)]["bbc_cls"] for name in ("run", "merged"))
    assert a["n"] == 20 and a["acc"] == b["acc"] and a["f1_macro"] == b["f1_macro"]


def _console_script(code: str, *args: str) -> subprocess.CompletedProcess:
    """`lrsurgery ARGS` in a fresh process, after `code` has run there."""
    script = f"import sys; {code}; from lrsurgery.cli import main; sys.argv = ['lrsurgery', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)


def test_the_console_script_exits_with_its_status_after_threads_and_exit_handlers():
    """main() leaves by os._exit, skipping the interpreter's teardown: what must happen before a process
    ends still does, and the exit status is the command's."""
    code = (
        "import atexit, threading, time; atexit.register(lambda: print('exit handler ran')); "
        "threading.Thread(target=lambda: (time.sleep(0.5), print('thread finished', flush=True))).start()"
    )
    done = _console_script(code, "presets")
    assert done.returncode == 0, done.stderr
    after = [line for line in done.stdout.splitlines() if not line.startswith("|")]  # below the presets table
    assert "tlora" in done.stdout and after == ["thread finished", "exit handler ran"], done.stdout
    refused = _console_script("pass", "presets", "--no-such-flag")
    assert refused.returncode == 2 and refused.stderr.startswith("error:"), refused.stderr
    missing = _console_script("pass", "inspect", "/no/such/artifact")
    assert missing.returncode == 1 and missing.stderr.startswith("error: /no/such/artifact"), missing.stderr
