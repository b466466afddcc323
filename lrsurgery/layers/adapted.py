"""The adapted linear layer every method uses, and moving adapters in and out of a model.

An adapted layer computes  y = x W'ᵀ + b + Σ_branches s · ((dropout(x) Aᵀ) ⊙ g) Bᵀ
where W' = W0 + Σ_k B_k A_k is the frozen base weight after the recorded low-rank edits (the *edit log*),
and each branch has A (r, d_in), B (d_out, r), scale s, dropout rate and an optional gate g = E ⊙ mask (r,)
(a masked entry contributes exactly 0).

A layer's parameters are named after its branches: the main branch's `lora_A`, `lora_B`, `lora_E`, a
named branch's `{name}_A`, `{name}_B`, `{name}_E` and `{name}_mask` (the dual method's `expert_*`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lrsurgery.hf.tree import backbone
from lrsurgery.layers.branches import BranchPlan, add_branches, linear_with_branches
from lrsurgery.layers.spec import MAIN_PREFIX, LowRank, ModuleAdapter

HEAD_PREFIX = "head."


@dataclass(frozen=True)
class BranchInfo:
    """The static part of one branch of a layer: its name, parameter prefix, scale, alpha and dropout rate."""

    name: str
    prefix: str
    scale: float
    alpha: float
    dropout: float

    @property
    def keys(self) -> tuple[str, str, str, str]:
        """The layer attributes holding the branch's A, B, E and mask."""
        return (f"{self.prefix}_A", f"{self.prefix}_B", f"{self.prefix}_E", f"{self.prefix}_mask")


class AdaptedLinear(nn.Module):
    """A frozen nn.Linear plus its low-rank branches (see the module doc), run as one autograd op
    (`lrsurgery.layers.branches`). A gate's value is E ⊙ mask; its gradient reaches every entry of E
    (straight-through for masked entries), so a masked expert keeps being scored and can come back
    (used by the dual method's `--masking straight-through`).
    """

    base_inside = True  # run a plain frozen nn.Linear's product inside the branch op (False: the layer runs it)

    def __init__(self, base: nn.Linear, spec: ModuleAdapter):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.edits: list[tuple[torch.Tensor, torch.Tensor]] = []
        if spec.edits:
            with torch.no_grad():
                merged = self.base.weight.double() + spec.edit_delta().to(self.base.weight.device)
                self.base.weight.copy_(merged.to(self.base.weight.dtype))
            self.edits = [(b.clone(), a.clone()) for b, a in spec.edits]
        self.branches: tuple[BranchInfo, ...] = ()
        for branch in spec.branches:
            self._add_branch(branch)
        self.plans = tuple(BranchPlan(info.scale, info.dropout) for info in self.branches)
        self._keys = tuple(key for info in self.branches for key in info.keys)  # every factor, in forward order

    def _add_branch(self, branch: LowRank) -> None:
        dtype, device = self.base.weight.dtype, self.base.weight.device
        prefix = branch.name or MAIN_PREFIX
        for key in ("A", "B", "E"):
            value = getattr(branch, key)
            param = nn.Parameter(value.to(device=device, dtype=dtype).clone()) if value is not None else None
            if param is not None and key in branch.frozen:
                param.requires_grad_(False)
            setattr(self, f"{prefix}_{key}", param)
        mask = branch.mask if branch.mask is not None else torch.ones(branch.rank)
        self.register_buffer(
            f"{prefix}_mask", mask.to(device=device, dtype=dtype).clone() if branch.E is not None else None
        )
        self.branches += (BranchInfo(branch.name, prefix, branch.scale, branch.alpha, branch.dropout),)

    def factors(self, info: BranchInfo) -> tuple[torch.Tensor | None, ...]:
        """A, B, E and mask of a branch (E and mask None when it has no gate)."""
        return tuple(getattr(self, key) for key in info.keys)

    def branch(self, name: str) -> BranchInfo | None:
        """The branch called `name` ("" for the main one), or None."""
        return next((info for info in self.branches if info.name == name), None)

    def gate(self, name: str = "") -> torch.Tensor | None:
        """The effective (r,) gate E ⊙ mask of the branch called `name`, or None for an ungated branch."""
        _, _, e, mask = self.factors(self.branch(name))
        return None if e is None else e * mask

    def expert_gate(self) -> torch.Tensor | None:
        """The dual method's expert gate E ⊙ mask."""
        return self.gate("expert")

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scale(self) -> float:
        return self.branches[0].scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = tuple(getattr(self, key) for key in self._keys)
        base = self.base
        if self.base_inside and type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks):
            return linear_with_branches(x, base.weight, base.bias, self.plans, factors, self.training)
        out = base(x)  # a subclass, or hooks to run: the base layer runs itself, the branches add into its output
        return add_branches(out, x, self.plans, factors, self.training, in_place=out.is_contiguous())

    @torch.no_grad()
    def add_edit(self, b: torch.Tensor, a: torch.Tensor) -> None:
        """Edit the frozen weight in place, W ← W + B·A (B (d_out, k), A (k, d_in)), and append (B, A) to the
        edit log, which fuse and export replay exactly. B and A are rounded to fp32 first (the edit log's
        precision), so the weight changes by exactly what is logged: summed in fp64, rounded once to W's dtype."""
        b, a = b.detach().float().cpu().clone(), a.detach().float().cpu().clone()
        weight = self.base.weight
        delta = b.to(weight.device).double() @ a.to(weight.device).double()
        if isinstance(weight, DTensor):
            # sharded by FSDP (training/sharding.py): row i of W changes by row i of B·A, so each process
            # adds the rows it holds
            delta = distribute_tensor(delta, weight.device_mesh, weight.placements).to_local()
            weight = weight.to_local()
        weight.copy_((weight.double() + delta).to(weight.dtype))
        self.edits.append((b, a))

    def export(self) -> ModuleAdapter:
        """The layer's current adapter, on the CPU in fp32: every branch and the whole edit log."""
        branches = []
        for info in self.branches:
            a, b, e, mask = (_cpu(t) for t in self.factors(info))
            frozen = tuple(
                k
                for k, p in zip("ABE", (a, b, e), strict=True)
                if p is not None and not getattr(self, f"{info.prefix}_{k}").requires_grad
            )
            branches.append(LowRank(a, b, info.scale, info.alpha, info.dropout, e, mask, frozen, info.name))
        return ModuleAdapter(branches, edits=[(b.clone(), a.clone()) for b, a in self.edits])


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().cpu().clone()


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
        if spec.shape != expected:
            raise ValueError(f"adapter for {name} has shape {spec.shape}, the layer is {expected}")
        setattr(parent, child, AdaptedLinear(base, spec).train(base.training))  # keep the model's eval/train mode


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Every AdaptedLinear in the model, by name relative to the backbone."""
    return {n: m for n, m in backbone(model).named_modules() if isinstance(m, AdaptedLinear)}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters outside the backbone (a task head such as a classifier), by name."""
    base_ids = {id(p) for p in backbone(model).parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) not in base_ids}
