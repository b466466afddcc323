"""Metric aggregation and standard errors (lm-eval's definitions).

Per-document 0/1 metrics (acc, acc_norm, acc_bytes, exact_match, pass@1) aggregate by the mean, with
the sample standard error of the mean sqrt(Σ(x−x̄)²/(n−1)/n). Corpus metrics (f1, mcc, pearson,
spearman) get a bootstrap standard error: `BOOTSTRAP_ITERS` resamples of the documents with a
fixed seed (lm-eval bootstraps the same metrics, with 100,000 resamples by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

BOOTSTRAP_ITERS = 1000
BOOTSTRAP_SEED = 1234


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard error of the mean; None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def f1(golds: Sequence[int], preds: Sequence[int]) -> float:
    """Binary F1 of class 1 (sklearn's default, lm-eval's `f1`); macro F1 over classes when there
    are more than two."""
    labels = sorted(set(golds) | set(preds))
    if set(labels) <= {0, 1}:
        return _f1_of(golds, preds, 1)
    return f1_macro(golds, preds)


def f1_macro(golds: Sequence[int], preds: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over every class seen in golds or predictions."""
    labels = sorted(set(golds) | set(preds))
    return float(np.mean([_f1_of(golds, preds, c) for c in labels]))


def _f1_of(golds: Sequence[int], preds: Sequence[int], c: int) -> float:
    tp = sum(p == c and g == c for g, p in zip(golds, preds, strict=True))
    fp = sum(p == c and g != c for g, p in zip(golds, preds, strict=True))
    fn = sum(p != c and g == c for g, p in zip(golds, preds, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def mcc(golds: Sequence[int], preds: Sequence[int]) -> float:
    """Matthews correlation (multiclass form, as sklearn.metrics.matthews_corrcoef); 0 when undefined."""
    labels = sorted(set(golds) | set(preds))
    index = {c: i for i, c in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)))
    for g, p in zip(golds, preds, strict=True):
        confusion[index[g], index[p]] += 1
    t, p = confusion.sum(1), confusion.sum(0)
    c, s = np.trace(confusion), confusion.sum()
    denom = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denom) if denom else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / denom) if denom else float("nan")


def _ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    values = np.asarray(x, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_ranks(x), _ranks(y))


def bootstrap_stderr(fn: Callable[[list, list], float], pairs: Sequence[tuple[Any, Any]]) -> float | None:
    """Standard deviation of fn(golds, preds) over resamples of the (gold, pred) pairs."""
    if len(pairs) < 2:
        return None
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    golds, preds = [g for g, _ in pairs], [p for _, p in pairs]
    values = []
    for _ in range(BOOTSTRAP_ITERS):
        idx = rng.integers(0, len(pairs), len(pairs))
        values.append(fn([golds[i] for i in idx], [preds[i] for i in idx]))
    return float(np.std(values, ddof=1))


CORPUS: dict[str, Callable[[list, list], float]] = {
    "f1": f1,
    "f1_macro": f1_macro,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
}


def aggregate(task: Any, items: dict[str, list[Any]]) -> dict[str, Any]:
    """Aggregate per-document items for the task's metrics: {metric, metric_stderr, ..., 'n'}.

    `items[name]` holds floats for mean metrics and (gold, prediction) pairs for corpus metrics.
    """
    out: dict[str, Any] = {}
    n = 0
    for entry in task.metrics:
        name = entry["metric"]
        values = items[name]
        n = len(values)
        if name in CORPUS:
            golds, preds = [g for g, _ in values], [p for _, p in values]
            out[name] = CORPUS[name](golds, preds)
            out[f"{name}_stderr"] = bootstrap_stderr(CORPUS[name], values)
        else:
            out[name] = mean(values)
            out[f"{name}_stderr"] = mean_stderr(values)
    out["n"] = n
    return out
