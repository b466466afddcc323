"""`generate_until`: batched generation with left padding and stop strings, lm-eval filters, exact_match.

Generation follows lm-eval's HFLM: prompts sorted longest first and batched; the context is
left-truncated to max_length − max_gen_toks; the EOS string joins the stop strings; the text is cut
at the first stop string. A token prefix every prompt shares (a fixed few-shot block) is run once and
each batch starts from a copy of its cache (`evaluation/prefix.py`). Greedy unless generation_kwargs
set do_sample (then seeded once per task, so `repeats` draws different samples and a rerun draws the
same ones).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

import torch

from lrsurgery.evaluation.loglik import max_length
from lrsurgery.evaluation.metrics import aggregate
from lrsurgery.evaluation.prefix import cache_kwargs, left_padded, shared_prefix
from lrsurgery.evaluation.tasks import Task, TaskError, contexts, render
from lrsurgery.hf.load import LoadedModel
from lrsurgery.progress import bar

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default
GENERATION_SEED = 1234


def normalize_kwargs(kwargs: dict[str, Any], eos: str | None) -> tuple[list[str], int, dict[str, Any]]:
    """lm-eval's normalisation: (stop strings incl. EOS, max new tokens, transformers generate kwargs)."""
    kwargs = dict(kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    if eos and eos not in until:
        until.append(eos)
    budget = DEFAULT_MAX_GEN_TOKS
    for alias in ("max_completion_tokens", "max_tokens", "max_new_tokens", "max_gen_toks"):  # last wins
        if kwargs.get(alias) is not None:
            budget = int(kwargs[alias])
        kwargs.pop(alias, None)
    sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
    if temperature == 0.0:
        sample = False
    gen: dict[str, Any] = {"do_sample": sample}
    if sample:
        gen["temperature"] = temperature
        gen.update({k: kwargs[k] for k in ("top_p", "top_k", "min_p") if k in kwargs})
    return until, budget, gen


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the first occurrence of any stop string (lm-eval's postprocess)."""
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


@torch.no_grad()
def generate(
    loaded: LoadedModel, prompts: list[str], gen_kwargs: dict[str, Any], batch_size: int = 8, window: int = 2048
) -> list[str]:
    """One completion per prompt, in prompt order: batches of `batch_size` left-padded prompts."""
    tok = loaded.tokenizer
    eos = tok.decode([tok.eos_token_id]) if tok.eos_token_id is not None else None
    until, budget, gen = normalize_kwargs(gen_kwargs, eos)
    if budget >= window:
        raise TaskError(f"max_gen_toks={budget} leaves no room for the prompt in a {window}-token window")
    encoded = [tok(p)["input_ids"][-(window - budget) :] for p in prompts]
    prefix = shared_prefix(loaded, encoded)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out = [""] * len(prompts)
    progress = bar(len(prompts), desc="generate_until", unit="req")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        cache: dict[str, Any] = {}
        if prefix is not None:  # [prefix][padding][prompt's own tokens], from a copy of the prefix's cache
            ids, mask = prefix.layout([encoded[i][len(prefix) :] for i in chunk], tok.pad_token_id)
            cache = cache_kwargs(loaded, prefix.cache_for(len(chunk)))
        else:
            ids, mask = left_padded([encoded[i] for i in chunk], tok.pad_token_id)
        width = ids.shape[1]
        stops = [s for s in until if s]
        generated = loaded.model.generate(
            **loaded.inputs(input_ids=ids, attention_mask=mask),
            max_new_tokens=budget,
            pad_token_id=tok.pad_token_id,
            stop_strings=stops or None,
            tokenizer=tok if stops else None,
            **cache,
            **gen,
        )
        for row, i in enumerate(chunk):
            text = tok.decode(generated[row, width:].tolist(), skip_special_tokens=True)
            out[i] = cut_at_stop(text, until)
        progress.update(len(chunk))
    progress.close()
    return out


# -- filters (lm-eval's filter_list functions) ---------------------------------------------------


def regex_filter(
    response: str, regex_pattern: str = r"#### (\-?[0-9\.\,]+)", group_select: int = 0, fallback: str = "[invalid]"
) -> str:
    """lm-eval's `regex` filter: the `group_select`-th findall match, the first non-empty group of a
    multi-group match, stripped; `fallback` when nothing matches."""
    matches = re.findall(regex_pattern, response)
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def apply_filters(steps: list[dict[str, Any]], responses: list[list[str]]) -> list[str]:
    """Run one filter pipeline over each document's responses; returns one answer per document."""
    current: list[Any] = responses
    for step in steps:
        kwargs = {k: v for k, v in step.items() if k != "function"}
        name = step.get("function")
        if name == "regex":
            current = [[regex_filter(r, **kwargs) for r in rs] for rs in current]
        elif name == "remove_whitespace":
            current = [[r.strip() for r in rs] for rs in current]
        elif name == "lowercase":
            current = [[r.lower() for r in rs] for rs in current]
        elif name == "uppercase":
            current = [[r.upper() for r in rs] for rs in current]
        elif name == "majority_vote":
            current = [[Counter(rs).most_common(1)[0][0]] for rs in current]
        elif name == "take_first":
            current = [rs[0] for rs in current]
        else:
            raise TaskError(
                f"filter function {name!r} is not one of regex, take_first, remove_whitespace, "
                "lowercase, uppercase, majority_vote"
            )
    return [rs[0] if isinstance(rs, list) else rs for rs in current]


def filter_pipelines(task: Task) -> list[tuple[str, list[dict[str, Any]]]]:
    """(name, steps) per filter_list entry; lm-eval's default is 'none' = take_first."""
    if not task.filter_list:
        return [("none", [{"function": "take_first"}])]
    return [(entry.get("name", "none"), entry.get("filter", [])) for entry in task.filter_list]


def exact_match(
    prediction: str,
    reference: str,
    regexes_to_ignore: list[str] | None = None,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
) -> float:
    """HF evaluate's exact_match (lm-eval's): strip the regexes from both, then optional case,
    punctuation and digit removal, then compare."""
    for pattern in regexes_to_ignore or []:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    if ignore_numbers:
        table = str.maketrans("", "", string.digits)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def score_generate(
    task: Task,
    loaded: LoadedModel,
    docs: list[dict[str, Any]],
    batch_size: int = 8,
    allow_code_execution: bool = False,
) -> dict[str, Any]:
    """Generate `repeats` completions per document, filter them, score each metric per filter.

    Metric keys are 'metric,filter' as lm-eval writes them (e.g. 'exact_match,strict-match'), or the
    bare metric name for the default 'none' filter.
    """
    names = [m["metric"] for m in task.metrics]
    if "pass@1" in names and not allow_code_execution:
        raise TaskError(f"task {task.task} runs model-written code to score pass@1; pass --allow-code-execution")
    prompts = contexts(task, docs)
    window = max_length(loaded, task)
    responses = [[] for _ in docs]
    torch.manual_seed(GENERATION_SEED)  # sampled generations are reproducible; repeats draw different samples
    for _ in range(task.repeats):
        for i, text in enumerate(generate(loaded, prompts, task.generation_kwargs or {}, batch_size, window)):
            responses[i].append(text)
    golds = []
    for doc in docs:
        gold = task.target(doc)
        if task.doc_to_choice is not None and isinstance(gold, int):
            gold = task.choices(doc)[gold]
        golds.append(gold)
    result: dict[str, Any] = {}
    for filter_name, steps in filter_pipelines(task):
        answers = apply_filters(steps, responses)
        items: dict[str, list[float]] = {}
        for entry in task.metrics:
            name = entry["metric"]
            if name == "exact_match":
                options = {
                    k: entry[k]
                    for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation", "ignore_numbers")
                    if k in entry
                }
                items[name] = [
                    max(exact_match(a, str(g), **options) for g in (gold if isinstance(gold, list) else [gold]))
                    for a, gold in zip(answers, golds, strict=True)
                ]
            else:  # pass@1: prompt + completion + "\n" + doc_to_target, as lm-eval's HumanEval runs it
                from lrsurgery.evaluation.code_exec import run_programs

                programs = [
                    str(render(task.doc_to_text, d)) + a + "\n" + str(g)
                    for d, a, g in zip(docs, answers, golds, strict=True)
                ]
                items[name] = [float(ok) for ok in run_programs(programs, task.timeout)]
        suffix = "" if filter_name == "none" else f",{filter_name}"
        for key, value in aggregate(task, items).items():
            result[key if key == "n" else key + suffix] = value
    result["generations"] = responses
    return result
