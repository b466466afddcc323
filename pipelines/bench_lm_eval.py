"""Benchmark: `lrsurgery eval` against lm-evaluation-harness itself, both as whole processes, same task files.

For each task file, `lm_eval --model hf` (CPU, fp32) and `lrsurgery eval` score the same documents with
the same batch size, each as a fresh process timed on the wall clock (model load and start-up
included), in turns (the order reversed every other repeat, so a slow spell of a shared machine falls
on both); prints each one's seconds, the median per-repeat ratio lrsurgery / lm-eval, each one's peak
resident memory, and every metric of both with their difference (the scores must be identical).

The task files are written for lm-eval first: ${VAR}s expanded and lrsurgery's extra fields removed
(`max_length` becomes the model's max_length, for both tools). Shipped tasks, with the data from
`lrsurgery assets`: bbc_topic (multiple choice), shakespeare_ppl (rolling perplexity, windows of 512);
written here: bbc_topic_gen (generation, 3-shot: the topic word after three solved articles, drawn per
document), and with the same five solved articles before every document (`sampler: first_n`, as MMLU
and GSM8K-CoT do) bbc_topic_fewshot (multiple choice, 5-shot) and bbc_topic_gen_fixed (generation, 5-shot).

lm-eval is not a dependency of lrsurgery; give the Python that has it (a virtualenv of its own keeps its
requirements away from lrsurgery's):

  python pipelines/bench_lm_eval.py --lm-eval-python /path/to/venv/bin/python [--model smollm2-135m]
                                    [--limit 40] [--repeats 2] [--tasks bbc_topic,shakespeare_ppl,...]

Run it alone: both tools use every core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml

from lrsurgery.evaluation.tasks import expand_environment

HERE = Path(__file__).resolve().parent
TASKS = HERE.parent / "examples" / "tasks"
LRSURGERY = [sys.executable, "-m", "lrsurgery"]
EXTRA_FIELDS = ("max_length",)  # lrsurgery's fields lm-eval does not know

GENERATION_TASK = {  # few-shot examples drawn per document (lm-eval's default sampler): no shared prefix
    "task": "bbc_topic_gen",
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"train": "${BBC_DATA}/train.jsonl", "test": "${BBC_DATA}/test.jsonl"}},
    "output_type": "generate_until",
    "training_split": "train",
    "fewshot_split": "train",
    "test_split": "test",
    "doc_to_text": "Article: {{ text[:300] }}\nTopic:",
    "doc_to_target": "{{ label }}",
    "num_fewshot": 3,
    "generation_kwargs": {"until": ["\n", "Article:"], "do_sample": False, "max_gen_toks": 8},
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True}],
    "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
}
FIXED_SHOTS = {"fewshot_config": {"sampler": "first_n"}}  # the same examples for every document (MMLU's way)
WRITTEN_TASKS = {
    task["task"]: task
    for task in (
        GENERATION_TASK,
        {**GENERATION_TASK, **FIXED_SHOTS, "task": "bbc_topic_gen_fixed", "num_fewshot": 5},
        {
            **yaml.safe_load((TASKS / "bbc_topic.yaml").read_text()),
            **FIXED_SHOTS,
            "task": "bbc_topic_fewshot",
            "dataset_kwargs": GENERATION_TASK["dataset_kwargs"],
            "fewshot_split": "train",
            "num_fewshot": 5,
        },
    )
}


def lm_eval_task(source: dict, folder: Path) -> tuple[str, int | None]:
    """Write `source` (a task dict) as an lm-eval task file in `folder`, its data paths' ${VAR}s expanded as
    lrsurgery expands them; (task name, its max_length or None)."""
    task = {**source, "dataset_kwargs": expand_environment(source.get("dataset_kwargs") or {})}
    max_length = task.get("max_length")
    for field in EXTRA_FIELDS:
        task.pop(field, None)
    (folder / f"{task['task']}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return task["task"], max_length


class Run(NamedTuple):
    seconds: float  # wall
    peak_gb: float  # peak resident set
    kernel_s: float  # system CPU time (page faults show here)


def timed(command: list[str], env: dict[str, str]) -> Run:
    """Wall time, peak RSS and kernel time of one process (its output is not kept); a failure stops the
    benchmark with its stderr's end."""
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - began
        if (code := os.waitstatus_to_exitcode(status)) != 0:
            stderr.seek(0)
            sys.exit(f"{command[0]} {command[1]} failed ({code}):\n{stderr.read()[-3000:]}")
    return Run(seconds, usage.ru_maxrss / 2**20, usage.ru_stime)  # ru_maxrss is in KiB on Linux


def lm_eval_scores(folder: Path, task: str) -> dict[str, float]:
    """The metrics lm-eval wrote for `task` (its newest results file under `folder`)."""
    newest = max(folder.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    row = json.loads(newest.read_text())["results"][task]
    # lm-eval names a metric "acc,none" when no filter is set; lrsurgery names it "acc"
    return {k.removesuffix(",none"): v for k, v in row.items() if isinstance(v, float) and "_stderr" not in k}


def lrsurgery_scores(path: Path, task: str) -> dict[str, float]:
    """The metrics `lrsurgery eval -o` wrote for `task`."""
    (row,) = (models[task] for models in json.loads(path.read_text())["results"].values())
    return {k: v for k, v in row.items() if isinstance(v, float) and "_stderr" not in k}


def add_arguments(parser: argparse.ArgumentParser, tasks: str) -> None:
    """The options this benchmark and `profile_eval.py` share; `tasks` is the default task list."""
    parser.add_argument("--lm-eval-python", required=True, help="a Python with lm_eval installed")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default=tasks)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None, help="folder for data, task files and results")


