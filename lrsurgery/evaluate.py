"""The `eval` stage: score models on tasks described by lm-evaluation-harness-style YAML files.

Supported output types: `multiple_choice` (acc / acc_norm by summed continuation log-likelihood, as
lm-eval defines them), `loglikelihood_rolling` (token, word and byte perplexity, bits per byte) and
`classification` (accuracy and macro-F1 of a sequence-classification head). Field names follow
lm-eval: task, dataset_path, dataset_name, dataset_kwargs, test_split, doc_to_text, doc_to_target,
doc_to_choice, target_delimiter, description, metric_list. Templates are Jinja; a template that names
a column returns that column. `${VAR}` in dataset_kwargs is expanded from the environment.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from lrsurgery import __version__
from lrsurgery.artifacts import MANIFEST
from lrsurgery.models import LoadedModel, load_model, model_fingerprint
from lrsurgery.progress import progress

OUTPUT_TYPES = ("multiple_choice", "loglikelihood_rolling", "classification")


class TaskError(ValueError):
    """A task file is invalid or its data lacks what the templates need."""


@dataclass
class Task:
    task: str
    dataset_path: str
    output_type: str
    doc_to_target: Any = None
    doc_to_text: Any = ""
    doc_to_choice: Any = None
    dataset_name: str | None = None
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    test_split: str | None = None
    validation_split: str | None = None
    target_delimiter: str = " "
    description: str = ""
    metric_list: list[dict[str, Any]] = field(default_factory=list)
    max_length: int | None = None
    source_hash: str = ""

    @classmethod
    def from_yaml(cls, path: Path) -> Task:
        text = Path(path).read_text()
        raw = yaml.safe_load(text)
        if not isinstance(raw, dict):
            raise TaskError(f"{path} is not a task file (a YAML mapping)")
        known = set(cls.__dataclass_fields__)
        raw = {k: v for k, v in raw.items() if k in known}
        for required in ("task", "dataset_path", "output_type"):
            if required not in raw:
                raise TaskError(f"{path} has no '{required}' field")
        if raw["output_type"] not in OUTPUT_TYPES:
            raise TaskError(f"{path}: output_type {raw['output_type']!r} is not one of {', '.join(OUTPUT_TYPES)}")
        raw["source_hash"] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return cls(**raw)

    def docs(self, limit: int | None = None) -> list[dict[str, Any]]:
        import datasets

        split = self.test_split or self.validation_split
        if not split:
            raise TaskError(f"task {self.task} names no test_split or validation_split")
        kwargs = _expand(self.dataset_kwargs)
        try:
            dataset = datasets.load_dataset(self.dataset_path, self.dataset_name, split=split, **kwargs)
        except (FileNotFoundError, ValueError) as exc:
            raise TaskError(f"task {self.task}: cannot load its data: {exc}") from exc
        rows = list(dataset)
        return rows[:limit] if limit else rows


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def render(template: Any, doc: dict[str, Any]) -> Any:
    """lm-eval semantics: a column name returns the column; a list is returned as is; else Jinja."""
    import jinja2

    if template is None or isinstance(template, (list, int)):
        return template
    if template in doc:
        return doc[template]
    try:
        return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template).render(**doc)
    except jinja2.UndefinedError as exc:
        raise TaskError(f"template {template!r} names a field the data lacks: {exc}") from exc


def choices_of(task: Task, doc: dict[str, Any]) -> list[str]:
    value = render(task.doc_to_choice, doc)
    if isinstance(value, str):
        value = ast.literal_eval(value)
    return [str(v) for v in value]


def target_index(task: Task, doc: dict[str, Any], choices: list[str]) -> int:
    value = render(task.doc_to_target, doc)
    if isinstance(value, int):
        return value
    value = str(value)
    if value in choices:
        return choices.index(value)
    if value.isdigit():
        return int(value)
    raise TaskError(f"target {value!r} is neither a choice index nor one of the choices {choices}")


def encode_pair(tok: Any, context: str, continuation: str) -> tuple[tuple[int, ...], list[int]]:
    """lm-eval's `_encode_pair`: trailing context whitespace moves onto the continuation, the pair
    is encoded whole, and the continuation is what follows the context's own token count."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return (tok.eos_token_id,), tok(continuation, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    return tuple(whole[:n_ctx]), whole[n_ctx:]


