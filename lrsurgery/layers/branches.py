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
  included (straight-through), so a masked expert keeps being scored and can come back.
- Under autocast everything runs in the autocast dtype of the base output (inputs cast once, autocast off
  inside), so forward and backward agree on dtypes; gradients are returned in each input's own dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BranchPlan:
    """The static part of one branch: its scale and dropout rate."""

    scale: float
    dropout: float


def add_branches(
    out: torch.Tensor,
    x: torch.Tensor,
    plans: tuple[BranchPlan, ...],
    factors: tuple[torch.Tensor | None, ...],
    training: bool,
) -> torch.Tensor:
    """`out` (tokens, d_out) plus every branch applied to `x` (tokens, d_in); `factors` holds A, B, E, mask
    for each branch in turn (E and mask may be None). Dropout is applied only when `training`."""
    if len(factors) != 4 * len(plans):
        raise ValueError(f"expected 4 factors (A, B, E, mask) per branch, got {len(factors)} for {len(plans)}")
    return _Branches.apply(plans, training, out, x, *factors)


class _Branches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plans, training, out, x, *factors):  # noqa: ANN001, ANN205 (autograd signature)
        dtype, device = out.dtype, out.device.type
        needs = ctx.needs_input_grad
        x_needs = needs[3]
        with torch.autocast(device, enabled=False):
            x = x.to(dtype)
            heads, saved, gates = [], [], []
            for k, plan in enumerate(plans):
                a, b, e, mask = factors[4 * k : 4 * k + 4]
                a_needs, e_needs = needs[4 + 4 * k], needs[6 + 4 * k]
                keep = None
                seen = x
                if training and plan.dropout > 0:
                    keep = torch.empty_like(x).bernoulli_(1 - plan.dropout).div_(1 - plan.dropout)
                    seen = x * keep
                h = seen @ a.to(dtype).T
                factor = _factor(e, mask, plan.scale, dtype)  # s·g, s or None (s = 1, no gate)
                heads.append(h if factor is None else h * factor)
                saved += [keep if (x_needs or a_needs) else None, h if e_needs else None]
                gates.append(factor if torch.is_tensor(factor) else None)  # a plain scale is in the plan
            heads = heads[0] if len(heads) == 1 else torch.cat(heads, dim=1)
            y = torch.addmm(out, heads, _stack_b(factors, dtype).T)
        ctx.plans = plans
        # x once for every branch (the dropped inputs are x ⊙ keep again in backward, not kept)
        any_a = any(needs[4 + 4 * k] for k in range(len(plans)))
        ctx.save_for_backward(heads, x if any_a else None, *saved, *factors, *gates)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 (autograd signature)
        plans, n = ctx.plans, len(ctx.plans)
        tensors = ctx.saved_tensors
        heads, x, saved = tensors[0], tensors[1], tensors[2 : 2 + 2 * n]
        factors, gates = tensors[2 + 2 * n : 2 + 6 * n], tensors[2 + 6 * n :]
        needs = ctx.needs_input_grad  # (plans, training, out, x, then A, B, E, mask of each branch)
        dtype = grad.dtype
        grads: list[torch.Tensor | None] = [None] * (4 * n)
        offsets = [sum(factors[4 * j].shape[0] for j in range(k)) for k in range(n + 1)]
        with torch.autocast(grad.device.type, enabled=False):
            if any(needs[5 + 4 * k] for k in range(n)):
                grad_b = heads.T @ grad  # (R, d_out): one pass over the output gradient for every B
                for k in range(n):
                    if needs[5 + 4 * k]:
                        grads[4 * k + 1] = grad_b[offsets[k] : offsets[k + 1]].T
            if not (needs[3] or any(needs[4 + 4 * k] or needs[6 + 4 * k] for k in range(n))):
                return None, None, grad, None, *grads
            grad_heads = grad @ _stack_b(factors, dtype)  # (tokens, R): one pass for every branch's ∂L/∂h
            grad_x = None
            # dropout branches first: their ∂L/∂x needs the mask, so it cannot be accumulated by addmm_
            for k in sorted(range(n), key=lambda k: plans[k].dropout == 0):
                plan, a, e = plans[k], factors[4 * k], factors[4 * k + 2]
                keep, h = saved[2 * k : 2 * k + 2]
                part = grad_heads[:, offsets[k] : offsets[k + 1]]
                if e is not None and needs[6 + 4 * k]:
                    grad_e = (part * h).sum(0)
                    grads[4 * k + 2] = grad_e if plan.scale == 1 else grad_e.mul_(plan.scale)
                factor = gates[k] if gates[k] is not None else _factor(None, None, plan.scale, grad_heads.dtype)
                grad_h = part if factor is None else part * factor
                if needs[4 + 4 * k]:
                    grads[4 * k] = grad_h.T @ (x if keep is None else x * keep)
                if not needs[3]:
                    continue
                if keep is not None:
                    contribution = (grad_h @ a.to(dtype)).mul_(keep)
                    grad_x = contribution if grad_x is None else grad_x.add_(contribution)
                elif grad_x is None:
                    grad_x = grad_h @ a.to(dtype)
                else:
                    grad_x.addmm_(grad_h, a.to(dtype))
        return None, None, grad, grad_x, *grads


def _factor(
    e: torch.Tensor | None, mask: torch.Tensor | None, scale: float, dtype: torch.dtype
) -> torch.Tensor | float | None:
    """What a branch's h is multiplied by: s·(E ⊙ mask) for a gated branch, else s, or None when s = 1."""
    if e is None:
        return None if scale == 1 else scale
    gate = (e if mask is None else e * mask.to(e.dtype)).to(dtype)
    return gate if scale == 1 else gate * scale


def _stack_b(factors: tuple[torch.Tensor | None, ...], dtype: torch.dtype) -> torch.Tensor:
    bs = [factors[i].to(dtype) for i in range(1, len(factors), 4)]
    return bs[0] if len(bs) == 1 else torch.cat(bs, dim=1)
