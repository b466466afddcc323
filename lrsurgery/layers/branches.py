"""An adapted layer's low-rank branches as one autograd op.

    y = out + Σ_k s_k · ((drop_k(x) A_kᵀ) ⊙ g_k) B_kᵀ

with `out` the frozen base layer's output, per branch k: A_k (r_k, d_in), B_k (d_out, r_k), scale s_k,
dropout rate p_k and an optional gate g_k = E_k ⊙ mask_k (r_k,).

Why one op rather than autograd over the separate products:
- All branches leave through one product [h_1 … h_n]·[B_1 … B_n]ᵀ added into `out`, and in backward one
  product gives every branch's ∂L/∂h and one gives every ∂L/∂B: each reads the (tokens, d_out) output
  gradient once, not once per branch. The concatenated B is rebuilt in backward (a few KB), not kept.
- ∂L/∂x of every branch is summed in place into one buffer, instead of autograd adding one full
  (tokens, d_in) gradient per branch.
- Dropout is inverted dropout with a float keep-mask (0 or 1/(1−p)) drawn by `bernoulli_`, as
  `nn.Dropout` does. Backward keeps x once for all branches (and for every layer that reads the same x,
  such as q, k and v) plus each branch's mask, and forms x ⊙ keep again for ∂L/∂A: one elementwise
  product, instead of a (tokens, d_in) dropped copy per branch held from forward to backward. A frozen
  A (TLoRA) keeps just the mask.
- Gates: the value is E ⊙ mask, but ∂L/∂E is the whole gradient with respect to the gate, masked entries
  included (straight-through), so a masked expert keeps being scored and can come back (the dual
  method's `--masking straight-through`; with `--masking zero` the mask stays 1 and E itself is zeroed).
- `linear_with_branches` runs the frozen base product inside the op too: the branches add in place into
  x·Wᵀ (no (tokens, d_out) copy, no second output buffer), and backward starts ∂L/∂x from ∂L/∂y·W and adds
  every branch's part into that one buffer, where autograd would add two full (tokens, d_in) gradients.
  These passes over whole activations, not the thin products' flops, are most of what adapters add to a
  CPU step. `add_branches(..., in_place=True)` is the same forward for a base layer run outside the op.
- Under autocast everything runs in the autocast dtype of the base output (inputs cast once, autocast off
  inside), so forward and backward agree on dtypes; gradients are returned in each input's own dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BranchPlan:
    """The static part of one branch: its scale and dropout rate."""

    scale: float
    dropout: float


class Factors(NamedTuple):
    """One branch's A, B, E and mask, in the order `add_branches` takes them (or whether each needs a gradient)."""

    a: object
    b: object
    e: object
    mask: object


LEADING = 7  # the op's arguments before the factors: plans, training, in_place, out, x, weight, bias
X = 4  # the position of x among them


def add_branches(
    out: torch.Tensor,
    x: torch.Tensor,
    plans: tuple[BranchPlan, ...],
    factors: tuple[torch.Tensor | None, ...],
    training: bool,
    in_place: bool = False,
) -> torch.Tensor:
    """`out` (..., d_out) plus every branch applied to `x` (..., d_in), shaped like `out`; `factors` holds A,
    B, E, mask for each branch in turn (E and mask may be None). Dropout is applied only when `training`.
    `in_place=True` writes the sum into `out` (contiguous, not a leaf that needs a gradient) and returns it."""
    _check_factors(plans, factors)
    if in_place and (not out.is_contiguous() or (out.is_leaf and out.requires_grad)):
        raise ValueError("in_place=True needs a contiguous `out` that is not a leaf needing a gradient")
    return _Branches.apply(plans, training, in_place, out, x, None, None, *factors)


def linear_with_branches(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plans: tuple[BranchPlan, ...],
    factors: tuple[torch.Tensor | None, ...],
    training: bool,
) -> torch.Tensor:
    """F.linear(x, weight, bias) plus every branch applied to `x` (..., d_in): (..., d_out). The weight and
    bias are frozen (no gradient); under autocast the base product is cast as F.linear is."""
    _check_factors(plans, factors)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_with_branches needs a frozen weight and bias; use add_branches for a trained base")
    return _Branches.apply(plans, training, False, None, x, weight, bias, *factors)


def _check_factors(plans: tuple[BranchPlan, ...], factors: tuple[torch.Tensor | None, ...]) -> None:
    if len(factors) != 4 * len(plans):
        raise ValueError(f"expected 4 factors (A, B, E, mask) per branch, got {len(factors)} for {len(plans)}")


def _per_branch(flat: tuple) -> list[Factors]:
    """A flat (A, B, E, mask, A, B, ...) sequence as one Factors per branch."""
    return [Factors(*flat[i : i + 4]) for i in range(0, len(flat), 4)]


