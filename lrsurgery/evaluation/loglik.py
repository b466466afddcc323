"""Log-likelihood requests: `multiple_choice` and `loglikelihood_rolling`, as lm-eval's HFLM scores them.

A request is (context, continuation); its score is the summed log-probability of the continuation's
tokens given the context. Tokenization follows lm-eval's `_encode_pair`; an empty context is the
prefix token (BOS, else EOS). Inputs longer than the model's window keep their last max_length+1
tokens, as lm-eval truncates them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lrsurgery.evaluation.metrics import aggregate
from lrsurgery.evaluation.prefix import SharedPrefix, cache_kwargs, last_logits_only, left_padded, shared_prefix
from lrsurgery.evaluation.tasks import Task, contexts
from lrsurgery.hf.load import LoadedModel
from lrsurgery.linalg.basics import at_least_fp32
from lrsurgery.progress import bar

TokenPair = tuple[list[int], list[int]]


def max_length(loaded: LoadedModel, task: Task | None = None) -> int:
    """The scoring window: the task's max_length if set, else the model's (lm-eval's resolution)."""
    config = loaded.model.config
    model_max = next(
        (int(getattr(config, a)) for a in ("n_positions", "max_position_embeddings", "n_ctx") if getattr(config, a, 0)),
        2048,
    )
    return min(task.max_length, model_max) if task is not None and task.max_length else model_max


def prefix_token(tok: Any) -> int:
    """lm-eval's prefix_token_id: the BOS token, else EOS."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def encode(tok: Any, text: str) -> list[int]:
    """lm-eval's tok_encode: the tokenizer's own special-token default."""
    return tok(text)["input_ids"]


def encode_pair(tok: Any, context: str, continuation: str) -> TokenPair:
    """lm-eval's `_encode_pair`: trailing context whitespace moves onto the continuation, the pair is
    encoded whole, and the continuation is what follows the context's own token count."""
    if not context:
        return [prefix_token(tok)], encode(tok, continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(tok, context + continuation)
    n_ctx = len(encode(tok, context))
    return whole[:n_ctx], whole[n_ctx:]


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[TokenPair]:
    """lm-eval's get_rolling_token_windows(context_len=1) + make_disjoint_window: every token is
    predicted once; the first window is conditioned on `prefix`, the last one on as much of the
    preceding text as fits. Returns (context tokens, predicted tokens) pairs."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        windows.append((tokens[max(end - max_len - 1, 0) : end - n], tokens[end - n : end]))
        done = end
    return windows


@torch.no_grad()
def score_pairs(
    loaded: LoadedModel, pairs: Sequence[TokenPair], window: int, batch_size: int = 8, share_context: bool = True
) -> list[float]:
    """Summed log-probability of each pair's continuation tokens given its context tokens.

    `share_context=True` runs each distinct context once (left-padded batch of contexts, key/value
    cache) and scores all of its continuations from that cache, and runs a token prefix that every
    context shares (a fixed few-shot block) once for all of them (`evaluation/prefix.py`); `False`
    runs one full context+continuation sequence per pair (lm-eval's way). Both give the same numbers.
    """
    pairs = [(ctx[-(window + 1 - len(cont)) :] if len(cont) <= window else ctx[-1:], cont) for ctx, cont in pairs]
    out = [0.0] * len(pairs)
    progress = bar(len(pairs), desc="loglikelihood", unit="req")
    if share_context:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(i)
        prefix = shared_prefix(loaded, list(groups))
        order = sorted(groups.items(), key=lambda g: -(len(g[0]) + max(len(pairs[i][1]) for i in g[1])))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            conts = [[pairs[i][1] for i in m] for _, m in chunk]
            scores = _shared_batch(loaded, [list(c) for c, _ in chunk], conts, prefix)
            for (_, members), values in zip(chunk, scores, strict=True):
                for i, value in zip(members, values, strict=True):
                    out[i] = value
                progress.update(len(members))
    else:
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, value in zip(chunk, _full_batch(loaded, [pairs[i] for i in chunk]), strict=True):
                out[i] = value
            progress.update(len(chunk))
    progress.close()
    return out


def _full_batch(loaded: LoadedModel, pairs: list[TokenPair]) -> list[float]:
    """Right-padded batch of whole sequences; score the last len(cont) positions of each."""
    seqs = [(ctx + cont)[:-1] for ctx, cont in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), loaded.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    logits = loaded.model(**loaded.inputs(input_ids=ids, attention_mask=mask)).logits
    logprobs = F.log_softmax(at_least_fp32(logits), dim=-1)
    scores = []
    for row, ((_, cont), seq) in enumerate(zip(pairs, seqs, strict=True)):
        positions = torch.arange(len(seq) - len(cont), len(seq), device=logprobs.device)
        scores.append(float(logprobs[row, positions, torch.tensor(cont, device=logprobs.device)].sum()))
    return scores


def _shared_batch(
    loaded: LoadedModel, ctxs: list[list[int]], conts: list[list[list[int]]], prefix: SharedPrefix | None = None
) -> list[list[float]]:
    """Contexts (G of them, left-padded after the shared `prefix`, whose cache they start from) in one
    pass with a cache; then every continuation of every context (R rows, right-padded) in a second pass
    that attends to its context's cache row."""
    from transformers import DynamicCache

    pad, skip = loaded.tokenizer.pad_token_id, len(prefix) if prefix is not None else 0
    if prefix is not None:
        ids, ctx_mask = prefix.layout([c[skip:] for c in ctxs], pad)
        kv = prefix.cache_for(len(ctxs))
    else:
        ids, ctx_mask = left_padded(ctxs, pad)
        kv = DynamicCache()
    width = ids.shape[1]
    positions = (ctx_mask.cumsum(-1) - 1).clamp(min=0)[:, skip:]
    logits = loaded.model(
        **loaded.inputs(input_ids=ids[:, skip:], attention_mask=ctx_mask, position_ids=positions),
        use_cache=True,
        **last_logits_only(loaded),
        **cache_kwargs(loaded, kv),
    ).logits[:, -1]
    first = F.log_softmax(at_least_fp32(logits), dim=-1)  # (G, vocab): the first continuation token
    scores = [[float(first[g, c[0]]) for c in group] for g, group in enumerate(conts)]
    rows = [(g, j) for g, group in enumerate(conts) for j, c in enumerate(group) if len(c) > 1]
    if not rows:
        return scores
    rest = max(len(conts[g][j]) for g, j in rows) - 1
    kv.batch_select_indices(torch.tensor([g for g, _ in rows], device=loaded.device))
    ids = torch.full((len(rows), rest), pad, dtype=torch.long)
    mask = torch.cat([ctx_mask[[g for g, _ in rows]], torch.zeros((len(rows), rest), dtype=torch.long)], dim=1)
    for r, (g, j) in enumerate(rows):
        tail = conts[g][j][:-1]
        ids[r, : len(tail)] = torch.tensor(tail)
        mask[r, width : width + len(tail)] = 1
    lengths = ctx_mask[[g for g, _ in rows]].sum(-1, keepdim=True)
    positions = lengths + torch.arange(rest)[None]
    logits = loaded.model(
        **loaded.inputs(input_ids=ids, attention_mask=mask, position_ids=positions),
        use_cache=True,
        **cache_kwargs(loaded, kv),
    ).logits
    logprobs = F.log_softmax(at_least_fp32(logits), dim=-1)  # (R, rest, vocab)
    for r, (g, j) in enumerate(rows):
        target = torch.tensor(conts[g][j][1:], device=logprobs.device)
        scores[g][j] += float(logprobs[r, torch.arange(len(target), device=logprobs.device), target].sum())
    return scores


def score_multiple_choice(
    task: Task, loaded: LoadedModel, docs: list[dict[str, Any]], batch_size: int = 8, share_context: bool = True
) -> dict[str, Any]:
    """acc = argmax of summed log-prob; acc_norm = argmax of log-prob / len(choice) in characters;
    acc_bytes the same per UTF-8 byte; f1 and mcc over (gold, argmax) — lm-eval's definitions."""
    tok, pairs, spans = loaded.tokenizer, [], []
    for doc, context in zip(docs, contexts(task, docs), strict=True):
        choices = task.choices(doc)
        spans.append((len(pairs), choices, task.gold_indices(doc, choices)))
        pairs.extend(encode_pair(tok, context, task.target_delimiter + c) for c in choices)
    lls = score_pairs(loaded, pairs, max_length(loaded, task), batch_size, share_context)
    items: dict[str, list[Any]] = {"acc": [], "acc_norm": [], "acc_bytes": [], "f1": [], "mcc": []}
    for start, choices, gold in spans:
        scores = lls[start : start + len(choices)]
        pred = _argmax(scores)
        items["acc"].append(float(pred in gold))
        items["acc_norm"].append(float(_argmax([s / len(c) for s, c in zip(scores, choices, strict=True)]) in gold))
        nbytes = [len(c.encode("utf-8")) for c in choices]
        items["acc_bytes"].append(float(_argmax([s / b for s, b in zip(scores, nbytes, strict=True)]) in gold))
        items["f1"].append((gold[0], pred))
        items["mcc"].append((gold[0], pred))
    result = aggregate(task, items)
    result["loglikelihoods"] = [lls[s : s + len(c)] for s, c, _ in spans]
    return result


def _argmax(values: list[float]) -> int:
    """First index of the maximum (numpy's argmax tie rule)."""
    return max(range(len(values)), key=values.__getitem__)


def score_rolling(
    task: Task, loaded: LoadedModel, docs: list[dict[str, Any]], batch_size: int = 8, share_context: bool = True
) -> dict[str, Any]:
    """Perplexity of doc_to_target over disjoint rolling windows (lm-eval's loglikelihood_rolling).

    word_perplexity = exp(−Σll / Σwords), words counted as lm-eval does (re.split(r"\\s+"));
    byte_perplexity = exp(−Σll / Σbytes); bits_per_byte = −Σll / (Σbytes · ln 2);
    token_perplexity (an addition) = exp(−Σll / Σtokens).
    """
    tok, window = loaded.tokenizer, max_length(loaded, task)
    pairs, owner, texts = [], [], []
    for d, doc in enumerate(docs):
        text = str(task.target(doc))
        texts.append(text)
        for pair in rolling_windows(encode(tok, text), prefix_token(tok), window):
            pairs.append(pair)
            owner.append(d)
    lls = score_pairs(loaded, pairs, window, batch_size, share_context=False)
    per_doc = [0.0] * len(docs)
    tokens = [0] * len(docs)
    for d, ll, (_, cont) in zip(owner, lls, pairs, strict=True):
        per_doc[d] += ll
        tokens[d] += len(cont)
    words = [len(re.split(r"\s+", t)) for t in texts]
    nbytes = [len(t.encode("utf-8")) for t in texts]
    total = sum(per_doc)
    result: dict[str, Any] = {
        "word_perplexity": math.exp(-total / sum(words)),
        "byte_perplexity": math.exp(-total / sum(nbytes)),
        "bits_per_byte": -total / sum(nbytes) / math.log(2),
        "token_perplexity": math.exp(-total / max(sum(tokens), 1)),
    }
    wanted = [m["metric"] for m in task.metrics]
    out: dict[str, Any] = {}
    for name in wanted:
        out[name] = result[name]
        out[f"{name}_stderr"] = None  # lm-eval reports none for weighted perplexities
    out["n"] = len(docs)
    out["loglikelihoods"] = per_doc
    return out
