"""`lrsurgery compare`: every method of a comparison file, on the same data, steps, schedule and seeds, at an
equal trainable budget, from one calibration; then the tables, figures and report (comparison/report.py).

Each stage runs as its own `lrsurgery` process, exactly as a user's shell pipeline would (so each run's
peak memory is its own), writing its artifact into the results folder:

    RESULTS/lrsurgery_compare.json     what was compared (the settings every run must share)
    RESULTS/data/                      `lrsurgery assets` output, when the data is an offline package
    RESULTS/stats/                     the one calibration (when a method reads statistics)
    RESULTS/runs/METHOD/seedN/         init.yaml, init/, train.yaml, train/, score.json, timing.json
    RESULTS/results.json, table.md, table.csv, *.png, report.md

Every artifact is written atomically by its stage, so a run is either finished or absent: an interrupted
comparison, run again with the same command, keeps the finished runs (a train interrupted after a
checkpoint continues with `--resume`) and does the rest. A folder that is not a comparison, or one run
with other settings, is refused (`--overwrite` replaces a comparison folder as a whole); adding seeds or
methods to a comparison reuses the runs it has."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from lrsurgery import __version__
from lrsurgery.comparison.config import CompareError, Comparison, takes_stats
from lrsurgery.io.artifacts import file_digest
from lrsurgery.io.outputs import OutputError, check_output, lock_for, write_text_atomic

MARKER = "lrsurgery_compare.json"
PINNED = ("model", "data", "calibrate", "train", "score", "budget")  # what every run of a comparison shares


def run_compare(comparison: Comparison, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Run every (method, seed) of `comparison` into the results folder `out` that is not there yet, then
    collect and report; return the collected results (comparison/report.py `collect`)."""
    from lrsurgery.comparison.report import collect, write_report

    out = Path(out).absolute()
    with lock_for(out):
        _open_results(comparison, out, overwrite)
        data = _prepare_data(comparison, out)
        stats = _calibrate(comparison, out, data) if comparison.needs_stats else None
        shapes = target_shapes(comparison.model)
        # the model before any training, on the same task; a classifier's head is trained by every run, so
        # the base model has none to score
        if comparison.data.get("task") != "classification" and not (out / "base_score.json").is_file():
            _score(comparison, out, comparison.model, out / "base_score.json")
        for label in comparison.methods:
            for seed in comparison.seeds:
                _run_one(comparison, out, label, seed, data, stats, shapes)
        results = collect(comparison, out)
        write_report(comparison, out, results)
    return results


def _record(comparison: Comparison) -> dict[str, Any]:
    setting = {k: v for k, v in asdict(comparison).items() if k in PINNED}
    setting["score"] = _pinned_score(setting["score"])
    return json.loads(json.dumps({"name": comparison.name, "setting": setting, "methods": comparison.methods}))


def _pinned_score(score: dict[str, Any]) -> dict[str, Any]:
    """The score section as the marker pins it: the task file by its name and content, not its absolute path,
    so a checkout moved elsewhere takes up its comparisons. A marker that recorded a path (an earlier
    version) is read the same way while that file exists."""
    task = str(score.get("task", ""))
    if task.startswith("/") and Path(task).is_file():
        task = f"{Path(task).name} sha256:{file_digest(Path(task))[:16]}"
    return {**score, "task": task}


def _open_results(comparison: Comparison, out: Path, overwrite: bool) -> None:
    """Create `out`, or take up the comparison already there when its settings match (see module doc)."""
    marker = out / MARKER
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not marker.is_file():
            raise OutputError(f"{out} exists and is not an lrsurgery comparison; choose another output path")
        if overwrite:
            shutil.rmtree(out)
    if not marker.is_file():  # a new folder: checked as every stage checks its output
        check_output(out, [comparison.source])
    current = _record(comparison)
    if marker.is_file():
        before = json.loads(marker.read_text())
        if "score" in before.get("setting", {}):
            before["setting"]["score"] = _pinned_score(before["setting"]["score"])
        changed = [k for k in current["setting"] if before.get("setting", {}).get(k) != current["setting"][k]]
        earlier = before.get("methods", {})
        changed += [f"methods.{m}" for m, opts in current["methods"].items() if m in earlier and earlier[m] != opts]
        if changed:
            raise OutputError(
                f"{out} holds a comparison run with other settings ({', '.join(changed)}); choose another output "
                "path, or --overwrite to start it over"
            )
        current["methods"] = {**before.get("methods", {}), **current["methods"]}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps({**current, "lrsurgery_version": __version__}, indent=2))