class _Branches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plans, training, in_place, out, x, weight, bias, *factors):  # noqa: ANN001, ANN205
        x_needs = ctx.needs_input_grad[X]
        ctx.x_shape, ctx.base_inside = x.shape, weight is not None
        x = x.reshape(-1, x.shape[-1])
        if weight is not None:  # under the caller's autocast, if any, as nn.Linear would run it
            flat_out, in_place = F.linear(x, weight, bias), False
            out = flat_out.view(*ctx.x_shape[:-1], flat_out.shape[-1])
        else:
            flat_out = out.view(-1, out.shape[-1]) if in_place else out.reshape(-1, out.shape[-1])
        dtype, device = flat_out.dtype, flat_out.device.type
        ctx.out_shape = out.shape
        needs = _per_branch(ctx.needs_input_grad[LEADING:])
        branches = _per_branch(factors)
        with torch.autocast(device, enabled=False):
            x = x.to(dtype)
            heads, saved, gates = [], [], []
            for plan, f, need in zip(plans, branches, needs, strict=True):
                keep = None
                seen = x
                if training and plan.dropout > 0:
                    keep = torch.empty_like(x).bernoulli_(1 - plan.dropout).div_(1 - plan.dropout)
                    seen = x * keep
                h = seen @ f.a.to(dtype).T
                factor = _factor(f.e, f.mask, plan.scale, dtype)  # s·g, s or None (s = 1, no gate)
                heads.append(h if factor is None else h * factor)
                saved += [keep if (x_needs or need.a) else None, h if need.e else None]
                gates.append(factor if torch.is_tensor(factor) else None)  # a plain scale is in the plan
            heads = heads[0] if len(heads) == 1 else torch.cat(heads, dim=1)
            if in_place or ctx.base_inside:
                flat_out.addmm_(heads, _stack_b(branches, dtype).T)
                if in_place:
                    ctx.mark_dirty(out)
                y = out
            else:
                y = torch.addmm(flat_out, heads, _stack_b(branches, dtype).T).view(ctx.out_shape)
        ctx.plans = plans
        # x once for every branch (the dropped inputs are x ⊙ keep again in backward, not kept)
        any_a = any(need.a for need in needs)
        base = weight if ctx.base_inside and x_needs else None
        ctx.save_for_backward(heads, x if any_a else None, base, *saved, *factors, *gates)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 (autograd signature)
        plans, n = ctx.plans, len(ctx.plans)
        tensors = ctx.saved_tensors
        heads, x, weight, saved = tensors[0], tensors[1], tensors[2], tensors[3 : 3 + 2 * n]
        branches, gates = _per_branch(tensors[3 + 2 * n : 3 + 6 * n]), tensors[3 + 6 * n :]
        x_needs = ctx.needs_input_grad[X]
        needs = _per_branch(ctx.needs_input_grad[LEADING:])
        grad_out = None if ctx.base_inside else grad  # ∂L/∂out goes to `out` only when it was an input
        grad = grad.reshape(-1, grad.shape[-1])
        dtype = grad.dtype
        grads = [[None] * 4 for _ in range(n)]  # ∂L/∂(A, B, E, mask) of each branch
        offsets = [sum(f.a.shape[0] for f in branches[:k]) for k in range(n + 1)]
        with torch.autocast(grad.device.type, enabled=False):
            if any(need.b for need in needs):
                grad_b = heads.T @ grad  # (R, d_out): one pass over the output gradient for every B
                for k, need in enumerate(needs):
                    if need.b:
                        grads[k][1] = grad_b[offsets[k] : offsets[k + 1]].T
            if not (x_needs or any(need.a or need.e for need in needs)):
                return None, None, None, grad_out, None, None, None, *(g for branch in grads for g in branch)
            grad_heads = grad @ _stack_b(branches, dtype)  # (tokens, R): one pass for every branch's ∂L/∂h
            # the base's ∂L/∂x first, when the base ran here: every branch then adds into it
            grad_x = grad @ weight.to(dtype) if weight is not None else None
            # dropout branches first: their ∂L/∂x needs the mask, so it cannot be accumulated by addmm_
            for k in sorted(range(n), key=lambda k: plans[k].dropout == 0):
                plan, f, need = plans[k], branches[k], needs[k]
                keep, h = saved[2 * k : 2 * k + 2]
                part = grad_heads[:, offsets[k] : offsets[k + 1]]
                if f.e is not None and need.e:
                    grad_e = (part * h).sum(0)
                    grads[k][2] = grad_e if plan.scale == 1 else grad_e.mul_(plan.scale)
                factor = gates[k] if gates[k] is not None else _factor(None, None, plan.scale, grad_heads.dtype)
                grad_h = part if factor is None else part * factor
                if need.a:
                    grads[k][0] = grad_h.T @ (x if keep is None else x * keep)
                if not x_needs:
                    continue
                if keep is not None:
                    contribution = (grad_h @ f.a.to(dtype)).mul_(keep)
                    grad_x = contribution if grad_x is None else grad_x.add_(contribution)
                elif grad_x is None:
                    grad_x = grad_h @ f.a.to(dtype)
                else:
                    grad_x.addmm_(grad_h, f.a.to(dtype))
        grad_x = None if grad_x is None else grad_x.view(ctx.x_shape)
        return None, None, None, grad_out, grad_x, None, None, *(g for branch in grads for g in branch)


def _factor(
    e: torch.Tensor | None, mask: torch.Tensor | None, scale: float, dtype: torch.dtype
) -> torch.Tensor | float | None:
    """What a branch's h is multiplied by: s·(E ⊙ mask) for a gated branch, else s, or None when s = 1."""
    if e is None:
        return None if scale == 1 else scale
    gate = (e if mask is None else e * mask.to(e.dtype)).to(dtype)
    return gate if scale == 1 else gate * scale


def _stack_b(branches: list[Factors], dtype: torch.dtype) -> torch.Tensor:
    bs = [f.b.to(dtype) for f in branches]
    return bs[0] if len(bs) == 1 else torch.cat(bs, dim=1)
