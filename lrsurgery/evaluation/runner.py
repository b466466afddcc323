"""Score every model on every task; the results JSON and the side-by-side Markdown table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lrsurgery import __version__
from lrsurgery.errors import check_choice, check_count
from lrsurgery.evaluation.classify import score_classification
from lrsurgery.evaluation.generate import score_generate
from lrsurgery.evaluation.loglik import score_multiple_choice, score_rolling
from lrsurgery.evaluation.tasks import Task, TaskError
from lrsurgery.hf.load import LoadedModel, compute_device, default_task, load_model
from lrsurgery.hf.resolve import model_fingerprint, resolve_model
from lrsurgery.io.artifacts import MANIFEST, fingerprint_weights
from lrsurgery.io.outputs import output_file

SCORERS = {
    "multiple_choice": score_multiple_choice,
    "loglikelihood_rolling": score_rolling,
    "classification": score_classification,
}
DETAILS = ("loglikelihoods", "generations")  # per-document outputs kept out of the report


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def load_for_eval(
    spec: str, task: Task, dtype: str = "fp32", device: str = "cpu"
) -> tuple[LoadedModel, dict[str, Any]]:
    """Load a model folder/name, or an init/train artifact applied to its base model in memory, in `dtype`,
    and move it to `device` (the host holds one copy of the weights in `dtype` while loading).

    Returns the model and what identifies it: source, fingerprint (of the weights; for an artifact
    the base model's and the adapter files'), artifact kind, dtype, device.
    """
    loaded, info = _load_on_host(spec, task, dtype)
    loaded.model.to(compute_device(device))
    return loaded, {**info, "device": device}


def _load_on_host(spec: str, task: Task, dtype: str) -> tuple[LoadedModel, dict[str, Any]]:
    from lrsurgery.stages.adapted import load_adapted

    classification = task.output_type == "classification"
    if (Path(spec) / MANIFEST).is_file():
        head = "classification" if classification else None
        loaded, manifest = load_adapted(Path(spec), task=head, dtype=DTYPES[dtype])
        if not classification and manifest.extra.get("head", {}).get("task") == "classification":
            raise TaskError(f"task {task.task} ({task.output_type}) needs a causal LM; {spec} is a classifier")
        adapter = fingerprint_weights(sorted(Path(spec).glob("*.safetensors")))
        info = {
            "source": spec,
            "artifact": manifest.kind,
            "fingerprint": adapter,
            "base_fingerprint": manifest.model.get("fingerprint"),
            "dtype": dtype,
        }
        return loaded, info
    folder = resolve_model(spec)
    if classification:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        loaded = load_model(spec, task="classification", num_labels=config.num_labels, dtype=DTYPES[dtype])
    else:
        if default_task(folder) != "causal":
            raise TaskError(
                f"task {task.task} ({task.output_type}) needs a causal language model; "
                f"{spec} is saved as an encoder without a language-model head"
            )
        loaded = load_model(spec, task="causal", dtype=DTYPES[dtype])
    return loaded, {"source": spec, "fingerprint": model_fingerprint(loaded.folder), "dtype": dtype}


def score(
    task: Task,
    loaded: LoadedModel,
    docs: list[dict[str, Any]],
    batch_size: int = 8,
    allow_code_execution: bool = False,
) -> dict[str, Any]:
    """The task's metrics on `docs` (with per-document details under 'loglikelihoods'/'generations')."""
    if task.output_type == "generate_until":
        return score_generate(task, loaded, docs, batch_size, allow_code_execution)
    return SCORERS[task.output_type](task, loaded, docs, batch_size)


def run_eval(
    models: list[str],
    task_files: list[Path],
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    allow_code_execution: bool = False,
    dtype: str = "fp32",
    device: str = "cpu",
) -> dict[str, Any]:
    """Score every model on every task, each model loaded in `dtype` (fp32, bf16, fp16 or fp64) and run
    on `device` (cpu, cuda or cuda:N).

    Returns {'results': {model: {task: {metric, metric_stderr, ..., n, num_fewshot, config_hash}}},
    'models': {model: {source, fingerprint, ...}}, 'lrsurgery_version'}.
    """
    from lrsurgery.progress import quiet_libraries

    quiet_libraries()
    check_choice("--dtype", dtype, tuple(DTYPES))
    check_count("--batch-size", batch_size)
    check_count("--limit", limit)
    check_count("--num-fewshot", num_fewshot, 0)
    compute_device(device)  # a device that is not there is refused before any data or model is read
    for spec in models:  # every model found before the first is scored: a typo in the last fails at once
        if not (Path(spec) / MANIFEST).is_file():
            resolve_model(spec)
    tasks = [Task.from_yaml(p, num_fewshot=num_fewshot) for p in task_files]
    docs = {t.task: t.docs(limit) for t in tasks}  # load (and check) all data before any model
    for t in tasks:
        if "pass@1" in [m["metric"] for m in t.metrics] and not allow_code_execution:
            raise TaskError(f"task {t.task} runs model-written code to score pass@1; pass --allow-code-execution")
    results: dict[str, dict[str, Any]] = {}
    models_info: dict[str, Any] = {}
    for spec in models:
        results[spec] = {}
        cache: dict[bool, tuple[LoadedModel, dict[str, Any]]] = {}  # one load per model and head kind
        for task in tasks:
            kind = task.output_type == "classification"
            if kind not in cache:
                cache[kind] = load_for_eval(spec, task, dtype, device)
            loaded, info = cache[kind]
            models_info[spec] = info
            metrics = score(task, loaded, docs[task.task], batch_size, allow_code_execution)
            metrics = {k: v for k, v in metrics.items() if k not in DETAILS}
            results[spec][task.task] = {
                **metrics,
                "num_fewshot": task.num_fewshot or 0,
                "config_hash": task.config_hash,
            }
    return {"results": results, "models": models_info, "lrsurgery_version": __version__}


def stderr_key(metric: str) -> str:
    """lm-eval's key for a metric's standard error: 'acc' → 'acc_stderr',
    'exact_match,strict-match' → 'exact_match_stderr,strict-match'."""
    name, sep, filt = metric.partition(",")
    return f"{name}_stderr{sep}{filt}"


def markdown_table(report: dict[str, Any]) -> str:
    """One row per (task, metric), one column per model: 'value ± stderr'."""
    models = list(report["results"])
    lines = ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    first = report["results"][models[0]]
    for task, metrics in first.items():
        for metric in metrics:
            if "_stderr" in metric or metric in ("config_hash", "n", "num_fewshot"):
                continue
            cells = []
            for m in models:
                row = report["results"][m][task]
                value, err = row[metric], row.get(stderr_key(metric))
                cell = f"{value:.4f}" if value is not None and not math.isnan(value) else "nan"
                cells.append(cell + (f" ± {err:.4f}" if err is not None else ""))
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RESULTS = "eval results file"  # the kind of output `eval -o` writes


def results_kind(path: Path) -> str | None:
    """RESULTS when `path` is a results JSON that `lrsurgery eval -o` wrote, else None."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return RESULTS if isinstance(report, dict) and "results" in report and "lrsurgery_version" in report else None


def results_file(out: Path, inputs: list[str | Path], overwrite: bool = False) -> Any:
    """The results file `out` by the output protocol (io/outputs.py), held from before any scoring (so a
    path that cannot be written is refused at once) to the end; yields the temporary path to write."""
    return output_file(out, RESULTS, results_kind, inputs, overwrite)


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the results JSON (NaN written as null) to `path`."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    Path(path).write_text(json.dumps(clean(report), indent=2))
