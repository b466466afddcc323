"""TLoRA (Lin et al., 2026): task-aware frozen A from calibration statistics, ranks and alphas by sensitivity.

Init (Alg. 1, Eq. 4): A = the top-r_i right singular vectors of W·C, with C the input covariance from a
stats artifact; B = 0, so the model's output is unchanged. A is **frozen**: it gets no gradient and no
optimizer state; only B trains, and the update stays in A's row space (Eq. 2).

Where the paper and the authors' released code differ, both are offered; the defaults follow the code,
which is what produced the paper's published numbers:
- `covariance`: Alg. 1 line 9 writes C = XᵀX / n (`raw`); Appendix A speaks of Cov[X], and the released
  code subtracts each calibration sequence's mean before forming XᵀX (`centered`, default):
  C = Σ_s Σ_t (x_t − x̄_s)(x_t − x̄_s)ᵀ / n, formed from the same stats artifact (its per-sequence sums).
  LLM activations have large means, so the two can select different W·C subspaces.
- `alpha_rule`: Eq. 7 (`paper`) or the released code's max(α, round(α_total·p_i)) / r_init (`released`,
  default); see `allocate_alphas`.

Choices where the paper leaves room, all recorded in the init manifest:
- `variant="theory"` is Eq. 3: A = V_rᵀ C^{-1/2} with V from the SVD of W·C^{1/2}. C's eigenvalues are
  damped first, λ → λ + damping · mean(λ) (default 0.01, as GPTQ damps its Hessian), which keeps
  C^{-1/2} finite; its rows are not orthonormal, so its updates are larger in low-variance directions.
- `a_init` reproduces the paper's Table 12 rows with A frozen in all three: `wc` (W·C SVD, default),
  `w` (top right singular vectors of W alone) and `random` ("the standard LoRA configuration": the
  same Kaiming-uniform draw as `--method lora`, `lrsurgery.methods.lora.random_a`).
- Ranks (Eq. 6): R_total = rank × (number of target modules) shared out in proportion to the module
  sensitivity S(W) of the stats artifact, each r_i ≥ min_rank and ≤ min(d_in, d_out), the sum exact
  (water-filling + largest remainder, see tlora/allocation.py). `min_rank=0` lets a module drop out.
- Alphas (Eq. 7, or the released rule above), scale α_i / r_i. With `alpha_adapt=False` every module
  keeps α (scale α / r_i, standard LoRA); with `rank_adapt=False` every module keeps `rank`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from lrsurgery.config import option
from lrsurgery.errors import check_choice, check_count, check_number
from lrsurgery.io.artifacts import check_same_model, read_manifest
from lrsurgery.layers.spec import LowRank, ModuleAdapter
from lrsurgery.linalg.basics import Workspace, all_finite, stack_fp64
from lrsurgery.linalg.eigen import psd_power
from lrsurgery.linalg.svd import top_right_singular_vectors, top_right_singular_vectors_of_product
from lrsurgery.methods.base import Method, MethodError
from lrsurgery.methods.lora import random_a
from lrsurgery.methods.tlora.allocation import ALPHA_RULES, allocate_alphas, allocate_ranks


@dataclass
class TLoRA(Method):
    """Task-aware LoRA (see module doc). `stats` is a folder written by `lrsurgery calibrate`."""

    name: ClassVar[str] = "tlora"
    batch_by_shape: ClassVar[bool] = True
    stats: str | None = option(None, "Statistics folder from `lrsurgery calibrate` (covariances, sensitivities).")
    variant: str = option("wc", "A from the SVD of W·C (wc, Eq. 4) or the theoretical V_rᵀC^(-1/2) (theory, Eq. 3).")
    a_init: str = option("wc", "Frozen A from wc (W·C), w (W alone) or random (Table 12).")
    rank_adapt: bool = option(True, "Share the rank budget out by module sensitivity (Eq. 6); else --rank each.")
    alpha_adapt: bool = option(True, "Share the alpha budget out by module sensitivity (Eq. 7); else --alpha each.")
    min_rank: int = option(1, "Smallest rank a module gets (0 lets a module drop out).")
    damping: float = option(0.01, "theory variant: C's eigenvalues + damping × their mean.")
    covariance: str = option(
        "centered", "C from each sequence centred on its mean (centered, released code) or raw XᵀX/n."
    )
    alpha_rule: str = option("released", "Per-module scale: released (max(α, round(α_total·p_i))/r) or paper (Eq. 7).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stats is not None:  # recorded absolute, so the init manifest names it from anywhere
            self.stats = str(Path(self.stats).expanduser().resolve())
        if self.variant not in ("wc", "theory"):
            raise MethodError(f"--variant must be wc or theory, got {self.variant!r}")
        if self.a_init not in ("wc", "w", "random"):
            raise MethodError(f"--a-init must be wc, w or random, got {self.a_init!r}")
        if self.variant == "theory" and self.a_init != "wc":
            raise MethodError("--variant theory applies to --a-init wc only")
        check_choice("--covariance", self.covariance, ("centered", "raw"), error=MethodError)
        check_choice("--alpha-rule", self.alpha_rule, ALPHA_RULES, error=MethodError)
        check_count("--min-rank", self.min_rank, 0, error=MethodError)
        check_number("--damping", self.damping, 0, error=MethodError)
        self._ranks: dict[str, int] = {}
        self._alphas: dict[str, float] = {}
        self._covariance: Any = None
        self.stats_fingerprint: str | None = None  # of the stats artifact read by `prepare`
        self._workspace = Workspace()  # the fp64 stacks of one shape group, reused by the next

    @classmethod
    def budget_options(cls, rank: int, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
        """A is frozen, so only B (r_i·d_out) trains: the rank budget is LoRA's rank times
        Σ(d_in + d_out) / Σ d_out, rounded (the allocation then moves ranks between modules, so the
        trainable count is close to, not exactly, LoRA's)."""
        total = sum(d_in + d_out for d_out, d_in in shapes.values())
        return {"rank": max(1, round(rank * total / sum(d_out for d_out, _ in shapes.values())))}

    @property
    def needs_covariance(self) -> bool:
        return self.a_init == "wc"

    @property
    def needs_sensitivity(self) -> bool:
        return self.rank_adapt or self.alpha_adapt

    def prepare(self, shapes: dict[str, tuple[int, int]], model: dict[str, Any], force: bool = False) -> dict[str, Any]:
        scores = self._read_stats(shapes, model, force)
        caps = {n: min(s) for n, s in shapes.items()}
        budget = self.rank * len(shapes)
        if self.rank_adapt:
            try:
                self._ranks = allocate_ranks(scores, budget, caps, self.min_rank)
            except ValueError as exc:
                raise MethodError(str(exc)) from exc
        else:
            for name, cap in caps.items():
                if self.rank > cap:
                    raise MethodError(f"rank {self.rank} is larger than module {name} allows ({cap})")
            self._ranks = dict.fromkeys(shapes, self.rank)
        if self.alpha_adapt:
            self._alphas = allocate_alphas(scores, self._ranks, self.alpha_value, self.rank, self.alpha_rule)
        else:
            self._alphas = dict.fromkeys(shapes, self.alpha_value)
        return {
            "rank_budget": budget,
            "alpha_budget": self.alpha_value * len(shapes),
            "ranks": self._ranks,
            "alphas": self._alphas,
            "sensitivity": scores or None,
            "skipped": sorted(n for n, r in self._ranks.items() if r == 0),
            "a": {
                "init": self.a_init,
                "variant": self.variant,
                "covariance": self.covariance if self.needs_covariance else None,
                "frozen": True,
                "damping": self.damping,
            },
            "alpha_rule": self.alpha_rule if self.alpha_adapt else None,
            "b": "zeros",
            "stats_fingerprint": self.stats_fingerprint,
        }

    def _read_stats(self, shapes: dict[str, tuple[int, int]], model: dict[str, Any], force: bool) -> dict[str, float]:
        """Check the stats artifact against the model and targets; return the sensitivities (if used).

        `force` skips the model-fingerprint check only: every covariance must still be d_in × d_in."""
        names = list(shapes)
        if not (self.needs_covariance or self.needs_sensitivity):
            return {}
        if not self.stats:
            raise MethodError(
                "tlora needs --stats STATS_DIR (from `lrsurgery calibrate`) for its "
                + ("covariances" if self.needs_covariance else "sensitivities")
            )
        from lrsurgery.calibration.stats_file import CovarianceReader, load_sensitivity, stats_fingerprint

        manifest = read_manifest(self.stats, "stats")
        check_same_model(manifest, model["fingerprint"], model["source"], force, model.get("config"))
        self.stats_fingerprint = stats_fingerprint(manifest)
        if self.needs_covariance:
            if "covariance" not in manifest.config["collect"]:
                raise MethodError(f"{self.stats} has no covariances; calibrate with --collect covariance,...")
            missing = sorted(set(names) - set(manifest.extra["modules"]))
            if missing:
                raise MethodError(f"{self.stats} has no covariance for {len(missing)} target(s), e.g. {missing[0]}")
            self._covariance = CovarianceReader(Path(self.stats))
            if self.covariance == "centered" and not self._covariance.has_sequence_sums:
                raise MethodError(
                    f"{self.stats} holds no per-sequence sums (calibrated by an older lrsurgery), so the "
                    "centred covariance cannot be formed; calibrate again, or pass --covariance raw"
                )
            for name, (_, d_in) in shapes.items():
                found = self._covariance.shape(name)
                if found != (d_in, d_in):
                    raise MethodError(
                        f"{self.stats} holds a {found} covariance for {name}, whose weight takes {d_in} inputs: "
                        "the statistics were calibrated on another architecture (--force skips only the "
                        "model-fingerprint check); calibrate this model"
                    )
        if not self.needs_sensitivity:
            return {}
        if "sensitivity" not in manifest.extra:
            raise MethodError(
                f"{self.stats} has no sensitivities; calibrate with --collect covariance,sensitivity "
                "or pass --no-rank-adapt --no-alpha-adapt"
            )
        scores = load_sensitivity(Path(self.stats))
        missing = sorted(set(names) - set(scores))
        if missing:
            raise MethodError(f"{self.stats} has no sensitivity for {len(missing)} target(s), e.g. {missing[0]}")
        bad = [n for n in names if not math.isfinite(scores[n])]
        if bad:
            raise MethodError(f"{self.stats} has a non-finite sensitivity for {bad[0]}")
        return {n: scores[n] for n in names}

    def init_modules(self, weights: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, ModuleAdapter]:
        names = [n for n in weights if self._ranks[n] > 0]
        if not names:
            return {}
        d_out, d_in = weights[names[0]].shape  # one shape per call
        device = weights[names[0]].device  # where run_init put the weights: the linear algebra runs there
        for name in names:
            self.check_shape(name, weights[name], self._ranks[name])  # finite weights (ranks fit: `prepare`)
        stack = stack_fp64(
            [weights[n] for n in names], self._workspace.get("weights", (len(names), d_out, d_in), device)
        )
        a_rows = self._frozen_a(names, stack, generator)
        out = {}
        for name, a in zip(names, a_rows, strict=True):
            r, alpha = self._ranks[name], self._alphas[name]
            branch = LowRank(
                A=a[:r].float().contiguous(),
                B=torch.zeros(stack.shape[1], r),
                scale=alpha / r,
                alpha=alpha,
                dropout=self.dropout,
                frozen=("A",),
            )
            out[name] = ModuleAdapter([branch])
        return out

    def _frozen_a(self, names: list[str], stack: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """Each module's A rows (the first r_i of them are used), fp64."""
        top = max(self._ranks[n] for n in names)
        if self.a_init == "random":
            return [random_a(self._ranks[n], stack.shape[2], generator) for n in names]
        work = self._workspace
        if self.a_init == "w":
            return list(top_right_singular_vectors(stack, top, work))
        b, d_out, d_in = stack.shape
        covariances = work.get("covariances", (b, d_in, d_in), stack.device)
        for slot, name in zip(covariances, names, strict=True):
            read = self._covariance.centered_sums if self.covariance == "centered" else self._covariance.sums
            sums, tokens = read(name)
            if not all_finite(sums):
                raise MethodError(f"{self.stats} has non-finite covariance values for {name}")
            torch.div(sums.to(slot.device), tokens, out=slot)  # C = (centred) XᵀX / n, made fp64 in the same pass
        if self.variant == "wc":
            return list(top_right_singular_vectors_of_product(stack, covariances, top, work))  # Eq. 4
        roots = torch.stack([psd_power(c, 0.5, self.damping) for c in covariances])
        try:
            inverse_roots = torch.stack([psd_power(c, -0.5, self.damping) for c in covariances])
        except ValueError as exc:  # a singular C with --damping 0
            raise MethodError(
                f"--variant theory: a covariance of {names[0]}'s shape group is singular; use --damping > 0"
            ) from exc
        return list(top_right_singular_vectors(stack @ roots, top) @ inverse_roots)  # Eq. 3