@torch.no_grad()
def continuation_logprobs(loaded: LoadedModel, requests: list[tuple[str, str]], desc: str) -> list[float]:
    """Sum of log-probabilities of each continuation given its context (lm-eval's loglikelihood).

    Requests sharing a context (the choices of one question) run the context once and score all
    continuations from its key/value cache, instead of re-running the context per choice.
    """
    from transformers import DynamicCache

    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(loaded.tokenizer, context, continuation)
        groups.setdefault(ctx, []).append((i, cont))
    out = [0.0] * len(requests)
    limit = _max_len(loaded)
    pad = loaded.tokenizer.pad_token_id
    for ctx, members in progress(groups.items(), desc=desc, unit="context", total=len(groups)):
        longest = max(len(c) for _, c in members)
        ctx = ctx[-(limit - longest) :]
        cache = DynamicCache()
        first = loaded.model(input_ids=torch.tensor([ctx]), past_key_values=cache, use_cache=True).logits[0, -1]
        first = F.log_softmax(first.float(), dim=-1)
        scores = [float(first[cont[0]]) for _, cont in members]
        if longest > 1:
            cache.batch_repeat_interleave(len(members))
            ids = torch.full((len(members), longest - 1), pad, dtype=torch.long)
            mask = torch.zeros((len(members), len(ctx) + longest - 1), dtype=torch.long)
            mask[:, : len(ctx)] = 1
            for row, (_, cont) in enumerate(members):
                ids[row, : len(cont) - 1] = torch.tensor(cont[:-1])
                mask[row, len(ctx) : len(ctx) + len(cont) - 1] = 1
            logits = loaded.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for row, (_, cont) in enumerate(members):
                rest = torch.tensor(cont[1:], dtype=torch.long)
                scores[row] += float(logprobs[row, torch.arange(len(rest)), rest].sum())
        for (i, _), score in zip(members, scores, strict=True):
            out[i] = score
    return out


def _max_len(loaded: LoadedModel) -> int:
    return int(getattr(loaded.model.config, "max_position_embeddings", 2048))


def mean_stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score_multiple_choice(task: Task, loaded: LoadedModel, docs: list[dict], batch_size: int) -> dict[str, Any]:
    requests, spans, golds = [], [], []
    for doc in docs:
        context = task.description + str(render(task.doc_to_text, doc))
        choices = choices_of(task, doc)
        golds.append(target_index(task, doc, choices))
        spans.append((len(requests), choices))
        requests.extend((context, task.target_delimiter + c) for c in choices)
    lls = continuation_logprobs(loaded, requests, desc=task.task)
    acc, acc_norm = [], []
    for (start, choices), gold in zip(spans, golds, strict=True):
        scores = lls[start : start + len(choices)]
        normed = [s / len(c) for s, c in zip(scores, choices, strict=True)]
        acc.append(float(max(range(len(scores)), key=scores.__getitem__) == gold))
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == gold))
    return {
        "acc": _mean(acc),
        "acc_stderr": mean_stderr(acc),
        "acc_norm": _mean(acc_norm),
        "acc_norm_stderr": mean_stderr(acc_norm),
        "n": len(docs),
    }


@torch.no_grad()
def score_rolling(task: Task, loaded: LoadedModel, docs: list[dict], batch_size: int) -> dict[str, Any]:
    """Disjoint windows of the model's context length, each token predicted once (lm-eval rolling)."""
    tok = loaded.tokenizer
    window = min(task.max_length or _max_len(loaded), _max_len(loaded))
    total_ll, tokens, words, nbytes = 0.0, 0, 0, 0
    for doc in progress(docs, desc=task.task, unit="doc"):
        text = str(render(task.doc_to_target, doc))
        ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor(ids[start : start + window + 1])[None]
            logprobs = F.log_softmax(loaded.model(input_ids=chunk[:, :-1]).logits.float(), dim=-1)
            total_ll += float(logprobs[0].gather(-1, chunk[0, 1:, None]).sum())
        tokens += len(ids) - 1
        words += len(text.split())
        nbytes += len(text.encode("utf-8"))
    return {
        "token_perplexity": math.exp(-total_ll / tokens),
        "word_perplexity": math.exp(-total_ll / words),
        "byte_perplexity": math.exp(-total_ll / nbytes),
        "bits_per_byte": -total_ll / nbytes / math.log(2),
        "n": len(docs),
    }


