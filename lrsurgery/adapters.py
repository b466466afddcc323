"""The adapted linear layer every method uses, and moving adapters in and out of a model.

An adapted layer computes  y = x W'ᵀ + b + s · ((dropout(x) Aᵀ) ⊙ E) Bᵀ  where
W' = W0 + Σ_k B_k A_k is the frozen base weight after the recorded low-rank edits (the *edit log*),
A is (r, d_in), B is (d_out, r), s the scale and E an optional per-rank gate (r,).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrsurgery.models import backbone

HEAD_PREFIX = "head."


@dataclass
class ModuleAdapter:
    """Everything needed to rebuild one adapted layer: factors, scale and the edit log."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float
    dropout: float = 0.0
    E: torch.Tensor | None = None
    frozen: tuple[str, ...] = ()
    edits: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense (d_out, d_in) update s·B·diag(E)·A + Σ B_k A_k, in fp64."""
        return self.edit_delta() + low_rank_product(self.B, self.A, self.scale, self.E)

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
    """A frozen nn.Linear plus one trainable low-rank branch (optionally gated)."""

    def __init__(self, base: nn.Linear, spec: ModuleAdapter):
        super().__init__()
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
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = F.linear(self.dropout(x), self.lora_A)
        if self.lora_E is not None:
            h = h * self.lora_E
        return out + F.linear(h, self.lora_B) * self.scale

    def export(self) -> ModuleAdapter:
        frozen = tuple(
            n for n in ("A", "B", "E") if (p := getattr(self, f"lora_{n}")) is not None and not p.requires_grad
        )
        return ModuleAdapter(
            A=self.lora_A.detach().float().cpu().clone(),
            B=self.lora_B.detach().float().cpu().clone(),
            E=None if self.lora_E is None else self.lora_E.detach().float().cpu().clone(),
            scale=self.scale,
            alpha=self.alpha,
            dropout=self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0,
            frozen=frozen,
            edits=[(b.clone(), a.clone()) for b, a in self.edits],
        )


def freeze_model(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def inject(model: nn.Module, adapters: dict[str, ModuleAdapter]) -> None:
    """Freeze `model` and replace each named backbone linear with an AdaptedLinear, in place."""
    freeze_model(model)
    root = backbone(model)
    for name, spec in adapters.items():
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is a {type(base).__name__}, not an nn.Linear")
        expected = (base.out_features, base.in_features)
        if (spec.B.shape[0], spec.A.shape[1]) != expected:
            raise ValueError(
                f"adapter for {name} has shape {(spec.B.shape[0], spec.A.shape[1])}, the layer is {expected}"
            )
        setattr(parent, child, AdaptedLinear(base, spec))


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
        tensors[f"{name}.lora_A"] = spec.A
        tensors[f"{name}.lora_B"] = spec.B
        if spec.E is not None:
            tensors[f"{name}.lora_E"] = spec.E
        for k, (b, a) in enumerate(spec.edits):
            tensors[f"{name}.edit.{k}.B"] = b
            tensors[f"{name}.edit.{k}.A"] = a
        meta[name] = {
            "rank": spec.rank,
            "alpha": spec.alpha,
            "scale": spec.scale,
            "dropout": spec.dropout,
            "frozen": list(spec.frozen),
            "edits": len(spec.edits),
            "shape": [spec.B.shape[0], spec.A.shape[1]],
        }
    return tensors, meta


def from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, ModuleAdapter]:
    """Inverse of `to_tensors`."""
    out: dict[str, ModuleAdapter] = {}
    for name, info in meta.items():
        try:
            out[name] = ModuleAdapter(
                A=tensors[f"{name}.lora_A"],
                B=tensors[f"{name}.lora_B"],
                E=tensors.get(f"{name}.lora_E"),
                scale=float(info["scale"]),
                alpha=float(info["alpha"]),
                dropout=float(info.get("dropout", 0.0)),
                frozen=tuple(info.get("frozen", ())),
                edits=[(tensors[f"{name}.edit.{k}.B"], tensors[f"{name}.edit.{k}.A"]) for k in range(info["edits"])],
            )
        except KeyError as exc:
            raise KeyError(f"adapter file lacks tensor {exc} for module {name}") from exc
    return out
