"""Expert screening for the dual method: the k^t schedule (Eq. 16), top-k gate masks (Eq. 17) and the
orthogonality penalty on the expert factors (Eq. 14-15).

Schedule convention. The paper uses t2 two ways: Eq. 16 decays until t_total − t2 (t2 a length), the text
fixes the scores "during t ∈ [t2, t_total)" (t2 a time). With Table 1's t2 ratio 0.5 both agree; lrsurgery
takes the second reading: `t1` and `t2` are fractions of the run, the decay runs from T1 = round(t1·total)
to T2 = round(t2·total) (rounded half up), and the final phase [T2, total) keeps k_final with the scores frozen at T2.
Times t count optimizer steps already taken (t = step + 1 after the update of 0-based step `step`)."""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def phase_bounds(total: int, t1: float, t2: float) -> tuple[int, int]:
    """(T1, T2) in optimizer steps for a run of `total` steps."""
    return math.floor(t1 * total + 0.5), math.floor(t2 * total + 0.5)


def k_at(t: int, total: int, k_init: int, k_final: int, t1: float, t2: float) -> int:
    """Experts kept per module after t optimizer steps (Eq. 16, with T1, T2 as in the module docstring):
    k_init for t < T1; k_final + (k_init − k_final)·(1 − (t − T1)/(T2 − T1))² for T1 ≤ t < T2; k_final after."""
    lo, hi = phase_bounds(total, t1, t2)
    if t < lo:
        return k_init
    if t >= hi:
        return k_final
    frac = 1.0 - (t - lo) / (hi - lo)
    return math.floor(k_final + (k_init - k_final) * frac**2 + 0.5)  # rounded half up


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask (M, r) keeping the k highest scores of each row (Eq. 17); ties go to the lower index."""
    m, r = scores.shape
    if k >= r:
        return torch.ones_like(scores)
    # a stable descending sort makes ties deterministic on every process and device
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(scores).scatter_(1, order, 1.0)


@torch.no_grad()
def orthogonality_penalty(
    a_list: list[torch.Tensor], b_list: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Σ over modules of ‖BᵀB − I‖_F + ‖AAᵀ − I‖_F (Eq. 14), for A (r, d_in) and B (d_out, r), with its
    gradient with respect to every A and every B, in closed form (fp32, no autograd graph):

        ∂‖AAᵀ − I‖_F / ∂A = 2(AAᵀ − I)·A / ‖AAᵀ − I‖_F,    ∂‖BᵀB − I‖_F / ∂B = 2B·(BᵀB − I) / ‖BᵀB − I‖_F

    and 0 where a norm is 0 (its minimum). Same-shaped factors go through one batched product per group.
    Returns (penalty, gradients of the A's, gradients of the B's).
    """
    penalty_a, grads_a = _gram_terms(a_list, rows=True)
    penalty_b, grads_b = _gram_terms(b_list, rows=False)
    return penalty_a + penalty_b, grads_a, grads_b


def _gram_terms(factors: list[torch.Tensor], rows: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Σ‖FFᵀ − I‖_F (rows) or Σ‖FᵀF − I‖_F (columns) over `factors`, and each term's gradient."""
    total = factors[0].new_zeros((), dtype=torch.float32)
    grads: dict[int, torch.Tensor] = {}
    for idx in _by_shape(factors):
        stack = torch.stack([factors[i] for i in idx]).float()
        gram = stack @ stack.mT if rows else stack.mT @ stack
        gram.diagonal(dim1=1, dim2=2).sub_(1)
        norms = torch.linalg.matrix_norm(gram)
        total = total + norms.sum()
        gram.mul_((2 / norms.clamp_min(torch.finfo(torch.float32).tiny))[:, None, None])
        grad = gram @ stack if rows else stack @ gram
        if grad.dtype != factors[idx[0]].dtype:  # computed in fp32; handed back in the group's dtype
            grad = grad.to(factors[idx[0]].dtype)
        grads.update(zip(idx, grad.unbind(0), strict=True))
    return total, [grads[i] for i in range(len(factors))]


def _by_shape(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of `tensors` grouped by shape and dtype."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(tuple(t.shape), t.dtype)].append(i)
    return list(groups.values())
