"""What a task file may say, and the checks of a loaded task: output types, metrics, field types and
ranges, generation settings and filters. Every refusal is a TaskError naming the file and the field."""

from __future__ import annotations

import math
import re
from typing import Any

from lrsurgery.errors import UserError

OUTPUT_TYPES = ("multiple_choice", "loglikelihood_rolling", "generate_until", "classification")

# Metrics each output type can compute (lm-eval names; pass@1 is HumanEval's).
METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm", "acc_bytes", "f1", "mcc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"),
    "generate_until": ("exact_match", "pass@1"),
    "classification": ("acc", "f1", "f1_macro", "mcc", "pearson", "spearman"),
}
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match",),
    "classification": ("acc", "f1_macro"),
}
# lm-eval fields whose Python hooks or features this runner does not implement.
UNSUPPORTED = ("process_docs", "process_results", "use_prompt", "doc_to_image", "doc_to_audio", "gen_prefix")


class TaskError(UserError, ValueError):
    """A task file is invalid or its data lacks what the templates need."""


# the type each typed field of a task file must have (templates may be strings, lists or ints)
FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "task": str,
    "dataset_path": str,
    "dataset_name": str,
    "dataset_kwargs": dict,
    "training_split": str,
    "validation_split": str,
    "test_split": str,
    "fewshot_split": str,
    "fewshot_config": dict,
    "description": str,
    "target_delimiter": str,
    "fewshot_delimiter": str,
    "num_fewshot": int,
    "metric_list": list,
    "generation_kwargs": dict,
    "filter_list": list,
    "repeats": int,
    "max_length": int,
    "timeout": (int, float),
}
KIND_NAMES = {str: "text", dict: "a mapping", list: "a list", int: "a whole number", (int, float): "a number"}
# generation_kwargs that name a number of new tokens (lm-eval reads the last one given)
BUDGET_ALIASES = ("max_completion_tokens", "max_tokens", "max_new_tokens", "max_gen_toks")
MAX_NEW_TOKENS = 1_000_000


def validate_task(task: Any, where: str) -> None:
    """Refuse a task (a `tasks.Task`) whose fields have the wrong type or range, metrics that do not fit
    its output type, or generation settings and filters that would fail only while scoring."""
    for name, kind in FIELD_TYPES.items():
        value = getattr(task, name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            raise TaskError(f"{where}: field '{name}' must be {KIND_NAMES.get(kind, kind)}, got {value!r}")
    for name, low in (("num_fewshot", 0), ("repeats", 1), ("max_length", 1)):
        value = getattr(task, name)
        if value is not None and value < low:
            raise TaskError(f"{where}: field '{name}' must be at least {low}, got {value}")
    if not (math.isfinite(task.timeout) and task.timeout > 0):
        raise TaskError(f"{where}: field 'timeout' must be a positive number of seconds, got {task.timeout}")
    if any(not isinstance(entry, dict) for entry in task.metric_list):
        raise TaskError(f"{where}: every metric_list entry must be a mapping such as {{metric: acc}}")
    allowed = METRICS[task.output_type]
    for entry in task.metric_list:
        if entry.get("metric") not in allowed:
            raise TaskError(
                f"{where}: metric {entry.get('metric')!r} does not fit output_type {task.output_type} "
                f"(use one of {', '.join(allowed)})"
            )
        _check_patterns(entry.get("regexes_to_ignore") or [], f"{where}: metric_list regexes_to_ignore")
    if task.output_type == "multiple_choice" and task.doc_to_choice is None:
        raise TaskError(f"{where}: a multiple_choice task needs doc_to_choice")
    if task.output_type != "generate_until" and (task.generation_kwargs or task.filter_list):
        raise TaskError(f"{where}: generation_kwargs and filter_list need output_type generate_until")
    _check_generation(task.generation_kwargs or {}, where)
    _check_filters(task.filter_list or [], where)
    sampler = (task.fewshot_config or {}).get("sampler", "default")
    if sampler not in ("default", "first_n"):
        raise TaskError(f"{where}: fewshot_config.sampler {sampler!r} is not one of default, first_n")


def _check_generation(kwargs: dict[str, Any], where: str) -> None:
    until = kwargs.get("until")
    if until is not None and not isinstance(until, str):
        if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
            raise TaskError(f"{where}: generation_kwargs.until must be a string or a list of strings, got {until!r}")
    for alias in BUDGET_ALIASES:
        value = kwargs.get(alias)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS
        ):
            raise TaskError(
                f"{where}: generation_kwargs.{alias} must be a whole number in [1, {MAX_NEW_TOKENS}], got {value!r}"
            )
    if not isinstance(kwargs.get("do_sample", False), bool):
        raise TaskError(f"{where}: generation_kwargs.do_sample must be true or false, got {kwargs['do_sample']!r}")
    for name, low, high in (("temperature", 0.0, 100.0), ("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0)):
        value = kwargs.get(name)
        if value is not None and (not _number(value) or not low <= value <= high):
            raise TaskError(f"{where}: generation_kwargs.{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    top_k = kwargs.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise TaskError(f"{where}: generation_kwargs.top_k must be a whole number ≥ 0, got {top_k!r}")


def _check_filters(pipelines: list[Any], where: str) -> None:
    for pipeline in pipelines:
        steps = pipeline.get("filter") if isinstance(pipeline, dict) else None
        if not isinstance(steps, list) or not all(
            isinstance(s, dict) and isinstance(s.get("function"), str) for s in steps
        ):
            raise TaskError(f"{where}: each filter_list entry needs a `filter:` list of {{function: ...}} steps")
        for step in steps:
            if step["function"] == "regex":
                _check_patterns([step.get("regex_pattern", "")], f"{where}: filter regex_pattern")
                group = step.get("group_select", 0)
                if isinstance(group, bool) or not isinstance(group, int):
                    raise TaskError(f"{where}: filter group_select must be a whole number, got {group!r}")


def _check_patterns(patterns: Any, what: str) -> None:
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise TaskError(f"{what} must be a list of regular expressions, got {patterns!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise TaskError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from exc


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
