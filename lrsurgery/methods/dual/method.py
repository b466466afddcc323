"""DMC-LoRA, "dual" (Cao et al., 2025): a shared PiSSA module plus a gated, screened expert module.

Each adapted layer computes  y = W_res x + s·B_s A_s x + s·B_e diag(E ⊙ m) A_e dropout_p(x)   (Eq. 2)
with A_s (r_share, d_in), B_s (d_out, r_share), A_e (r_expert, d_in), B_e (d_out, r_expert), gate E and
0/1 mask m (r_expert,), and one scale s = α / (r_share + r_expert) for both modules (default α = r_share +
r_expert, so s = 1 as for a LoRA of the same total rank).

Init.
- Shared module: PiSSA on the top r_share singular triplets (Eq. 3-6): s·B_s·A_s = U_r S_r V_rᵀ, the residual
  W_res = W − s·B_s·A_s recorded in the edit log as (−s·B_s, A_s); dropout 0 (Sec. 3.1.2).
- Expert module: A_e with orthonormal rows and B_e with orthonormal columns (QR of a seeded Gaussian), E = 0,
  m = 1, dropout p. E = 0 makes the expert's output exactly 0, so the model is unchanged at step 0, while
  ∂L/∂E_i = s·(B_eᵢᵀ ∂L/∂y)(A_eᵢ x) ≠ 0, so E learns from the first step and A_e, B_e follow once E ≠ 0
  (AdaLoRA's choice). Orthonormal factors start the orthogonality penalty (Eq. 14) at its minimum, so it
  does not pull the expert's scale around; the singular values live in E, as the screening assumes.

Training (`DualHooks`).
- Importance (Eq. 8-13, `lrsurgery.methods.importance`) after clipping, on the applied gradients, up to T2.
- Orthogonality loss (Eq. 14-15), logged as `orth_loss`; the logged `loss` is the task loss alone. Eq. 15
  adds γ·R to the loss without saying how R sums over a model's modules; lrsurgery takes AdaLoRA's
  convention, which DMC-LoRA's screening follows: γ times the *mean over the 2M factors* (every A_e and
  every B_e counts once) of ‖B_eᵀB_e − I‖_F and ‖A_e A_eᵀ − I‖_F, i.e. γ/(2M)·Σ_modules R, so Table 1's
  γ = 0.1-0.3 means what it meant there and does not grow with the number of adapted modules. It depends
  on the parameters alone, so its gradient is added in closed form to the factors' gradients once per
  step, before clipping (`add_gradients`): the same update as adding it to the loss, without an autograd
  graph over 420 factors.
- Screening (Eq. 16-17, `lrsurgery.screening`): every ΔT steps in [T1, T2) and once at T2, the top-k^t
  triplets of each module stay on; after T2 the scores and the choice are frozen. `masking` says how an
  expert is switched off:
  - `zero` (default; Eq. 17 as written, and AdaLoRA's `masked_fill`): its gate value E_i is set to 0.
    It stays in the optimizer with its moments and keeps its true gradient, so between screenings it
    regrows from 0 and its sensitivity |E_i·∂L/∂E_i| starts again from 0: it comes back only if it earns
    its place again. In the final phase [T2, total) the switched-off E_i are zeroed after every step
    (AdaLoRA's fixed rank pattern), so they stay off. The layers' mask buffers stay 1 during training and
    take the final choice at the last step, where the masked E_i are 0: the function is unchanged.
  - `straight-through` (lrsurgery's earlier behaviour): E keeps its value; the forward uses E ⊙ m (a
    masked expert adds exactly 0) but E's gradient passes the mask, so a masked expert keeps its score
    and returns with its old E_i when it ranks in the top k^t again.

Ablations (paper Table 4): `all`; `e-only` (Test-Base: the gate E, LoRA-initialised shared module with the
expert dropout, no screening); `shared-only` (Test-Share: PiSSA shared module, no screening);
`expert-only` (Test-Expert: LoRA-initialised shared module, screening and orthogonality loss)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lrsurgery.config import option
from lrsurgery.errors import check_choice, check_count, check_number
from lrsurgery.layers.adapted import AdaptedLinear
from lrsurgery.layers.spec import LowRank, ModuleAdapter
from lrsurgery.methods.base import MethodError
from lrsurgery.methods.dual.screening import k_at, orthogonality_penalty, phase_bounds, top_k_mask
from lrsurgery.methods.hooks import HookContext, TrainHooks
from lrsurgery.methods.importance import ImportanceEMA, triplet_scores
from lrsurgery.methods.lora import random_a
from lrsurgery.methods.pissa import PiSSA

# ablation -> (PiSSA shared module with dropout 0, importance screening + orthogonality loss)
ABLATIONS: dict[str, tuple[bool, bool]] = {
    "all": (True, True),
    "e-only": (False, False),
    "shared-only": (True, False),
    "expert-only": (False, True),
}


MASKINGS = ("zero", "straight-through")
EXPERT_INIT = "A_e orthonormal rows, B_e orthonormal columns, E = 0, mask = 1"


@dataclass
class Dual(PiSSA):
    """Config of the dual method; init options (r_share, r_expert, expert_dropout, ablation, alpha, svd) and
    train options (k_final, t1, t2, delta_t, beta1, beta2, orth_weight, given to `lrsurgery train`)."""

    name: ClassVar[str] = "dual"
    r_share: int | None = option(None, "Rank of the shared (PiSSA) module.")
    r_expert: int | None = option(None, "Rank of the gated expert module.")
    expert_dropout: float = option(0.05, "Dropout on the expert module's input.")
    ablation: str = option("all", "Table 4 row: all, e-only, shared-only or expert-only.")
    # k_final default: round(0.75·r_expert), "slightly below r_expert" (Table 1)
    k_final: int | None = option(None, "Experts kept per module at the end (default 0.75·r_expert).", stage="train")
    t1: float = option(0.15, "Fraction of the run before screening starts.", stage="train")
    t2: float = option(0.5, "Fraction at which k reaches k_final and the scores freeze.", stage="train")
    delta_t: int = option(10, "Steps between screenings.", stage="train")
    beta1: float = option(0.85, "Sensitivity EMA factor (Eq. 9).", stage="train")
    beta2: float = option(0.85, "Uncertainty EMA factor (Eq. 11).", stage="train")
    orth_weight: float = option(
        0.1, "Orthogonality loss weight γ (Eq. 15), on the mean over all A_e and B_e.", stage="train"
    )
    masking: str = option(
        "zero", "How screening switches an expert off: zero (E_i = 0, Eq. 17) or straight-through.", stage="train"
    )

    def __post_init__(self) -> None:
        if self.r_share is None or self.r_expert is None:
            raise MethodError("--method dual needs --r-share and --r-expert")
        check_count("--r-share", self.r_share, error=MethodError)
        check_count("--r-expert", self.r_expert, error=MethodError)
        if self.rank not in (None, self.r_share + self.r_expert) or self.dropout not in (None, 0.0):
            raise MethodError("--method dual takes --r-share, --r-expert and --expert-dropout, not --rank or --dropout")
        self.rank = self.r_share + self.r_expert
        super().__post_init__()
        check_number("--expert-dropout", self.expert_dropout, 0, 1, high_open=True, error=MethodError)
        check_choice("--ablation", self.ablation, tuple(ABLATIONS), error=MethodError)
        if self.k_final is None:
            self.k_final = max(1, round(0.75 * self.r_expert))
        if (
            isinstance(self.k_final, bool)
            or not isinstance(self.k_final, int)
            or not 1 <= self.k_final <= self.r_expert
        ):
            raise MethodError(f"--k-final must be between 1 and --r-expert ({self.r_expert}), got {self.k_final}")
        if not 0 <= self.t1 < self.t2 <= 1:
            raise MethodError(f"--t1 and --t2 must satisfy 0 ≤ t1 < t2 ≤ 1, got t1={self.t1}, t2={self.t2}")
        check_count("--delta-t", self.delta_t, error=MethodError)
        check_number("--beta1", self.beta1, 0, 1, high_open=True, error=MethodError)
        check_number("--beta2", self.beta2, 0, 1, high_open=True, error=MethodError)
        check_number("--orth-weight", self.orth_weight, 0, 1e3, error=MethodError)  # the paper uses 0.1-0.3
        check_choice("--masking", self.masking, MASKINGS, error=MethodError)

    @classmethod
    def budget_options(cls, rank: int, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
        """r_share + r_expert = rank, split in half (Table 1's commonsense column splits 8 as 4 + 4); the
        gates add r_expert parameters per module, under 0.1 % of the factors'."""
        return {"r_share": max(1, rank // 2), "r_expert": max(1, rank - rank // 2)}

    @property
    def shared_init(self) -> bool:
        return ABLATIONS[self.ablation][0]

    @property
    def screening(self) -> bool:
        return ABLATIONS[self.ablation][1]

    def init_module(self, name: str, weight: torch.Tensor, generator: torch.Generator) -> ModuleAdapter:
        d_out, d_in = weight.shape
        self.check_shape(name, weight, self.rank, "r_share + r_expert =")
        scale = self.alpha_value / self.rank
        edits = []
        if self.shared_init:
            b, a = self.principal_factors(weight, self.r_share, scale, generator)
            shared = LowRank(A=a, B=b, scale=scale, alpha=self.alpha_value, dropout=0.0)
            edits = [(-scale * b, a)]
        else:  # LoRA init (Kaiming-uniform A, B = 0) with the expert's dropout
            b = torch.zeros(d_out, self.r_share)
            shared = LowRank(
                A=random_a(self.r_share, d_in, generator),
                B=b,
                scale=scale,
                alpha=self.alpha_value,
                dropout=self.expert_dropout,
            )
        expert = LowRank(
            A=_orthonormal(d_in, self.r_expert, generator).T.contiguous(),
            B=_orthonormal(d_out, self.r_expert, generator),
            E=torch.zeros(self.r_expert),
            mask=torch.ones(self.r_expert),
            scale=scale,
            alpha=self.alpha_value,
            dropout=self.expert_dropout,
            name="expert",
        )
        return ModuleAdapter([shared, expert], edits=edits)

    def prepare(self, shapes: dict[str, tuple[int, int]], model: dict[str, Any], force: bool = False) -> dict[str, Any]:
        return {"expert_init": EXPERT_INIT, "ablation": self.ablation, "scale": self.alpha_value / self.rank}

    def hooks(self) -> TrainHooks:
        return DualHooks(self)


def _orthonormal(d: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """(d, r) with orthonormal columns: Q of a seeded Gaussian, signs fixed by R's diagonal."""
    q, rr = torch.linalg.qr(torch.randn(d, r, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(rr))).float()


class DualHooks(TrainHooks):
    """Importance EMAs, orthogonality loss and top-k^t gate masking of every expert module."""

    def __init__(self, cfg: Dual):
        self.cfg = cfg
        self.schedule: list[list[int]] = []  # [t, k] at each screening

    def setup(self, ctx: HookContext) -> None:
        layers: dict[str, AdaptedLinear] = {
            n: m for n, m in ctx.layers().items() if getattr(m, "expert_E", None) is not None
        }
        if not layers:
            raise MethodError("the dual method found no gated expert modules in the model")
        ranks = {m.expert_E.numel() for m in layers.values()}
        if len(ranks) != 1:
            raise MethodError(f"the dual method needs one expert rank for every module, found {sorted(ranks)}")
        self.names = list(layers)
        self.total = ctx.total_steps
        self.lo, self.hi = phase_bounds(ctx.total_steps, self.cfg.t1, self.cfg.t2)
        self.hi = max(self.hi, 1)
        self.a = [m.expert_A for m in layers.values()]
        self.b = [m.expert_B for m in layers.values()]
        self.e = [m.expert_E for m in layers.values()]
        # one (M, r) tensor of screening choices; with straight-through masking each layer's mask buffer is
        # a view of a row, so one copy_ updates all; with zero masking the layers' masks stay 1 until the end
        self.layers = list(layers.values())
        self.masks = torch.stack([m.expert_mask for m in self.layers])
        if self.cfg.masking == "straight-through":
            for i, m in enumerate(self.layers):
                m.expert_mask = self.masks[i]
        params = self.a + self.b + self.e
        self.importance = ImportanceEMA(params, self.cfg.beta1, self.cfg.beta2) if self.cfg.screening else None
        self.schedule = []

    def k(self, t: int) -> int:
        """Experts kept per module after t optimizer steps (Eq. 16)."""
        return k_at(t, self.total, self.cfg.r_expert, self.cfg.k_final, self.cfg.t1, self.cfg.t2)

    @torch.no_grad()
    def add_gradients(self, ctx: HookContext) -> dict[str, float]:
        """γ·mean over modules of the orthogonality penalty (Eq. 14-15): its closed-form gradient goes into
        the expert factors' `.grad` before clipping, its value is logged as `orth_loss`."""
        if not self.cfg.screening or self.cfg.orth_weight == 0:
            return {}
        penalty, grads_a, grads_b = orthogonality_penalty(self.a, self.b)
        weight = self.cfg.orth_weight / (2 * len(self.a))  # γ on the mean over every A_e and B_e (AdaLoRA)
        params = self.a + self.b
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_add_([p.grad for p in params], grads_a + grads_b, alpha=weight)
        return {"orth_loss": weight * float(penalty)}

    def after_backward(self, ctx: HookContext) -> None:
        if self.cfg.screening and ctx.step + 1 <= self.hi:
            self.importance.update()

    def scores(self) -> torch.Tensor:
        """Current triplet importance (M, r_expert), Eq. 13."""
        m = len(self.names)
        imp = self.importance.scores()
        return triplet_scores(imp[:m], imp[m : 2 * m], imp[2 * m :])

    @torch.no_grad()
    def after_step(self, ctx: HookContext) -> dict[str, Any]:
        if not self.cfg.screening:
            return {}
        t = ctx.step + 1
        logged: dict[str, Any] = {"expert_k": self.k(t)}
        screened = (self.lo <= t < self.hi and t % self.cfg.delta_t == 0) or t == self.hi
        if screened:
            k = self.k(t)
            self.masks.copy_(top_k_mask(self.scores(), k))  # Eq. 17; frozen from T2 on
            self.schedule.append([t, k])
            logged["expert_screened"] = True
        if self.cfg.masking == "zero" and (screened or t > self.hi):
            torch._foreach_mul_(self.e, [row.to(e.dtype) for row, e in zip(self.masks, self.e, strict=True)])
        if self.cfg.masking == "zero" and t == self.total:  # the switched-off E_i are 0: the function is unchanged
            for row, layer in zip(self.masks, self.layers, strict=True):
                layer.expert_mask.copy_(row)
        logged["expert_active"] = int(self.masks.sum())
        if t == self.total:
            logged["expert_masks"] = self.active()
        return logged

    def active(self) -> dict[str, list[int]]:
        """Indices of the unmasked experts of each module."""
        return {n: torch.nonzero(row).flatten().tolist() for n, row in zip(self.names, self.masks, strict=True)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.importance is None:
            return {}
        state = {f"importance.{k}": v for k, v in self.importance.state_dict().items()}
        state["masks"] = self.masks
        state["schedule"] = torch.tensor(self.schedule, dtype=torch.int64).reshape(-1, 2)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state or self.importance is None:
            return
        self.masks.copy_(state["masks"])
        self.importance.load_state_dict({k[len("importance.") :]: v for k, v in state.items() if "importance." in k})
        self.schedule = state["schedule"].tolist()

    def summary(self) -> dict[str, Any]:
        return {
            "dual": {
                "ablation": self.cfg.ablation,
                "masking": self.cfg.masking,
                "expert_init": EXPERT_INIT,
                "phases": {"T1": self.lo, "T2": self.hi, "total": self.total},
                "k_schedule": self.schedule,
                "active_experts": self.active(),
            }
        }