def lrsurgery(*args: Any, env: dict[str, str] | None = None) -> float:
    """Run `lrsurgery ARGS` as its own process (its output shown); return its wall time in seconds."""
    began = time.perf_counter()
    command = [sys.executable, "-m", "lrsurgery", *map(str, args)]
    done = subprocess.run(command, env={**os.environ, **(env or {})}, check=False)
    if done.returncode != 0:
        raise CompareError(f"`lrsurgery {' '.join(map(str, args))}` failed (exit {done.returncode}); see above")
    return time.perf_counter() - began


def _prepare_data(comparison: Comparison, out: Path) -> dict[str, str]:
    """The data options of every stage: train and test files (absolute) and the templates."""
    data = dict(comparison.data)
    if "assets" in data:
        folder = out / "data"
        if not (folder / "test.jsonl").is_file():
            lrsurgery("assets", data["assets"], "-o", folder)
        data.update(train=str(folder / "train.jsonl"), test=str(folder / "test.jsonl"))
        data.pop("assets")
    return data


def _data_options(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("train", "test")}


def _calibrate(comparison: Comparison, out: Path, data: dict[str, Any]) -> Path:
    stats = out / "stats"
    if not (stats / "manifest.json").is_file():
        options = {**_data_options(data), **comparison.calibrate, "data": data["train"]}
        options.pop("task", None)  # calibration reads the text (a classification label is not a response)
        config = _write_yaml(out / "calibrate.yaml", options)
        lrsurgery("calibrate", comparison.model, "--config", config, *_resume(stats), "-o", stats)
    return stats


def _resume(artifact: Path) -> list[str]:
    """`--resume` when an interrupted stage left its work folder (with a checkpoint) for `artifact`."""
    return ["--resume"] if artifact.with_name(artifact.name + ".partial").is_dir() else []


def _write_yaml(path: Path, options: dict[str, Any]) -> Path:
    write_text_atomic(path, yaml.safe_dump(options, sort_keys=False, allow_unicode=True))
    return path


def target_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every default target linear of `model`, read from its config alone."""
    from lrsurgery.hf.load import empty_model
    from lrsurgery.hf.resolve import resolve_model
    from lrsurgery.hf.tree import backbone, find_targets

    empty = empty_model(resolve_model(model), buffers=False)
    root = backbone(empty)
    return {n: tuple(root.get_submodule(n).weight.shape) for n in find_targets(empty)}


def run_folder(out: Path, label: str, seed: int) -> Path:
    """Where the run of the method entry `label` with `seed` lives in the results folder `out`."""
    return out / "runs" / label / f"seed{seed}"


def _run_one(comparison, out, label, seed, data, stats, shapes) -> None:
    """init → train (held-out loss along the way) → score of one method entry and seed, each skipped when
    done."""
    from lrsurgery.methods.base import registered

    folder = run_folder(out, label, seed)
    folder.mkdir(parents=True, exist_ok=True)
    timing_file = folder / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    method = comparison.method_of(label)
    options = {**registered()[method].budget_options(comparison.budget, shapes), **comparison.methods[label]["init"]}
    if takes_stats(method) and stats is not None:
        options.setdefault("stats", str(stats))
    if not (folder / "init" / "manifest.json").is_file():
        config = _write_yaml(folder / "init.yaml", {"method": method, "seed": seed, **options})
        timing["init_seconds"] = lrsurgery("init", comparison.model, "--config", config, "-o", folder / "init")
        write_text_atomic(timing_file, json.dumps(timing))
    train = folder / "train"
    if not (train / "manifest.json").is_file():
        settings = {
            **_data_options(data),
            "data": data["train"],
            "eval_data": data["test"],
            **comparison.train,
            **comparison.methods[label]["train"],
            "seed": seed,
        }
        config = _write_yaml(folder / "train.yaml", settings)
        lrsurgery("train", folder / "init", "--config", config, *_resume(train), "-o", train)
    if not (folder / "score.json").is_file():
        _score(comparison, out, train, folder / "score.json")


def _score(comparison: Comparison, out: Path, model: str | Path, results: Path) -> None:
    """`lrsurgery eval` of `model` (a model or an artifact) on the comparison's task into `results`."""
    env = {k: str(out / v) for k, v in comparison.score.get("env", {}).items()}
    limit = ["--limit", comparison.score["limit"]] if comparison.score.get("limit") else []
    device = ["--device", comparison.score["device"]] if comparison.score.get("device") else []
    lrsurgery("eval", model, "--task", comparison.score["task"], *limit, *device, "-o", results, env=env)
