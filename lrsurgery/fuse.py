"""The `fuse` stage: merge the edit log and adapters into W and write a standard HF model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lrsurgery.adapters import merge_into_model
from lrsurgery.artifacts import atomic_folder, write_text_atomic
from lrsurgery.surgery import load_adapted

COPIED_FILES = ("generation_config.json",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_fuse(
    artifact: Path,
    out: Path,
    dtype: str = "fp32",
    shard_size: str = "2GB",
    overwrite: bool = False,
    force: bool = False,
) -> Path:
    """Write W0 + edits + s·B·diag(E)·A for every adapted module as a plain model folder; return `out`.

    The folder loads with `transformers` alone (no lrsurgery): sharded safetensors with an index when
    larger than `shard_size`, config (with labels for a classifier), tokenizer and generation config.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    loaded, manifest = load_adapted(Path(artifact), force=force)
    model = loaded.model
    merge_into_model(model)
    target = DTYPES[dtype]
    if target == torch.float16:
        _check_fp16_range(model)
    model = model.to(target)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=shard_size)
        loaded.tokenizer.save_pretrained(tmp)
        for name in COPIED_FILES:
            if (loaded.folder / name).is_file() and not (tmp / name).exists():
                shutil.copy2(loaded.folder / name, tmp / name)
        provenance = {
            "lrsurgery_version": manifest.lrsurgery_version,
            "from_artifact": str(Path(artifact).resolve()),
            "kind": manifest.kind,
            "method": manifest.config.get("method"),
            "base_model": manifest.model,
            "data": manifest.data,
            "dtype": dtype,
        }
        write_text_atomic(tmp / "lrsurgery_fuse.json", json.dumps(provenance, indent=2, default=str))
    return out


def _check_fp16_range(model: torch.nn.Module) -> None:
    limit = torch.finfo(torch.float16).max
    for name, p in model.named_parameters():
        if p.abs().max() > limit:
            raise ValueError(f"tensor {name} has values beyond the fp16 range (±{limit:.0f}); use --dtype bf16 or fp32")