@dataclass
class Setup:
    """What both tools' commands need: the work folder, the environment with the data paths, the model."""

    work: Path
    env: dict[str, str]
    model: str


@dataclass
class Commands:
    """One task's two commands and where each writes its scores."""

    task: str
    lm_eval: list[str]
    lrsurgery: list[str]
    lm_eval_out: Path
    lrsurgery_out: Path


def prepare(args: argparse.Namespace) -> Setup:
    """Write the data (`lrsurgery assets`) under the work folder once and resolve the model."""
    from lrsurgery.hf.resolve import resolve_model

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_lm_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LRSURGERY_NO_PROGRESS": "1"}
    for name, var in (("bbc-news", "BBC_DATA"), ("shakespeare", "SHAKESPEARE_DATA")):
        data = work / "data" / name
        if not (data / "test.jsonl").exists():
            subprocess.run(
                [sys.executable, "-m", "lrsurgery", "assets", name, "-o", str(data)],
                env=env,
                check=True,
                capture_output=True,
            )
        env[var] = os.environ[var] = str(data)
    return Setup(work, env, str(resolve_model(args.model)))


def commands(name: str, setup: Setup, args: argparse.Namespace) -> Commands:
    """Write task `name`'s file for each tool and return both tools' command lines for it."""
    tasks = setup.work / "tasks"
    tasks.mkdir(exist_ok=True)
    shipped = TASKS / f"{name}.yaml"
    source = WRITTEN_TASKS[name] if name in WRITTEN_TASKS else yaml.safe_load(shipped.read_text())
    task, max_length = lm_eval_task(source, tasks)
    model_args = f"pretrained={setup.model},dtype=float32" + (f",max_length={max_length}" if max_length else "")
    theirs_out, ours_out = setup.work / "lm_eval" / task, setup.work / "lrsurgery" / f"{task}.json"
    ours_out.parent.mkdir(parents=True, exist_ok=True)
    theirs_cmd = [args.lm_eval_python, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", task,
                  "--include_path", str(tasks), "--limit", str(args.limit), "--batch_size", str(args.batch_size),
                  "--device", "cpu", "--output_path", str(theirs_out)]  # fmt: skip
    ours_task = tasks / f"{task}.yaml"
    if max_length:  # lm-eval's max_length is the model's; lrsurgery reads it from the task file
        ours_task = setup.work / "lrsurgery" / f"{task}.yaml"  # not in lm-eval's include path
        ours_task.write_text((tasks / f"{task}.yaml").read_text() + f"max_length: {max_length}\n")
    ours_cmd = [*LRSURGERY, "eval", setup.model, "--task", str(ours_task), "--limit", str(args.limit),
                "--batch-size", str(args.batch_size), "-o", str(ours_out), "--overwrite"]  # fmt: skip
    return Commands(task, theirs_cmd, ours_cmd, theirs_out, ours_out)


def score_line(pair: Commands) -> str:
    """Every metric lm-eval wrote, with lrsurgery's value and their difference."""
    theirs, ours = lm_eval_scores(pair.lm_eval_out, pair.task), lrsurgery_scores(pair.lrsurgery_out, pair.task)
    return "; ".join(
        f"{k} {theirs[k]:.6g} / {ours.get(k, float('nan')):.6g} / {abs(theirs[k] - ours.get(k, float('nan'))):.1e}"
        for k in sorted(theirs)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, "bbc_topic,shakespeare_ppl,bbc_topic_gen,bbc_topic_fewshot,bbc_topic_gen_fixed")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    setup = prepare(args)

    print(
        f"model {args.model}, CPU fp32, {args.limit} documents per task, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs; whole processes, {args.repeats} repeats in turns"
    )
    print(
        f"{'task':18}{'lm-eval s':>11}{'lrsurgery s':>13}{'ratio':>8}{'peak GB':>14}"
        "  scores (lm-eval / lrsurgery / difference)"
    )
    for name in args.tasks.split(","):
        pair = commands(name, setup, args)
        runs: dict[str, list[Run]] = {"lm-eval": [], "lrsurgery": []}
        for repeat in range(args.repeats):
            order = [("lm-eval", pair.lm_eval), ("lrsurgery", pair.lrsurgery)]
            for who, command in order if repeat % 2 == 0 else order[::-1]:
                runs[who].append(timed(command, setup.env))
        theirs, ours = ([run.seconds for run in runs[who]] for who in ("lm-eval", "lrsurgery"))
        ratio = statistics.median(o / t for o, t in zip(ours, theirs, strict=True))
        peaks = "/".join(f"{max(run.peak_gb for run in runs[who]):.2f}" for who in ("lm-eval", "lrsurgery"))
        print(f"{pair.task:18}{statistics.median(theirs):>11.1f}{statistics.median(ours):>13.1f}{ratio:>8.3f}"
              f"{peaks:>14}  {score_line(pair)}")  # fmt: skip


if __name__ == "__main__":
    main()
