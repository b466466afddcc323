"""SRLoRA (Yang et al., 2025): PiSSA whose least important rank-1 pairs are fused into the frozen weight
during training and restarted on the next unused singular directions of W0.

Init (Eq. 1-2). W0 ≈ U S Vᵀ up to `r_target` triplets (default 4·r: the paper's 32 candidates for r = 8),
scale s = α/r. The adapter is PiSSA on the top r: B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ, and W ← W0 − s·B·A is
the edit log's first entry. Directions r … r_target − 1, split the same way, are the *reserve*: kept as
factors in the init artifact's method file (`reserve_A` (k, d_in), `reserve_Bt` (k, d_out), one row per
direction in singular-value order, and `reserve_S`), read a few rows at a time at each switch. Computing
them at init costs one truncated SVD to r_target instead of r; recomputing them at train start would repeat
the SVD of every weight, and holding them in memory would cost (r_target − r)/r times the adapter.

Schedule (Eq. 13-14). r′ = max(1, ⌊γ·r + ½⌋) pairs per switch (γ = `fusion_ratio`), N = ⌈(r_target − r)/r′⌉
switches (the last takes what is left of the reserve), interval = max(1, ⌊T/N⌋) optimizer steps, or
`switch_interval`. A switch follows step t when t is a multiple of the interval and t < T: a switch after the
last step would only move pairs into W and leave their successors untrained, so it is skipped (with the
paper's interval T/N that is the N-th, and the reserve keeps its last directions). Once the reserve is
exhausted, switching stops and the metrics log says so (`srlora: "reserve exhausted"`).

Importance (Eq. 3-7): the sensitivity × uncertainty EMAs shared with the dual method
(`methods.importance`), β1 = β2 = 0.85, updated every step on the clipped gradients; pair k's score is
S_k = mean over B's column k + mean over A's row k.

Switch (Alg. 1 lines 4-10, Eq. 8-12), per module: the r′ pairs of lowest S_k (ties: lower slot first) are
fused into W and their slots refilled from the reserve, W ← W + s·B_low·A_low − s·B_new·A_new, one edit of
rank 2r′ in the edit log; the model's function is unchanged. The importance of the refilled slots restarts
from zero (Alg. 1 line 10; `importance_reset="all"` resets every pair, as the text after Eq. 12 says).
The paper is silent on AdamW's state of a refilled pair: `moments="keep"` (default) leaves the old pair's
first and second moments in its slot, `"reset"` zeroes them. AdamW keeps one step count t per buffer, so a
reset entry's first update is lr·(1 − β1)/(1 − β1^t) / √((1 − β2)/(1 − β2^t)) · sign(g): about 0.5·lr at
t = 25, 1.0·lr at t = 100 and 3.2·lr for t ≳ 3000 with β = (0.9, 0.999). The default is measured
(pipelines/srlora.sh, one seed): with "keep" the training loss after the switches was lower on both
SmolLM2 + BBC News and MiniLM classifying BBC topics; the held-out loss favoured each rule once.

Record: every pair's active interval (direction, slot, first step, last step) per module, written to the
run's `srlora_intervals.json` (drawn by `lrsurgery inspect RUN --plot`) and summarised in its manifest.
The decisions use only the synchronised gradients and the artifact's reserve, so every process of a
distributed run makes the same switches and edits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lrsurgery.config import option
from lrsurgery.errors import check_choice, check_count, check_number
from lrsurgery.io.artifacts import file_digest, read_manifest
from lrsurgery.io.shards import LazyWeights
from lrsurgery.layers.adapter_file import METHOD_FILE
from lrsurgery.layers.spec import LowRank, ModuleAdapter
from lrsurgery.linalg.svd import truncated_svd
from lrsurgery.methods.base import MethodError
from lrsurgery.methods.hooks import HookContext, TrainHooks
from lrsurgery.methods.importance import ImportanceEMA, triplet_scores
from lrsurgery.methods.pissa import PiSSA

INTERVALS_FILE = "srlora_intervals.json"


@dataclass
class SRLoRA(PiSSA):
    """Config of SRLoRA: init options (rank, r_target, alpha, svd) and train options (fusion_ratio,
    switch_interval, beta1, beta2, moments, importance_reset, given to `lrsurgery train`)."""

    name: ClassVar[str] = "srlora"
    r_target: int | None = option(None, "Directions SRLoRA may explore per module (default 4·rank).")
    fusion_ratio: float = option(0.5, "Fraction γ of the pairs recycled at each switch (Eq. 13).", stage="train")
    switch_interval: int | None = option(
        None, "Optimizer steps between switches (default: steps / number of switches, Eq. 14).", stage="train"
    )
    beta1: float = option(0.85, "Sensitivity EMA factor (Eq. 4).", stage="train")
    beta2: float = option(0.85, "Uncertainty EMA factor (Eq. 5).", stage="train")
    moments: str = option("keep", "AdamW moments of a refilled pair: keep (the old pair's) or reset.", stage="train")
    importance_reset: str = option(
        "recycled", "Importance reset at a switch: recycled pairs (Alg. 1) or all (text after Eq. 12).", stage="train"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r_target is None:
            self.r_target = 4 * self.rank
        check_count("--r-target", self.r_target, error=MethodError)
        if self.r_target <= self.rank:
            raise MethodError(
                f"--r-target {self.r_target} must be larger than --rank {self.rank}: the directions beyond the rank "
                "are what SRLoRA recycles into (with none, use --method pissa)"
            )
        check_number("--fusion-ratio", self.fusion_ratio, 0, 1, low_open=True, error=MethodError)
        if self.switch_interval is not None:
            check_count("--switch-interval", self.switch_interval, error=MethodError)
        check_number("--beta1", self.beta1, 0, 1, high_open=True, error=MethodError)
        check_number("--beta2", self.beta2, 0, 1, high_open=True, error=MethodError)
        check_choice("--moments", self.moments, ("reset", "keep"), error=MethodError)
        check_choice("--importance-reset", self.importance_reset, ("recycled", "all"), error=MethodError)

    @property
    def recycled(self) -> int:
        """r′: pairs recycled per switch."""
        return max(1, math.floor(self.fusion_ratio * self.rank + 0.5))

    @property
    def switches(self) -> int:
        """N: switches that use up the reserve (Eq. 13, the last one possibly smaller)."""
        return math.ceil((self.r_target - self.rank) / self.recycled)

    def interval(self, total_steps: int) -> int:
        """Optimizer steps between switches for a run of `total_steps` (Eq. 14, or `switch_interval`)."""
        if self.switch_interval is not None:
            return self.switch_interval
        return max(1, total_steps // self.switches)

    def init_module(self, name: str, weight: torch.Tensor, generator: torch.Generator) -> ModuleAdapter:
        self.check_shape(name, weight, self.r_target, "--r-target")
        scale = self.alpha_value / self.rank
        # in fp64, so the reserve holds W0's singular directions to fp32 rounding: refills are exactly those
        u, s, vh = truncated_svd(weight.double(), self.r_target, self.svd, self.oversample, self.power_iters, generator)
        root = torch.sqrt(s / scale)
        b, a = (u * root).float(), (root[:, None] * vh).float()  # r_target directions, PiSSA's split (Eq. 2, 11)
        r = self.rank
        branch = LowRank(a[:r].clone(), b[:, :r].clone(), scale, self.alpha_value, dropout=self.dropout)
        reserve = {"reserve_A": a[r:], "reserve_Bt": b[:, r:].T, "reserve_S": s[r:].float()}
        data = {k: v.float().contiguous().clone() for k, v in reserve.items()}
        return ModuleAdapter([branch], edits=[(-scale * branch.B, branch.A)], method_data=data)

    def prepare(self, shapes: dict[str, tuple[int, int]], model: dict[str, Any], force: bool = False) -> dict[str, Any]:
        return {"r_target": self.r_target, "reserve": f"directions {self.rank}…{self.r_target - 1} in {METHOD_FILE}"}

    def hooks(self) -> TrainHooks:
        return SRLoRAHooks(self)


class SRLoRAHooks(TrainHooks):
    """Importance EMAs of every adapter's A and B, and the fuse-and-refill switches."""

    def __init__(self, cfg: SRLoRA):
        self.cfg = cfg

    def setup(self, ctx: HookContext) -> None:
        cfg = self.cfg
        self.layers = ctx.layers()
        if not self.layers or any(layer.rank != cfg.rank for layer in self.layers.values()):
            raise MethodError(f"srlora needs every adapted module at rank {cfg.rank}")
        self.reserve = _open_reserve(ctx)
        self.names = list(self.layers)
        widths = {self.reserve.shape(f"{n}.reserve_A")[0] for n in self.names}
        if widths != {cfg.r_target - cfg.rank}:
            raise MethodError(
                f"{ctx.artifact}/{METHOD_FILE} does not hold {cfg.r_target - cfg.rank} reserve directions per module"
            )
        self.total = ctx.total_steps
        self.every = cfg.interval(self.total)
        if cfg.switch_interval is not None and self.every >= self.total:
            raise MethodError(
                f"--switch-interval {self.every} is not shorter than the run ({self.total} optimizer steps), so no "
                "switch would happen; give a smaller interval or more steps"
            )
        self.a = [layer.lora_A for layer in self.layers.values()]
        self.b = [layer.lora_B for layer in self.layers.values()]
        self.importance = ImportanceEMA(self.a + self.b, cfg.beta1, cfg.beta2)
        self.next = cfg.rank  # the next unused direction, the same for every module
        m, r = len(self.names), cfg.rank
        self.direction = torch.arange(r).repeat(m, 1)  # (M, r): the direction in each slot
        self.since = torch.zeros(m, r, dtype=torch.int64)  # (M, r): the step it became active
        self.ended: list[list[int]] = []  # [module, direction, slot, first step, last step] of fused pairs
        self.exhausted = False

    def after_backward(self, ctx: HookContext) -> None:
        self.importance.update()

    def scores(self) -> torch.Tensor:
        """(M, r) pair importance S_k (Eq. 7)."""
        imp = self.importance.scores()
        m = len(self.names)
        return triplet_scores(imp[:m], imp[m:])

    @torch.no_grad()
    def after_step(self, ctx: HookContext) -> dict[str, Any]:
        t = ctx.step + 1
        if t % self.every or t >= self.total or self.exhausted:
            return {}
        count = min(self.cfg.recycled, self.cfg.r_target - self.next)
        if count == 0:
            self.exhausted = True
            return {"srlora": "reserve exhausted"}
        low = torch.argsort(self.scores(), dim=1, stable=True)[:, :count].sort(dim=1).values  # (M, count)
        first = self.next
        for i, (name, layer) in enumerate(self.layers.items()):
            self._switch(ctx, i, name, layer, low[i], first, t)
        self.next += count
        if self.cfg.importance_reset == "all":
            for i in range(2 * len(self.names)):
                self.importance.reset(i)
        return {"srlora_switch": count, "srlora_next_direction": self.next}

    def _switch(self, ctx: HookContext, i: int, name: str, layer: Any, slots: torch.Tensor, first: int, t: int) -> None:
        """Fuse module i's pairs in `slots` into W and refill them with reserve directions first, first + 1, …
        (Eq. 9-12): W ← W + s·B_low·A_low − s·B_new·A_new, one logged edit; the function is unchanged."""
        s, rank, count = layer.scale, self.cfg.rank, len(slots)
        a, b = layer.lora_A, layer.lora_B
        rows = (first - rank, first - rank + count)
        new_a = self.reserve.rows(f"{name}.reserve_A", *rows).to(a.device, a.dtype)
        new_b = self.reserve.rows(f"{name}.reserve_Bt", *rows).T.to(b.device, b.dtype)
        ctx.edit_weight(layer, torch.cat([s * b[:, slots], -s * new_b], dim=1), torch.cat([a[slots], new_a]))
        a[slots] = new_a
        b[:, slots] = new_b
        if self.cfg.moments == "reset":
            ctx.zero_moments(a, slots)
            ctx.zero_moments(b, (slice(None), slots))
        if self.cfg.importance_reset == "recycled":
            self.importance.reset(i, slots)
            self.importance.reset(len(self.names) + i, (slice(None), slots))
        for k, slot in enumerate(slots.tolist()):
            self.ended.append([i, int(self.direction[i, slot]), slot, int(self.since[i, slot]), t])
            self.direction[i, slot], self.since[i, slot] = first + k, t

    def intervals(self) -> dict[str, list[list[int]]]:
        """Per module, every direction's [direction, slot, first step, last step] (still active: the run's end)."""
        out: dict[str, list[list[int]]] = {n: [] for n in self.names}
        for i, direction, slot, start, end in self.ended:
            out[self.names[i]].append([direction, slot, start, end])
        for i, name in enumerate(self.names):
            for slot in range(self.cfg.rank):
                out[name].append([int(self.direction[i, slot]), slot, int(self.since[i, slot]), self.total])
            out[name].sort()
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"importance.{k}": v for k, v in self.importance.state_dict().items()}
        state["direction"], state["since"] = self.direction, self.since
        state["ended"] = torch.tensor(self.ended, dtype=torch.int64).reshape(-1, 5)
        state["progress"] = torch.tensor([self.next, int(self.exhausted)])
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        self.importance.load_state_dict({k[len("importance.") :]: v for k, v in state.items() if "importance." in k})
        self.direction.copy_(state["direction"])
        self.since.copy_(state["since"])
        self.ended = state["ended"].tolist()
        self.next, exhausted = state["progress"].tolist()
        self.exhausted = bool(exhausted)

    def summary(self) -> dict[str, Any]:
        switches = sorted({end for _, _, _, _, end in self.ended})
        return {
            "srlora": {
                "r_target": self.cfg.r_target,
                "recycled_per_switch": self.cfg.recycled,
                "interval": self.every,
                "switch_steps": switches,
                "directions_used": self.next,
                "reserve_exhausted": self.exhausted or self.next == self.cfg.r_target,
                "moments": self.cfg.moments,
                "importance_reset": self.cfg.importance_reset,
                "intervals_file": INTERVALS_FILE,
            }
        }

    def files(self) -> dict[str, str]:
        record = {"steps": self.total, "rank": self.cfg.rank, "r_target": self.cfg.r_target}
        return {INTERVALS_FILE: json.dumps({**record, "modules": self.intervals()})}


def _open_reserve(ctx: HookContext) -> LazyWeights:
    """The artifact's reserve of singular directions, checked against the digest its manifest records."""
    path = ctx.artifact / METHOD_FILE if ctx.artifact else None
    if path is None or not path.is_file():
        raise MethodError(
            f"srlora trains from its init artifact, whose {METHOD_FILE} holds the reserve of singular directions; "
            f"{ctx.artifact} has none (a train artifact cannot be trained further with srlora: fuse it, or start "
            "again from the init artifact)"
        )
    recorded = read_manifest(ctx.artifact).extra.get("method_file", {}).get("sha256")
    if recorded != file_digest(path):
        raise MethodError(f"{path} does not match the digest its manifest records: it was changed or damaged")
    return LazyWeights(path)