@torch.no_grad()
def score_classification(task: Task, loaded: LoadedModel, docs: list[dict], batch_size: int) -> dict[str, Any]:
    id2label = {int(k): str(v) for k, v in loaded.model.config.id2label.items()}
    label2id = {v: k for k, v in id2label.items()}
    preds, golds = [], []
    for i in progress(range(0, len(docs), batch_size), desc=task.task, unit="batch"):
        chunk = docs[i : i + batch_size]
        texts = [str(render(task.doc_to_text, d)) for d in chunk]
        enc = loaded.tokenizer(texts, padding=True, truncation=True, max_length=_max_len(loaded), return_tensors="pt")
        preds += loaded.model(**enc).logits.argmax(-1).tolist()
        for d in chunk:
            gold = str(render(task.doc_to_target, d))
            if gold not in label2id:
                raise TaskError(f"label {gold!r} is not one of the model's labels {sorted(label2id)}")
            golds.append(label2id[gold])
    acc = [float(p == g) for p, g in zip(preds, golds, strict=True)]
    f1s = []
    for c in sorted(set(golds) | set(preds)):
        tp = sum(p == c and g == c for p, g in zip(preds, golds, strict=True))
        fp = sum(p == c and g != c for p, g in zip(preds, golds, strict=True))
        fn = sum(p != c and g == c for p, g in zip(preds, golds, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"acc": _mean(acc), "acc_stderr": mean_stderr(acc), "f1_macro": _mean(f1s), "n": len(docs)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


SCORERS = {
    "multiple_choice": score_multiple_choice,
    "loglikelihood_rolling": score_rolling,
    "classification": score_classification,
}


def load_for_eval(spec: str, task: Task) -> tuple[LoadedModel, dict[str, Any]]:
    """Load a model folder/name, or an init/train artifact applied to its base model in memory."""
    from lrsurgery.surgery import load_adapted

    if (Path(spec) / MANIFEST).is_file():
        loaded, manifest = load_adapted(Path(spec))
        return loaded, {"source": spec, "artifact": manifest.kind, "base_fingerprint": manifest.model["fingerprint"]}
    kind = "classification" if task.output_type == "classification" else "causal"
    if kind == "classification":
        from transformers import AutoConfig

        from lrsurgery.models import resolve_model

        config = AutoConfig.from_pretrained(resolve_model(spec))
        loaded = load_model(spec, task="classification", num_labels=config.num_labels)
    else:
        loaded = load_model(spec, task=kind)
    return loaded, {"source": spec, "fingerprint": model_fingerprint(loaded.folder)}


def run_eval(
    models: list[str], task_files: list[Path], limit: int | None = None, batch_size: int = 8
) -> dict[str, Any]:
    """Score every model on every task; returns {'results': {model: {task: metrics}}, ...}."""
    tasks = [Task.from_yaml(p) for p in task_files]
    results: dict[str, dict[str, Any]] = {}
    models_info = {}
    for spec in models:
        results[spec] = {}
        cache: dict[bool, tuple[LoadedModel, dict[str, Any]]] = {}  # one load per model and head kind
        for task in tasks:
            kind = task.output_type == "classification"
            if kind not in cache:
                cache[kind] = load_for_eval(spec, task)
            loaded, info = cache[kind]
            models_info[spec] = info
            docs = task.docs(limit)
            metrics = SCORERS[task.output_type](task, loaded, docs, batch_size)
            results[spec][task.task] = {**metrics, "config_hash": task.source_hash}
    return {"results": results, "models": models_info, "lrsurgery_version": __version__}


def markdown_table(report: dict[str, Any]) -> str:
    """One row per (task, metric), one column per model."""
    models = list(report["results"])
    lines = ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    first = report["results"][models[0]]
    for task, metrics in first.items():
        for metric in metrics:
            if metric.endswith("_stderr") or metric in ("config_hash", "n"):
                continue
            cells = []
            for m in models:
                value = report["results"][m][task][metric]
                err = report["results"][m][task].get(f"{metric}_stderr")
                cells.append(f"{value:.4f}" + (f" ± {err:.4f}" if err is not None and err == err else ""))
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> None:
    from lrsurgery.artifacts import write_text_atomic

    write_text_atomic(Path(out), json.dumps(report, indent=2))
