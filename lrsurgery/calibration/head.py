"""The loss gradient at the LM head of an offloaded model, with the head read from the files in chunks.

The sensitivity pass starts from ∂L/∂h, h the hidden state the head multiplies (after the final norm),
with L = Σ over samples of each sample's mean next-token cross-entropy (calibration/sensitivity.py).
For a token with target y and per-token weight ω (1 / the sample's labelled tokens),

    ∂L/∂h = ω · Σ_v (softmax(z)_v − [v = y]) · w_v,    z_v = h · w_v (+ b_v),

so the head is read twice in chunks of vocabulary rows: the first pass keeps a running maximum and
sum per token, giving log Σ_v exp z_v without the (tokens × vocabulary) logits; the second adds each
chunk's (softmax − one-hot) · ω times the chunk's rows. Peak memory is one chunk of rows and one
(tokens × chunk) block of logits, instead of the vocabulary × hidden head and the whole logits (at a
150k-token vocabulary and hidden 896, 0.54 GB and 0.6 MB per token in fp32).

This holds only when the model's logits are exactly its head's product of h, with nothing applied
after (soft-capping, a logit scale): `head_gradients` checks that on the model itself by running it
once with a small random head in place of the real one, and returns None where it does not hold, for
the caller to load the whole head instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lrsurgery.calibration.sensitivity import next_token_targets
from lrsurgery.data.examples import IGNORE

LOGIT_ELEMENTS = 1 << 21  # (tokens × vocabulary rows) logits held at once: 8 MB in fp32
TOKEN_BLOCK = 4096  # tokens whose gradient is computed per pair of passes over the head


class _Capture(nn.Module):
    """Stands in for the head: keeps its input and returns the input times a small probe matrix."""

    def __init__(self, probe: torch.Tensor):
        super().__init__()
        self.probe = probe
        self.seen: list[torch.Tensor] = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.seen.append(hidden)
        return hidden @ self.probe.to(hidden).T


@contextmanager
def _swapped(model: nn.Module, name: str, module: nn.Module) -> Iterator[None]:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, attr)
    setattr(parent, attr, module)
    try:
        yield
    finally:
        setattr(parent, attr, original)


def head_gradients(model: nn.Module, loader: Any, forward: Any, batches: list[dict], lasts: list) -> list | None:
    """∂L/∂(last block output) per micro-batch, like calibration/backward.py's whole-head route, with the
    head streamed from `loader`'s files; None if the model does more to its logits than the head's
    product. `forward(batch, last)` runs the model from the last block's output `last` (B, T, d)."""
    head_module, _, _ = loader.output.rpartition(".")
    original = model.get_submodule(head_module)
    dtype = loader.head_dtype
    probe = torch.randn(8, lasts[0].shape[-1], generator=torch.Generator().manual_seed(0)).to(dtype)
    capture = _Capture(probe)
    with _swapped(model, head_module, capture):
        leaves = []
        for batch, states in zip(batches, lasts, strict=True):
            last = states.clone().requires_grad_(True)
            logits = forward(batch, last)
            hidden = capture.seen[-1]
            if not torch.equal(logits, hidden.detach() @ probe.to(hidden).T):
                return None
            leaves.append(last)
    hidden_states = capture.seen
    weights = [_token_weights(b["labels"]).to(h.device) for b, h in zip(batches, hidden_states, strict=True)]
    targets = [next_token_targets(b["labels"]).to(h.device) for b, h in zip(batches, hidden_states, strict=True)]
    picked = [w > 0 for w in weights]  # the positions with a target
    flat = torch.cat([h.detach()[m] for h, m in zip(hidden_states, picked, strict=True)])
    flat_targets = torch.cat([t[m] for t, m in zip(targets, picked, strict=True)])
    omega = torch.cat([w[m] for w, m in zip(weights, picked, strict=True)])
    bias = getattr(original, "bias", None)
    blocks = [slice(i, i + TOKEN_BLOCK) for i in range(0, len(flat), TOKEN_BLOCK)]
    parts = [_gradient(flat[b], flat_targets[b], omega[b], loader, bias) for b in blocks]
    grad = torch.cat(parts) if parts else flat
    grads, start = [], 0
    for hidden, mask, last in zip(hidden_states, picked, leaves, strict=True):
        full = torch.zeros_like(hidden)
        full[mask] = grad[start : start + int(mask.sum())]
        start += int(mask.sum())
        hidden.backward(full)
        grads.append(last.grad)
    return grads


def _token_weights(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) fp32: 1 / (the sample's labelled tokens) where a position has a target, else 0."""
    valid = next_token_targets(labels) != IGNORE
    return valid.float() / valid.sum(dim=1, keepdim=True).clamp_min(1)


def _gradient(hidden: torch.Tensor, targets: torch.Tensor, omega: torch.Tensor, loader: Any, bias) -> torch.Tensor:
    """∂L/∂hidden for `hidden` (N, d) with next-token `targets` (N,) and weights `omega` (N,), in the
    head's dtype: two passes over the head's rows (module doc)."""
    step = max(1, LOGIT_ELEMENTS // len(hidden))
    maximum = torch.full((len(hidden),), -torch.inf, device=hidden.device)
    total = torch.zeros(len(hidden), device=hidden.device)
    for first, rows in loader.head_rows(step, hidden.device):
        logits = _logits(hidden, rows, bias, first)
        new = torch.maximum(maximum, logits.max(dim=1).values)
        total = total * torch.exp(maximum - new) + torch.exp(logits - new[:, None]).sum(dim=1)
        maximum = new
    log_partition = maximum + torch.log(total)
    grad = torch.zeros(hidden.shape, device=hidden.device)
    for first, rows in loader.head_rows(step, hidden.device):
        probs = torch.exp(_logits(hidden, rows, bias, first) - log_partition[:, None])
        inside = (targets >= first) & (targets < first + len(rows))
        probs[inside.nonzero().squeeze(1), targets[inside] - first] -= 1
        grad += ((probs * omega[:, None]).to(rows.dtype) @ rows).float()
    return grad.to(hidden.dtype)


def _logits(hidden: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None, first: int) -> torch.Tensor:
    """fp32 logits of `hidden` against vocabulary rows [first, first + len(rows)), computed in the head's
    dtype as the model computes them."""
    logits = hidden @ rows.T
    if bias is not None:
        logits = logits + bias[first : first + len(rows)].to(logits)
    return logits.float()
