"""`classification`: an encoder (or any model) with a sequence-classification head, GLUE metrics.

Prediction = argmax of the head's logits (a single-output head is a regressor, scored by Pearson and
Spearman as STS-B is). Targets are label names from the model's id2label or class indices.
"""

from __future__ import annotations

from typing import Any

import torch

from lrsurgery.evaluation.loglik import max_length
from lrsurgery.evaluation.metrics import aggregate
from lrsurgery.evaluation.tasks import Task, TaskError, render
from lrsurgery.hf.load import LoadedModel
from lrsurgery.linalg.basics import at_least_fp32
from lrsurgery.progress import bar


def _gold(task: Task, doc: dict[str, Any], label2id: dict[str, int], n_labels: int) -> float | int:
    value = task.target(doc)
    if n_labels == 1:
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise TaskError(f"task {task.task}: a regression target must be a number, got {value!r}") from exc
    if isinstance(value, str) and value in label2id:
        return label2id[value]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_labels:
        return value
    raise TaskError(f"task {task.task}: label {value!r} is not one of the model's labels {sorted(label2id)}")


@torch.no_grad()
def score_classification(
    task: Task, loaded: LoadedModel, docs: list[dict[str, Any]], batch_size: int = 8, share_context: bool = True
) -> dict[str, Any]:
    """acc (mean of correct), f1 (binary: class 1; macro when more classes), f1_macro, mcc, pearson, spearman."""
    config = loaded.model.config
    n_labels = int(config.num_labels)
    label2id = {str(v): int(k) for k, v in (config.id2label or {}).items()}
    texts = [str(render(task.doc_to_text, d)) for d in docs]
    pairs = [str(render(task.doc_to_text_pair, d)) for d in docs] if task.doc_to_text_pair else None
    golds = [_gold(task, d, label2id, n_labels) for d in docs]
    order = sorted(range(len(docs)), key=lambda i: -len(texts[i]) - (len(pairs[i]) if pairs else 0))
    preds: list[Any] = [None] * len(docs)
    progress = bar(len(docs), desc=task.task, unit="req")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        enc = loaded.tokenizer(
            [texts[i] for i in chunk],
            [pairs[i] for i in chunk] if pairs else None,
            padding=True,
            truncation=True,
            max_length=max_length(loaded, task),
            return_tensors="pt",
        )
        logits = at_least_fp32(loaded.model(**loaded.inputs(**enc)).logits)
        values = logits[:, 0].tolist() if n_labels == 1 else logits.argmax(-1).tolist()
        for i, value in zip(chunk, values, strict=True):
            preds[i] = value
        progress.update(len(chunk))
    progress.close()
    items: dict[str, list[Any]] = {
        "acc": [float(p == g) for p, g in zip(preds, golds, strict=True)],
        **{name: list(zip(golds, preds, strict=True)) for name in ("f1", "f1_macro", "mcc", "pearson", "spearman")},
    }
    return aggregate(task, items)
