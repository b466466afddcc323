"""The adapted linear layer every method uses, and moving adapters in and out of a model.

An adapted layer computes  y = x W'ᵀ + b + s · ((dropout(x) Aᵀ) ⊙ E) Bᵀ [+ the same for an expert branch]
where W' = W0 + Σ_k B_k A_k is the frozen base weight after the recorded low-rank edits (the *edit log*),
A is (r, d_in), B is (d_out, r), s the scale and E an optional per-rank gate (r,).

A layer has a main branch (tensors `NAME.lora_A/B/E`) and optionally a second, *expert* branch with its
own rank, scale, dropout, gate E and 0/1 gate mask (tensors `NAME.expert.lora_A/B/E`, `NAME.expert.mask`),
used by the dual method. The expert's effective gate is E ⊙ mask; a masked entry contributes exactly 0."""

from __future__ import annotations

import torch
from torch import nn

from lrsurgery.hf.tree import backbone
from lrsurgery.layers.branches import BranchPlan, add_branches
from lrsurgery.layers.spec import LowRank, ModuleAdapter

HEAD_PREFIX = "head."


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
