"""Exact export of any lrsurgery artifact as a plain PEFT LoRA adapter on the *unmodified* base model.

Every weight change lrsurgery makes is low-rank, so for each module the whole change
Δ = Σ_k B_k A_k (edit log) + s·B·diag(E)·A (+ s_e·B_e·diag(E_e ⊙ mask)·A_e for an expert branch)  is one
product  B_cat · A_cat  of concatenated factors:  B_cat = [B_1 … B_K, s·B·diag(E), s_e·B_e·diag(E_e ⊙ mask)],
A_cat = [A_1; …; A_K; A; A_e]  (gates fold into B).  The module's PEFT rank is the total
rank of that concatenation (reduced exactly to min(d_out, d_in) when the concatenation is longer, as after
many SRLoRA switches), and its alpha equals its rank so PEFT's scale α/r is 1. A module with one
branch and an empty edit log (LoRA, TLoRA) is exported as it is instead: its own A, B·diag(E), rank r
and alpha s·r, so the per-module ranks and alphas an init chose (TLoRA's allocation) are the export's. Both go into
`rank_pattern` / `alpha_pattern`. `max_rank` compresses Δ to its best rank-K approximation
(QR of both factors, SVD of the small core) and reports the relative Frobenius error."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lrsurgery import __version__
from lrsurgery.hf.tree import file_keys, module_prefix
from lrsurgery.io.artifacts import save_tensors
from lrsurgery.io.hub import write_model_card
from lrsurgery.io.outputs import check_output, output_folder, write_text_atomic
from lrsurgery.io.shards import LazyWeights
from lrsurgery.layers.adapter_file import read_adapters
from lrsurgery.layers.spec import ModuleAdapter
from lrsurgery.linalg.svd import thin_svd
from lrsurgery.stages.fuse import DTYPES, FuseConfig, base_folder, cast, check_fits, output_model

PEFT = "PEFT adapter"  # the kind of output folder the export writes (outputs.FOLDER_MARKERS)


TASK_TYPES = {"causal": "CAUSAL_LM", "classification": "SEQ_CLS", "base": "FEATURE_EXTRACTION"}


def concatenated_factors(spec: ModuleAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_cat (d_out, R), A_cat (R, d_in)) in fp64 with B_cat · A_cat = the module's whole change."""
    bs = [b.double() for b, _ in spec.edits]
    as_ = [a.double() for _, a in spec.edits]
    for branch in spec.branches:
        b = branch.B.double() * branch.scale
        gate = branch.gate()
        bs.append(b if gate is None else b * gate.double())
        as_.append(branch.A.double())
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


@dataclass
class Compressed:
    B: torch.Tensor
    A: torch.Tensor
    dropped_sq: float  # ‖Δ − Δ_K‖²_F
    total_sq: float  # ‖Δ‖²_F


def as_it_is(spec: ModuleAdapter) -> Compressed:
    """A one-branch adapter without edits as PEFT stores it: B·diag(E ⊙ mask) and A, scale kept apart;
    ‖Δ‖²_F = s²·tr((B·diag(g))ᵀ(B·diag(g)) · AAᵀ) from r×r Grams, g = E ⊙ mask."""
    gate = spec.gate()
    b, a = spec.B.double() * (1.0 if gate is None else gate.double()), spec.A.double()
    total = spec.scale**2 * float(((b.T @ b) * (a @ a.T)).sum())
    return Compressed(b, a, 0.0, total)


def compress(b: torch.Tensor, a: torch.Tensor, max_rank: int | None) -> Compressed:
    """Best rank-`max_rank` factors of B·A (Eckart–Young), from QR of both factors and an SVD of the core."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = thin_svd(rb @ ra.T)
    total = float((s**2).sum())
    if max_rank is None or max_rank >= b.shape[1]:
        return Compressed(b, a, 0.0, total)
    root = s[:max_rank].sqrt()
    return Compressed(
        B=qb @ (u[:, :max_rank] * root),
        A=(root[:, None] * vh[:max_rank]) @ qa.T,
        dropped_sq=float((s[max_rank:] ** 2).sum()),
        total_sq=total,
    )


def run_export_peft(artifact: Path, out: Path, overwrite: bool = False, force: bool = False, **options: Any) -> dict:
    """Write a PEFT LoRA adapter folder for `artifact`; return the compression report. `options` are
    FuseConfig's (max_rank, dtype, model)."""
    cfg = FuseConfig(**{"format": "peft", **options})
    max_rank, target = cfg.max_rank, DTYPES[cfg.dtype]
    check_output(out, [artifact], overwrite, PEFT)
    manifest, adapters, head = read_adapters(Path(artifact))
    folder = base_folder(manifest, cfg.model, force)
    skeleton, _, task = output_model(folder, manifest)
    prefix = module_prefix(skeleton)
    weights = LazyWeights(folder)
    check_fits(
        {f"{prefix}{n}.weight": spec for n, spec in adapters.items()}, file_keys(skeleton, weights), weights, folder
    )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    dropped = total = 0.0
    alphas: dict[str, float] = {}
    for name, spec in adapters.items():
        full = prefix + name
        if len(spec.branches) == 1 and not spec.edits and (max_rank is None or max_rank >= spec.rank):
            packed = as_it_is(spec)  # its own rank and alpha (TLoRA's allocation), no factorisation needed
            alphas[full] = spec.scale * spec.rank
        else:
            b, a = concatenated_factors(spec)
            # an edit log longer than the weight's rank (SRLoRA's switches) is reduced exactly: Δ has rank
            # ≤ min(d_out, d_in), and keeping every singular value of its core drops nothing
            limit = max_rank
            if b.shape[1] > min(spec.shape):
                limit = min(spec.shape) if max_rank is None else min(max_rank, min(spec.shape))
            packed = compress(b, a, limit)
            alphas[full] = float(packed.A.shape[0])
        tensors[f"base_model.model.{full}.lora_A.weight"] = cast(f"{full}.lora_A", packed.A, target)
        tensors[f"base_model.model.{full}.lora_B.weight"] = cast(f"{full}.lora_B", packed.B, target)
        ranks[full] = packed.A.shape[0]
        errors[full] = (packed.dropped_sq / packed.total_sq) ** 0.5 if packed.total_sq > 0 else 0.0
        dropped, total = dropped + packed.dropped_sq, total + packed.total_sq
    for name, value in head.items():
        tensors[f"base_model.model.{name}"] = cast(name, value, target)
    common = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": TASK_TYPES[task],
        "base_model_name_or_path": str(manifest.model.get("source")),
        "r": common,
        "lora_alpha": common,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in head}) or None,
        "inference_mode": True,
    }
    report = {
        "lrsurgery_version": __version__,
        "max_rank": max_rank,
        "overall_relative_error": (dropped / total) ** 0.5 if total > 0 else 0.0,
        "module_relative_error": errors,
        "module_rank": ranks,
    }
    with output_folder(out, PEFT, [artifact, folder], overwrite) as work:
        tmp = work.folder
        save_tensors(tmp / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
        write_text_atomic(tmp / "adapter_config.json", json.dumps(config, indent=2))
        write_text_atomic(tmp / "lrsurgery_export.json", json.dumps(report, indent=2))
        write_model_card(tmp, manifest, Path(artifact), fmt="peft")
    return report
