"""The adapted linear layer every method uses, and moving adapters in and out of a model.

An adapted layer computes  y = x W'ᵀ + b + s · ((dropout(x) Aᵀ) ⊙ E) Bᵀ [+ the same for an expert branch]
where W' = W0 + Σ_k B_k A_k is the frozen base weight after the recorded low-rank edits (the *edit log*),
A is (r, d_in), B is (d_out, r), s the scale and E an optional per-rank gate (r,).

A layer has a main branch (tensors `NAME.lora_A/B/E`) and optionally a second, *expert* branch with its
own rank, scale, dropout, gate E and 0/1 gate mask (tensors `NAME.expert.lora_A/B/E`, `NAME.expert.mask`),
used by the dual method. The expert's effective gate is E ⊙ mask; a masked entry contributes exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lrsurgery.branches import BranchPlan, add_branches
from lrsurgery.models import backbone

HEAD_PREFIX = "head."


@dataclass
class LowRank:
    """One low-rank branch s·B·diag(E ⊙ mask)·A: A (r, d_in), B (d_out, r), gate E and mask (r,) optional."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float
    dropout: float = 0.0
    E: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    frozen: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def gate(self) -> torch.Tensor | None:
        """The effective (r,) gate E ⊙ mask, or None for an ungated branch."""
        if self.E is None:
            return None
        return self.E if self.mask is None else self.E * self.mask.to(self.E.dtype)

    def product(self) -> torch.Tensor:
        """The dense (d_out, d_in) s·B·diag(E ⊙ mask)·A in fp64."""
        return low_rank_product(self.B, self.A, self.scale, self.gate())


@dataclass
class ModuleAdapter(LowRank):
    """Everything needed to rebuild one adapted layer: the main branch, an optional expert branch, the edit log."""

    edits: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    expert: LowRank | None = None

    def delta(self) -> torch.Tensor:
        """The dense (d_out, d_in) update Σ B_k A_k + s·B·diag(E)·A (+ the expert branch), in fp64."""
        out = self.edit_delta() + self.product()
        if self.expert is not None:
            out += self.expert.product()
        return out

    def edit_delta(self) -> torch.Tensor:
        """Σ B_k A_k over the edit log, in fp64 (merges round once, to the weight's dtype)."""
        out = torch.zeros(self.B.shape[0], self.A.shape[1], dtype=torch.float64)
        for b, a in self.edits:
            out += b.double() @ a.double()
        return out


def low_rank_product(b: torch.Tensor, a: torch.Tensor, scale: float, gate: torch.Tensor | None) -> torch.Tensor:
    """s·B·diag(E)·A in fp64 on B's device."""
    b64 = b.detach().double()
    if gate is not None:
        b64 = b64 * gate.detach().double()
    return scale * b64 @ a.detach().double().to(b64.device)


class AdaptedLinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank branch (optionally gated) and an optional gated expert branch.

    The branches run as one autograd op (`lrsurgery.branches`). The expert gate is E ⊙ mask in value; its
    gradient reaches every entry of E (straight-through for masked entries), so a masked expert keeps being
    scored and can be switched back on.
    """

    def __init__(self, base: nn.Linear, spec: ModuleAdapter):
        super().__init__()
        if spec.mask is not None:
            raise ValueError("a gate mask is supported on the expert branch only")
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        if spec.edits:
            with torch.no_grad():
                merged = self.base.weight.double() + spec.edit_delta().to(self.base.weight.device)
                self.base.weight.copy_(merged.to(self.base.weight.dtype))
        self.edits = [(b.clone(), a.clone()) for b, a in spec.edits]
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(spec.A.to(device=device, dtype=dtype).clone())
        self.lora_B = nn.Parameter(spec.B.to(device=device, dtype=dtype).clone())
        self.lora_E = nn.Parameter(spec.E.to(device=device, dtype=dtype).clone()) if spec.E is not None else None
        for name in spec.frozen:
            getattr(self, f"lora_{name}").requires_grad_(False)
        self.scale = spec.scale
        self.alpha = spec.alpha
        self.dropout = spec.dropout  # rate; the branch op draws the mask (lrsurgery.branches)
        self.has_expert = spec.expert is not None
        if spec.expert is not None:
            ex = spec.expert
            self.expert_A = nn.Parameter(ex.A.to(device=device, dtype=dtype).clone())
            self.expert_B = nn.Parameter(ex.B.to(device=device, dtype=dtype).clone())
            self.expert_E = nn.Parameter(ex.E.to(device=device, dtype=dtype).clone()) if ex.E is not None else None
            mask = (ex.mask if ex.mask is not None else torch.ones(ex.rank)).to(device=device, dtype=dtype).clone()
            self.register_buffer("expert_mask", mask if ex.E is not None else None)
            for name in ex.frozen:
                getattr(self, f"expert_{name}").requires_grad_(False)
            self.expert_scale = ex.scale
            self.expert_alpha = ex.alpha
            self.expert_dropout = ex.dropout

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def expert_gate(self) -> torch.Tensor:
        """The expert branch's effective gate E ⊙ mask (its value; its gradient is straight-through to E)."""
        return self.expert_E * self.expert_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        plans = (BranchPlan(self.scale, self.dropout),)
        factors: tuple[torch.Tensor | None, ...] = (self.lora_A, self.lora_B, self.lora_E, None)
        if self.has_expert:
            plans += (BranchPlan(self.expert_scale, self.expert_dropout),)
            factors += (self.expert_A, self.expert_B, self.expert_E, self.expert_mask)
        flat = add_branches(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), plans, factors, self.training)
        return flat.view_as(out)

    def export(self) -> ModuleAdapter:
        expert = None
        if self.has_expert:
            expert = LowRank(
                A=_cpu(self.expert_A),
                B=_cpu(self.expert_B),
                E=_cpu(self.expert_E),
                mask=_cpu(self.expert_mask),
                scale=self.expert_scale,
                alpha=self.expert_alpha,
                dropout=self.expert_dropout,
                frozen=_frozen(self, "expert"),
            )
        return ModuleAdapter(
            A=_cpu(self.lora_A),
            B=_cpu(self.lora_B),
            E=_cpu(self.lora_E),
            scale=self.scale,
            alpha=self.alpha,
            dropout=self.dropout,
            frozen=_frozen(self, "lora"),
            edits=[(b.clone(), a.clone()) for b, a in self.edits],
            expert=expert,
        )


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().cpu().clone()


def _frozen(layer: AdaptedLinear, prefix: str) -> tuple[str, ...]:
    params = {n: getattr(layer, f"{prefix}_{n}") for n in ("A", "B", "E")}
    return tuple(n for n, p in params.items() if p is not None and not p.requires_grad)


def freeze_model(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def inject(model: nn.Module, adapters: dict[str, ModuleAdapter]) -> None:
    """Freeze `model` and replace each named backbone linear with an AdaptedLinear, in place; ValueError
    (naming the module) when a module is missing, not a linear layer, or of another shape."""
    freeze_model(model)
    root = backbone(model)
    for name, spec in adapters.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = root.get_submodule(parent_name) if parent_name else root
            base = getattr(parent, child)
        except AttributeError:
            raise ValueError(f"the model has no module {name}") from None
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{name} is a {type(base).__name__}, not an nn.Linear")
        expected = (base.out_features, base.in_features)
        if (spec.B.shape[0], spec.A.shape[1]) != expected:
            raise ValueError(
                f"adapter for {name} has shape {(spec.B.shape[0], spec.A.shape[1])}, the layer is {expected}"
            )
        setattr(parent, child, AdaptedLinear(base, spec).train(base.training))  # keep the model's eval/train mode


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Every AdaptedLinear in the model, by name relative to the backbone."""
    return {n: m for n, m in backbone(model).named_modules() if isinstance(m, AdaptedLinear)}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters outside the backbone (a task head such as a classifier), by name."""
    base_ids = {id(p) for p in backbone(model).parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) not in base_ids}


