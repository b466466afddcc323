"""A token prefix shared by every request of a task, run through the model once and its cache reused.

A fixed few-shot block (`fewshot_config: sampler: first_n`, as MMLU and GSM8K-CoT use), or a long
`description`, starts every prompt of a task with the same tokens. A causal model's keys and values
at those positions depend on those tokens alone, so they are computed once (one row) and copied into
each batch's cache; a batch then runs only what follows the prefix. Rows are laid out as
[prefix][left padding][own tokens] with explicit position ids (0 … len − 1, as without the prefix) and
the padding masked, so each row computes what it would alone, up to the rounding of other product
shapes (exact in fp64; `tests/test_eval.py`, `tests/test_eval_generate.py`).

The prefix is the longest common *token* prefix of the encoded requests (after the window's
truncation), so a word split differently at the boundary is simply not shared. It always leaves each
request at least one token of its own, and is used only when at least two distinct requests share
`MIN_SHARED_PREFIX` tokens or more.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch

from lrsurgery.hf.load import LoadedModel

# A shorter shared start (a BOS token, a "Question:") saves a few tokens a row: not worth an extra forward.
MIN_SHARED_PREFIX = 16


@cache
def forward_arguments(model_class: type) -> frozenset[str]:
    """The keyword arguments `model_class.forward` names."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_kwargs(loaded: LoadedModel, kv: Any) -> dict[str, Any]:
    """The key/value cache as the model's forward and `generate` take it: `cache=` (transformers >= 5.2x),
    else `past_key_values=`."""
    return {"cache" if "cache" in forward_arguments(type(loaded.model)) else "past_key_values": kv}


def last_logits_only(loaded: LoadedModel) -> dict[str, Any]:
    """`logits_to_keep=1` where the model's forward takes it (the head runs on the last position only)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in forward_arguments(type(loaded.model)) else {}


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens all of `seqs` have in common (0 for no sequences)."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


class SharedPrefix:
    """The model's key/value cache of `tokens` (one row), and fresh batch-sized copies of it."""

    def __init__(self, loaded: LoadedModel, tokens: list[int]) -> None:
        from transformers import DynamicCache

        self.tokens = tokens
        self._cache = DynamicCache()
        with torch.no_grad():
            ids = loaded.inputs(input_ids=torch.tensor([tokens]))
            loaded.model(**ids, use_cache=True, **last_logits_only(loaded), **cache_kwargs(loaded, self._cache))

    def __len__(self) -> int:
        return len(self.tokens)

    def cache_for(self, rows: int) -> Any:
        """A new cache holding the prefix's keys and values for `rows` rows (the original stays as it is)."""
        cache = copy.deepcopy(self._cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache

    def layout(self, suffixes: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask), each (rows, len(prefix) + longest suffix): [prefix][padding][suffix]."""
        return left_padded(suffixes, pad, self.tokens)


def left_padded(
    seqs: Sequence[Sequence[int]], pad: int, prefix: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (rows, len(prefix) + longest of `seqs`), long: every row is
    [prefix][padding][its sequence], the padding masked."""
    width = len(prefix) + max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, : len(prefix)] = torch.tensor(list(prefix), dtype=torch.long)
    mask[:, : len(prefix)] = 1
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def shared_prefix(loaded: LoadedModel, seqs: Sequence[Sequence[int]]) -> SharedPrefix | None:
    """The prefix of `seqs` worth running once (see the module's docstring), computed; else None."""
    if len({tuple(s) for s in seqs}) < 2:
        return None
    n = min(common_prefix_length(seqs), min(len(s) for s in seqs) - 1)
    return SharedPrefix(loaded, list(seqs[0][:n])) if n >= MIN_SHARED_PREFIX else None
