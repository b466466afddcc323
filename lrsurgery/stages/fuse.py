"""The `fuse` stage: W0 + edit log + adapters, streamed shard by shard into a standard model folder.

The base model is never instantiated: its safetensors are read one tensor at a time, each adapted
weight is merged in fp64 (W0 + Σ B_k A_k + s·B·diag(E)·A), cast to the output dtype and written into
size-capped shards. Peak memory is about one output shard plus the adapter, not the model."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lrsurgery import __version__
from lrsurgery.config import option
from lrsurgery.errors import ArtifactError, OptionError, check_choice, check_count
from lrsurgery.hf.load import default_task, model_class
from lrsurgery.hf.resolve import model_config, model_fingerprint, resolve_model
from lrsurgery.hf.tree import file_keys, module_prefix
from lrsurgery.io.artifacts import Manifest, check_same_model
from lrsurgery.io.outputs import check_output, output_folder, write_text_atomic
from lrsurgery.io.shards import LazyWeights, ShardWriter, parse_size
from lrsurgery.layers.adapter_file import read_adapters
from lrsurgery.progress import progress
from lrsurgery.stages.adapted import base_source

MERGED = "merged model"  # the kind of output folder fuse writes (outputs.FOLDER_MARKERS)


# fp64 writes the merge exactly as computed (for checking a fuse against the adapted model in fp64)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def base_folder(manifest: Manifest, model: str | None, force: bool) -> Path:
    """The artifact's base model folder (or `model`), checked against the recorded fingerprint."""
    source = base_source(manifest, model)
    folder = resolve_model(source)
    check_same_model(manifest, model_fingerprint(folder), str(source), force, model_config(folder))
    return folder