def to_tensors(adapters: dict[str, ModuleAdapter]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten adapters into safetensors-ready tensors plus a JSON-able per-module description."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, spec in adapters.items():
        meta[name] = _branch_tensors(tensors, name, spec)
        for k, (b, a) in enumerate(spec.edits):
            tensors[f"{name}.edit.{k}.B"] = b
            tensors[f"{name}.edit.{k}.A"] = a
        meta[name].update(edits=len(spec.edits), shape=[spec.B.shape[0], spec.A.shape[1]])
        if spec.expert is not None:
            meta[name]["expert"] = _branch_tensors(tensors, f"{name}.expert", spec.expert)
    return tensors, meta


def _branch_tensors(tensors: dict[str, torch.Tensor], prefix: str, branch: LowRank) -> dict[str, Any]:
    tensors[f"{prefix}.lora_A"] = branch.A
    tensors[f"{prefix}.lora_B"] = branch.B
    if branch.E is not None:
        tensors[f"{prefix}.lora_E"] = branch.E
    if branch.mask is not None:
        tensors[f"{prefix}.mask"] = branch.mask
    return {
        "rank": branch.rank,
        "alpha": branch.alpha,
        "scale": branch.scale,
        "dropout": branch.dropout,
        "frozen": list(branch.frozen),
        "gated": branch.E is not None,
    }


def _branch(tensors: dict[str, torch.Tensor], prefix: str, info: Any, d_out: int, d_in: int) -> dict[str, Any]:
    """One branch's fields from its tensors, each checked against the manifest: shape, dtype, finite."""
    if not isinstance(info, dict) or not isinstance(info.get("rank"), int) or info["rank"] < 0:
        raise ValueError(f"{prefix}: the manifest's entry has no valid rank")
    r = info["rank"]
    shapes = {"lora_A": (r, d_in), "lora_B": (d_out, r), "lora_E": (r,), "mask": (r,)}
    found = {}
    for key, shape in shapes.items():
        tensor = tensors.get(f"{prefix}.{key}")
        if tensor is None:
            if key in ("lora_A", "lora_B") or (key == "lora_E" and info.get("gated")):
                raise ValueError(f"tensor {prefix}.{key} is missing")
            continue
        _check_tensor(f"{prefix}.{key}", tensor, shape)
        found[key] = tensor
    numbers = {}
    for key in ("scale", "alpha", "dropout"):
        value = info.get(key, 0.0 if key == "dropout" else None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{prefix}: the manifest's {key} is {value!r}, not a finite number")
        numbers[key] = float(value)
    return {
        "A": found["lora_A"],
        "B": found["lora_B"],
        "E": found.get("lora_E"),
        "mask": found.get("mask"),
        **numbers,
        "frozen": tuple(info.get("frozen", ())),
    }


def _check_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}; the manifest says {shape}")
    if not tensor.is_floating_point():
        raise ValueError(f"tensor {name} holds {tensor.dtype} values, not floating point")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"tensor {name} holds NaN or Inf values")


def from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, ModuleAdapter]:
    """Inverse of `to_tensors`, checking every tensor against the description (ValueError naming it)."""
    out: dict[str, ModuleAdapter] = {}
    described = {k for k in tensors if k.startswith(HEAD_PREFIX)}
    for name, info in meta.items():
        described |= {k for k in tensors if k.startswith(f"{name}.")}
        shape = info.get("shape") if isinstance(info, dict) else None
        edits = info.get("edits") if isinstance(info, dict) else None
        valid = isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)
        if not valid or not isinstance(edits, int) or edits < 0:
            raise ValueError(f"module {name}: the manifest's entry has no valid shape or edit count")
        d_out, d_in = shape
        log = []
        for k in range(edits):
            b, a = tensors.get(f"{name}.edit.{k}.B"), tensors.get(f"{name}.edit.{k}.A")
            if b is None or a is None:
                raise ValueError(f"tensor {name}.edit.{k}.{'B' if b is None else 'A'} is missing")
            width = b.shape[1] if b.ndim == 2 else 0
            _check_tensor(f"{name}.edit.{k}.B", b, (d_out, width))
            _check_tensor(f"{name}.edit.{k}.A", a, (width, d_in))
            log.append((b, a))
        expert = info.get("expert")
        out[name] = ModuleAdapter(
            **_branch(tensors, name, info, d_out, d_in),
            edits=log,
            expert=LowRank(**_branch(tensors, f"{name}.expert", expert, d_out, d_in)) if expert is not None else None,
        )
    extra = sorted(set(tensors) - described)
    if extra:
        raise ValueError(f"it holds tensors its manifest does not describe, e.g. {extra[0]}")
    return out
