"""The `calibrate` stage: input-activation covariances of every target linear, layer by layer.

Sequential runner: the inputs of the first transformer block (and the keyword arguments the model
passes every block: attention mask, rotary position embeddings, ...) are captured once by a pre-hook;
then each block in turn is moved to the compute device, runs every calibration micro-batch, has its
statistics accumulated and written, and is moved back. Its outputs, kept on CPU, are the next block's
inputs. Only one block's weights are ever on the device.

Covariance: for each target linear, Σ xᵀx over the tokens that count (padding excluded) and the token
count, so C = XᵀX / n and two artifacts of the same model can be merged by adding sums and counts.
Linears that read the same tensor (q/k/v; gate/up) share one covariance, stored once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsurgery.artifacts import ArtifactError, Manifest, read_manifest, save_tensors, write_manifest
from lrsurgery.data import DataSpec, build_examples, collate
from lrsurgery.models import (
    backbone,
    block_list,
    default_task,
    find_targets,
    load_model,
    model_fingerprint,
    resolve_model,
)
from lrsurgery.progress import progress
from lrsurgery.surgery import model_record


class CalibrationError(ValueError):
    """Calibration cannot run on this model or data."""


class _Captured(Exception):
    """Raised by the first block's pre-hook once its inputs are recorded."""


@dataclass
class CalibrateConfig:
    samples: int = 32
    seq_len: int = 256
    batch_size: int = 4
    dtype: str = "fp32"
    device: str = "cpu"
    targets: str | None = None
    collect: tuple[str, ...] = ("covariance",)
    sensitivity_path: str = "sequential"
    offload: str = "cpu"

    def __post_init__(self) -> None:
        self.collect = tuple(self.collect)
        unknown = set(self.collect) - {"covariance", "sensitivity"}
        if unknown or not self.collect:
            raise CalibrationError(f"--collect takes covariance and/or sensitivity, got {', '.join(self.collect)}")
        if self.offload not in ("cpu", "disk"):
            raise CalibrationError(f"--offload must be cpu or disk, got {self.offload!r}")
        if self.sensitivity_path not in ("sequential", "whole"):
            raise CalibrationError(f"--sensitivity-path must be sequential or whole, got {self.sensitivity_path!r}")


def _to(value: Any, device: torch.device | str) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[dict]) -> list[tuple]:
    """(hidden states, kwargs) reaching the first block for each micro-batch, on CPU."""
    captured: list[tuple] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        captured.append((hidden.detach().cpu(), _to(kwargs, "cpu"), tuple(_to(a, "cpu") for a in args[1:])))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