def output_model(folder: Path, manifest: Manifest) -> tuple[torch.nn.Module, Any, str]:
    """An empty (meta-device) model of the output class, its config, and the task it is for."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    head = manifest.extra.get("head") or {}
    task = head.get("task") or default_task(folder)
    if task == "classification":
        labels = {int(k): v for k, v in head["id2label"].items()}
        config.num_labels = len(labels)
        config.id2label, config.label2id = labels, {v: k for k, v in labels.items()}
    with torch.device("meta"):
        model = model_class(task).from_config(config)
    config.architectures = [type(model).__name__]
    return model, config, task


@dataclass
class FuseConfig:
    """What `fuse` writes and where it pushes it (every field is a flag of `lrsurgery fuse`)."""

    format: str = option("hf", "hf: a merged transformers model; peft: a LoRA adapter for the unmodified base.")
    dtype: str = option("fp32", "Dtype of the written tensors: fp32, bf16, fp16 or fp64.")
    shard_size: str = option("5GB", "Largest safetensors shard (hf), e.g. 500MB, 5GB.")
    max_rank: int | None = option(None, "peft: compress each module's change to rank ≤ K by SVD, with its error.")
    model: str | None = option(None, "Base model to read (default: the one the artifact names).")
    push_to_hub: str | None = option(None, "Upload the output to this Hub repository, USER/NAME.")
    private: bool = option(False, "With --push-to-hub: create the repository as private.")
    revision: str | None = option(None, "With --push-to-hub: the branch to upload to (created if missing).")
    dry_run: bool = option(False, "With --push-to-hub: list what would be uploaded.")

    def __post_init__(self) -> None:
        check_choice("--format", self.format, ("hf", "peft"))
        check_choice("--dtype", self.dtype, tuple(DTYPES))
        self.max_bytes = parse_size(self.shard_size)
        check_count("--max-rank", self.max_rank)
        if self.max_rank is not None and self.format != "peft":
            raise OptionError("--max-rank applies to --format peft")
        if not self.push_to_hub and (self.private or self.revision or self.dry_run):
            raise OptionError("--private, --revision and --dry-run apply to --push-to-hub USER/NAME")
        if self.push_to_hub:
            from lrsurgery.io.hub import check_repo_id

            check_repo_id(self.push_to_hub)


def run_fuse(artifact: Path, out: Path, overwrite: bool = False, force: bool = False, **options: Any) -> Path:
    """Write the merged model of an init/train artifact as a plain transformers folder; return `out`.
    `options` are FuseConfig's (dtype, shard_size, model)."""
    cfg = FuseConfig(**options)
    target = DTYPES[cfg.dtype]
    check_output(out, [artifact], overwrite, MERGED)
    manifest, adapters, head = read_adapters(Path(artifact))
    folder = base_folder(manifest, cfg.model, force)
    skeleton, config, _ = output_model(folder, manifest)
    prefix = module_prefix(skeleton)
    by_key = {f"{prefix}{name}.weight": spec for name, spec in adapters.items()}
    weights = LazyWeights(folder)
    sources = file_keys(skeleton, weights)  # output name -> file name, in file order
    check_fits(by_key, sources, weights, folder)
    plan = [
        (name, weights.shape(k), target if weights.dtype(k).is_floating_point else weights.dtype(k))
        for name, k in sources.items()
    ]
    plan += [(name, tuple(t.shape), target) for name, t in head.items()]
    with output_folder(out, MERGED, [artifact, folder], overwrite) as work:
        tmp = work.folder
        writer = ShardWriter(tmp, plan, cfg.max_bytes)
        check_disk(out, writer.total_size)
        for name, _, _ in progress(plan, desc="fuse", unit="tensor"):
            if name in by_key:
                writer.write(name, cast(name, weights.get(sources[name], torch.float64) + by_key[name].delta(), target))
            elif name in sources:  # untouched: copied in row blocks, never whole
                writer.write(name, (cast(name, block, target) for block in weights.row_chunks(sources[name])))
            else:
                writer.write(name, cast(name, head[name], target))
        writer.close()
        config.dtype = target
        config.save_pretrained(tmp)
        for name in SIDE_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
        provenance = {
            "from_artifact": str(Path(artifact).resolve()),
            "kind": manifest.kind,
            "method": manifest.config.get("method"),
            "base_model": manifest.model,
            "data": manifest.data,
            "dtype": cfg.dtype,
            "artifact_lrsurgery_version": manifest.lrsurgery_version,
            "lrsurgery_version": __version__,
        }
        write_text_atomic(tmp / "lrsurgery_fuse.json", json.dumps(provenance, indent=2, default=str))
        from lrsurgery.io.hub import write_model_card

        write_model_card(tmp, manifest, Path(artifact), fmt="hf")
    return Path(out)


def check_fits(by_key: dict[str, Any], sources: dict[str, str], weights: LazyWeights, folder: Path) -> None:
    """Refuse adapters whose modules are missing from the base weights or of another shape (with --force an
    artifact may be fused onto another model's weights, never onto another architecture's)."""
    missing = sorted(set(by_key) - set(sources))
    if missing:
        raise ArtifactError(f"the base weights in {folder} lack adapted module(s): {', '.join(missing[:5])}")
    for name, spec in by_key.items():
        shape = spec.shape
        if weights.shape(sources[name]) != shape:
            raise ArtifactError(
                f"{name} is {weights.shape(sources[name])} in {folder} but the adapter is for {shape}: "
                "the artifact was made for another architecture (--force skips only the fingerprint check)"
            )


def cast(name: str, tensor: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    """Cast to the output dtype, refusing values the dtype cannot hold (naming the tensor)."""
    if target == torch.float16 and tensor.is_floating_point():
        limit = torch.finfo(torch.float16).max
        peak = float(tensor.abs().max()) if tensor.numel() else 0.0
        if peak > limit:
            raise OptionError(
                f"tensor {name} has values up to {peak:.4g}, beyond the fp16 range (±{limit:.0f}); "
                "use --dtype bf16 or fp32"
            )
    return tensor.to(target) if tensor.is_floating_point() else tensor


def check_disk(out: Path, needed: int) -> None:
    """Refuse to start when the output's filesystem has less free space than the output needs."""
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed * 1.02 + 2**20:
        raise OSError(
            28,
            f"not enough disk space for {out}: it needs about {needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB is free",
            str(out),
        )
