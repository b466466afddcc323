"""Rank and alpha budgets shared out by module importance (TLoRA Eq. 6-7).

Ranks: the continuous share of module i is x_i = clamp(λ·S_i, min_rank, cap_i) with λ chosen so that
Σ x_i = R_total (water-filling: a module held at `min_rank` or at its cap min(d_in, d_out) hands the
rest of the budget to the others in proportion to their scores; without bounds this is Eq. 6's
R_total·S_i/ΣS). The shares are then rounded by the largest-remainder method: every share is floored
and the ranks still missing go one each to the largest fractional parts (ties: higher score, then
name), so Σ r_i = R_total exactly and every r_i stays within its bounds."""

from __future__ import annotations

import math


class AllocationError(ValueError):
    """The budget cannot be shared out under the given bounds."""


def allocate_ranks(scores: dict[str, float], budget: int, caps: dict[str, int], min_rank: int = 1) -> dict[str, int]:
    """Integer ranks summing to `budget`, proportional to `scores` within [min_rank, caps[name]]."""
    names = sorted(scores)
    if not names:
        raise AllocationError("there are no modules to share the rank budget between")
    if any(not math.isfinite(s) or s < 0 for s in scores.values()):
        raise AllocationError("module sensitivities must be finite and non-negative")
    too_small = [n for n in names if caps[n] < min_rank]
    if too_small:
        raise AllocationError(f"module {too_small[0]} can hold rank {caps[too_small[0]]}, less than --min-rank")
    if budget < min_rank * len(names):
        raise AllocationError(
            f"a budget of {budget} ranks cannot give each of {len(names)} modules --min-rank {min_rank}"
        )
    if budget > sum(caps[n] for n in names):
        raise AllocationError(f"a budget of {budget} ranks exceeds what the modules can hold ({sum(caps.values())})")
    if sum(scores.values()) <= 0:
        raise AllocationError("every module sensitivity is zero; there is nothing to allocate by")

    def total(lam: float) -> float:
        return sum(min(caps[n], max(min_rank, lam * scores[n])) for n in names)

    low, high = 0.0, 1.0
    while total(high) < budget:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if total(mid) < budget else (low, mid)
    shares = {n: min(caps[n], max(min_rank, high * scores[n])) for n in names}
    bound = {n for n in names if shares[n] in (min_rank, caps[n])}
    free = [n for n in names if n not in bound]
    if free:  # exact λ once the bounded modules are known
        lam = (budget - sum(shares[n] for n in bound)) / sum(scores[n] for n in free)
        shares.update({n: lam * scores[n] for n in free})
    ranks = {n: min(caps[n], max(min_rank, math.floor(shares[n] + 1e-9))) for n in names}
    missing = budget - sum(ranks.values())
    order = sorted(free, key=lambda n: (-(shares[n] - ranks[n]), -scores[n], n))
    for name in order[:missing]:
        ranks[name] += 1
    if sum(ranks.values()) != budget:  # cannot happen with consistent bounds; guard the invariant
        raise AllocationError(f"rank allocation sums to {sum(ranks.values())}, not {budget}")
    return ranks


ALPHA_RULES = ("paper", "released")


def allocate_alphas(
    scores: dict[str, float], ranks: dict[str, int], alpha: float, rank: int, rule: str = "paper"
) -> dict[str, float]:
    """Each module's LoRA alpha α_i, whose scale is α_i / r_i, with p_i = S_i / ΣS and α_total = α × modules:

    - `paper` (Eq. 7): α_i = r_i · (α_total / r_init) · p_i, so the scale is α_total · p_i / r_init: a module
      of average importance gets α / r_init, a below-average one less.
    - `released` (the authors' code): α'_i = max(α, round(α_total · p_i)) divided by the *configured*
      r_init, i.e. scale α'_i / r_init (the code sets PEFT's scaling from r before r_i replaces it): no
      module's scale falls below α / r_init. Returned as α_i = r_i · α'_i / r_init, so α_i / r_i is that scale."""
    total = sum(scores.values())
    alpha_total = alpha * len(scores)
    if rule == "paper":
        return {n: ranks[n] * (alpha_total / rank) * scores[n] / total for n in scores}
    return {n: ranks[n] * max(alpha, round(alpha_total * scores[n] / total)) / rank for n in scores}