class CovarianceCollector:
    """Forward hooks on one block's target linears accumulating Σ xᵀx over non-padding tokens."""

    def __init__(self, modules: dict[str, nn.Linear], dtype: torch.dtype):
        self.modules = modules
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.share: dict[str, str] = {}  # module name → the module whose covariance it shares
        self.mask: torch.Tensor | None = None
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            # the same tensor object feeds q/k/v (gate/up); holding it for the batch keeps its address
            # from being reused by a later, different tensor
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            owner, _ = self._seen.setdefault(key, (name, x))
            if name not in self.share:
                self.share[name] = owner
            if owner != name:
                return
            rows = x.reshape(-1, x.shape[-1])
            if self.mask is not None:
                rows = rows[self.mask.reshape(-1).to(rows.device)]
            rows = rows.to(self.dtype)
            if not torch.isfinite(rows).all():
                raise CalibrationError(f"activations entering {name} contain NaN or Inf")
            if name in self.sums:
                self.sums[name].addmm_(rows.T, rows)
            else:
                self.sums[name] = rows.T @ rows

        return hook

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()
        self.tokens += int(self.mask.sum())
        self._seen = {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _block_output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


def run_calibrate(model: str, data: DataSpec, cfg: CalibrateConfig, out: Path, resume: bool = False) -> Path:
    """Collect per-module input covariances into a stats artifact at `out` (resumable by block)."""
    dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(cfg.dtype)
    if dtype is None:
        raise CalibrationError(f"--dtype must be fp32 or fp64, got {cfg.dtype!r}")
    loader = None
    if cfg.offload == "disk":
        if "sensitivity" in cfg.collect:
            raise CalibrationError("--offload disk collects covariances only in this version; use --offload cpu")
        from lrsurgery.offload import load_offloaded

        loaded, loader = load_offloaded(model)
    else:
        loaded = load_model(model, task=default_task(resolve_model(model)))
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit and cfg.seq_len > limit:
        raise CalibrationError(f"--seq-len {cfg.seq_len} is longer than the model allows ({limit})")
    examples = build_examples(DataSpec(**{**asdict(data), "seq_len": cfg.seq_len}), loaded.tokenizer)
    if len(examples) < cfg.samples:
        raise CalibrationError(
            f"the data gives {len(examples)} examples of {cfg.seq_len} tokens; --samples {cfg.samples} were asked for"
        )
    rows = examples.rows[: cfg.samples]
    pad = loaded.tokenizer.pad_token_id
    batches = [collate(rows[i : i + cfg.batch_size], pad, "causal") for i in range(0, len(rows), cfg.batch_size)]
    prefix, blocks = block_list(loaded.model)
    targets = find_targets(loaded.model, cfg.targets)
    fingerprint = model_fingerprint(loaded.folder)
    manifest = Manifest(
        kind="stats",
        config={**asdict(cfg), "collect": list(cfg.collect), "data": asdict(data)},
        model={**model_record(loaded), "fingerprint": fingerprint},
        data={"fingerprint": examples.fingerprint, "samples": len(rows), "path": data.path},
        extra={"blocks": len(blocks), "completed": 0, "tokens": 0, "modules": {}},
    )
    work = _prepare(out, manifest, resume)
    done = read_manifest(work).extra["completed"]
    device = torch.device(cfg.device)
    if "covariance" not in cfg.collect:
        done = len(blocks)
    with torch.no_grad():
        hidden = capture_block_inputs(loaded.model, blocks, batches) if done < len(blocks) else []
        # finished blocks still run: their outputs are the inputs of the blocks after them
        for index in progress(range(len(blocks) if hidden else 0), desc="calibrate", unit="block"):
            block = loader.load(index, device) if loader else blocks[index].to(device)
            names = {n: backbone(loaded.model).get_submodule(n) for n in targets if n.startswith(f"{prefix}.{index}.")}
            collector = CovarianceCollector(names, dtype) if index >= done else None
            for b, (states, kwargs, args) in enumerate(hidden):
                if collector:
                    collector.start_batch(batches[b]["attention_mask"])
                result = block(states.to(device), *_to(args, device), **_to(kwargs, device))
                hidden[b] = (_block_output(result).cpu(), kwargs, args)
            if loader:
                loader.release(index)
            else:
                blocks[index].to("cpu")
            if collector:
                collector.close()
                _write_block(work, index, collector)
    if "sensitivity" in cfg.collect:
        _collect_sensitivity(loaded, rows, pad, targets, cfg, work)
    return _finish(work, out)


def _collect_sensitivity(loaded, rows, pad, targets, cfg: CalibrateConfig, work: Path) -> None:
    """Per-sample |W ⊙ ∇W| reductions for every target (see sensitivity.py), written as one file."""
    from lrsurgery import sensitivity

    if default_task(loaded.folder) != "causal":
        raise CalibrationError("--collect sensitivity needs a causal language model (the loss is its LM loss)")
    samples = [collate([r], pad, "causal") for r in rows]
    if cfg.sensitivity_path == "whole":
        tensors = sensitivity.whole_model(loaded.model, samples, targets)
    else:
        _, blocks = block_list(loaded.model)
        with torch.no_grad():
            captured = capture_block_inputs(loaded.model, blocks, samples)
        tensors = sensitivity.sequential(loaded.model, samples, targets, captured, cfg.device)
    save_tensors(work / "sensitivity.safetensors", tensors)
    manifest = read_manifest(work)
    manifest.extra["sensitivity"] = {
        "file": "sensitivity.safetensors",
        "samples": len(samples),
        "path": cfg.sensitivity_path,
    }
    write_manifest(work, manifest)


def _prepare(out: Path, manifest: Manifest, resume: bool) -> Path:
    work = out.with_name(out.name + ".partial")
    if out.exists():
        raise ArtifactError(f"{out} already exists; choose another output")
    if work.exists():
        if not resume:
            raise ArtifactError(f"{work} holds an interrupted calibration; pass --resume to continue it")
        before = read_manifest(work, "stats")
        same = (before.model["fingerprint"], before.data["fingerprint"], before.config)
        if same != (manifest.model["fingerprint"], manifest.data["fingerprint"], manifest.config):
            raise ArtifactError(f"cannot resume {work}: it was started for another model, data or settings")
        return work
    work.mkdir(parents=True)
    write_manifest(work, manifest)
    return work


def _write_block(work: Path, index: int, collector: CovarianceCollector) -> None:
    """Write one block's sums atomically, then record it in the manifest (the resume point)."""
    tensors = {f"cov.{name}": s for name, s in collector.sums.items()}
    save_tensors(work / f"block_{index:04d}.safetensors", tensors)
    manifest = read_manifest(work)
    for name, owner in collector.share.items():
        manifest.extra["modules"][name] = {
            "covariance": owner,
            "file": f"block_{index:04d}.safetensors",
            "tokens": collector.tokens,
        }
    manifest.extra["completed"] = index + 1
    manifest.extra["tokens"] = collector.tokens
    write_manifest(work, manifest)


def _finish(work: Path, out: Path) -> Path:
    manifest = read_manifest(work)
    covariance_done = "covariance" not in manifest.config["collect"] or (
        manifest.extra["completed"] == manifest.extra["blocks"]
    )
    if not covariance_done or ("sensitivity" in manifest.config["collect"] and "sensitivity" not in manifest.extra):
        raise ArtifactError(f"{work} is incomplete")
    work.rename(out)
    return out


def load_sensitivity(stats: Path) -> dict[str, float]:
    """S(W) per module from a stats artifact collected with sensitivity."""
    from lrsurgery.artifacts import load_tensors

    manifest = read_manifest(stats, "stats")
    if "sensitivity" not in manifest.extra:
        raise ArtifactError(f"{stats} has no sensitivities (calibrate with --collect covariance,sensitivity)")
    tensors = load_tensors(Path(stats) / manifest.extra["sensitivity"]["file"])
    return {k[len("sens.") :]: float(v) for k, v in tensors.items() if k.startswith("sens.")}


def load_covariance(stats: Path, module: str) -> torch.Tensor:
    """C = XᵀX / n for `module` from a stats artifact (a shared covariance is read from its owner)."""
    from lrsurgery.artifacts import load_tensors

    manifest = read_manifest(stats, "stats")
    info = manifest.extra["modules"].get(module)
    if info is None:
        raise ArtifactError(f"{stats} has no covariance for module {module}")
    sums = load_tensors(Path(stats) / info["file"])[f"cov.{info['covariance']}"]
    return sums / info["tokens"]


def merge_stats(inputs: list[Path], out: Path, force: bool = False) -> Path:
    """Add the covariance sums and token counts of stats artifacts from one model into `out`.

    The result equals one calibration over the union of their sequences (up to summation order).
    """
    from lrsurgery.artifacts import atomic_folder, load_tensors

    if len(inputs) < 2:
        raise CalibrationError("merging needs at least two stats artifacts")
    manifests = [read_manifest(p, "stats") for p in inputs]
    first = manifests[0]
    for path, m in zip(inputs[1:], manifests[1:], strict=True):
        if m.model["fingerprint"] != first.model["fingerprint"] and not force:
            raise ArtifactError(
                f"{path} was calibrated on another model than {inputs[0]}; pass --force to merge anyway"
            )
        if m.extra["modules"].keys() != first.extra["modules"].keys() or m.config["dtype"] != first.config["dtype"]:
            raise ArtifactError(f"{path} covers other modules or another dtype than {inputs[0]}")
    modules = {
        name: {**info, "tokens": sum(m.extra["modules"][name]["tokens"] for m in manifests)}
        for name, info in first.extra["modules"].items()
    }
    merged = Manifest(
        kind="stats",
        config={**first.config, "merged_from": [str(Path(p).resolve()) for p in inputs]},
        model=first.model,
        data={
            "fingerprint": [m.data["fingerprint"] for m in manifests],
            "samples": sum(m.data["samples"] for m in manifests),
        },
        extra={**first.extra, "modules": modules, "tokens": sum(m.extra["tokens"] for m in manifests)},
    )
    with atomic_folder(out) as tmp:
        for file in sorted(Path(inputs[0]).glob("block_*.safetensors")):
            parts = [load_tensors(Path(p) / file.name) for p in inputs]
            save_tensors(tmp / file.name, {k: sum(part[k] for part in parts) for k in parts[0]})
        write_manifest(tmp, merged)
    return out


def summarise(stats: Path) -> list[dict[str, Any]]:
    """Per stored covariance: trace, effective rank (exp of the eigenvalue entropy) and condition number."""
    manifest = read_manifest(stats, "stats")
    rows = []
    for name, info in manifest.extra["modules"].items():
        if info["covariance"] != name:
            continue
        eig = torch.linalg.eigvalsh(load_covariance(stats, name).double()).clamp_min(0)
        p = eig / eig.sum()
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
        shared = sorted(n for n, i in manifest.extra["modules"].items() if i["covariance"] == name)
        rows.append(
            {
                "covariance": name,
                "shared_by": shared,
                "dim": eig.numel(),
                "trace": float(eig.sum()),
                "effective_rank": float(torch.tensor(entropy).exp()),
                "condition": float(eig.max() / eig.min()) if eig.min() > 0 else float("inf"),
            }
        )
    return rows
