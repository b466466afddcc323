"""Expert screening for the dual method: the k^t schedule (Eq. 16), top-k gate masks (Eq. 17) and the
orthogonality penalty on the expert factors (Eq. 14-15).

Schedule convention. The paper uses t2 two ways: Eq. 16 decays until t_total − t2 (t2 a length), the text
fixes the scores "during t ∈ [t2, t_total)" (t2 a time). With Table 1's t2 ratio 0.5 both agree; lrsurgery
takes the second reading: `t1` and `t2` are fractions of the run, the decay runs from T1 = round(t1·total)
to T2 = round(t2·total) (rounded half up), and the final phase [T2, total) keeps k_final with the scores frozen at T2.
Times t count optimizer steps already taken (t = step + 1 after the update of 0-based step `step`).
"""

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


def orthogonality_penalty(a_list: list[torch.Tensor], b_list: list[torch.Tensor]) -> torch.Tensor:
    """Σ over modules of ‖BᵀB − I‖_F + ‖AAᵀ − I‖_F (Eq. 14), for A (r, d_in) and B (d_out, r).

    Same-shaped factors are stacked and handled by one batched matmul and norm per shape group.
    """
    total = a_list[0].new_zeros((), dtype=torch.float32)
    for group in _by_shape(a_list):
        a = torch.stack(group).float()  # (m, r, d_in)
        gram = a @ a.transpose(1, 2)
        total = total + torch.linalg.matrix_norm(gram - torch.eye(gram.shape[-1], device=gram.device)).sum()
    for group in _by_shape(b_list):
        b = torch.stack(group).float()  # (m, d_out, r)
        gram = b.transpose(1, 2) @ b
        total = total + torch.linalg.matrix_norm(gram - torch.eye(gram.shape[-1], device=gram.device)).sum()
    return total


def _by_shape(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[tuple(t.shape)].append(t)
    return list(groups.values())
