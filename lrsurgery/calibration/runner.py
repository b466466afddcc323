"""The `calibrate` stage: covariances and sensitivities of every target linear, block by block.

Forward: the inputs of the first transformer block (and the keyword arguments the model passes every
block: attention mask, rotary position embeddings, ...) are captured once by a pre-hook; then each
block in turn is brought to the compute device (from RAM, or read from the safetensors files with
`--offload disk`), runs every calibration micro-batch, has its covariances accumulated and written,
and is released. Its outputs, kept on CPU, are the next block's inputs.

Backward (sensitivity, sequential path): the model's own head turns the last block's outputs into the
per-sample losses, whose gradient is then carried down block by block in reverse: each block is
recomputed from its stored input with gradients on, back-propagated, and its per-sample |W ⊙ ∇W|
reduced (calibration/backward.py, calibration/sensitivity.py). One block's weights are resident at a
time in both passes; with `--offload disk` the stored block inputs go to the work folder too, and the
LM head is streamed (calibration/head.py), so memory follows one block and one block's activations.
With several processes, each runs a share of the micro-batches and the sums are added across them
(calibration/processes.py).

Everything is written per block as the block finishes (covariance sums, sensitivity reductions and the
gradient at the block boundary), with the manifest recording how far each pass got, so an interrupted
run continues with `--resume` from the last finished block."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsurgery.calibration.backward import BlockInputs, backward_pass, samples_of, save_sensitivity
from lrsurgery.calibration.covariance import CalibrationError, CovarianceCollector
from lrsurgery.calibration.processes import Shard, current_shard, local_device
from lrsurgery.calibration.sensitivity import whole_model
from lrsurgery.calibration.stats_file import write_block
from lrsurgery.config import option
from lrsurgery.data.examples import IGNORE, DataSpec, build_examples, collate
from lrsurgery.errors import SEED_MAX, check_count
from lrsurgery.hf.load import compute_device, default_task, load_model, model_record
from lrsurgery.hf.resolve import resolve_model
from lrsurgery.hf.tree import backbone, block_list, find_targets
from lrsurgery.io.artifacts import MANIFEST, Manifest, read_manifest, write_manifest
from lrsurgery.io.outputs import Work, is_main_process, output_folder
from lrsurgery.linalg.basics import all_finite
from lrsurgery.progress import progress

__all__ = ["CalibrateConfig", "CalibrationError", "capture_block_inputs", "run_calibrate"]


class _Captured(Exception):
    """Raised by the first block's pre-hook once its inputs are recorded."""


@dataclass
class CalibrateConfig:
    samples: int = option(32, "Calibration sequences.")
    seq_len: int = option(256, "Tokens per sequence.")
    batch_size: int = option(4, "Sequences per forward pass.")
    dtype: str = option("fp32", "Accumulation dtype: fp32 or fp64.")
    device: str = option("cpu", "Where each block runs: cpu, cuda or cuda:N.")
    targets: str | None = option(None, "Regex over module names to collect for (default: the block linears).")
    collect: tuple[str, ...] | None = option(
        None,
        "Statistics: covariance, sensitivity, or both comma-separated (default: both for a causal LM, whose LM loss "
        "the sensitivities need; covariance for other models).",
    )
    sensitivity_path: str = option("sequential", "sequential: one block resident at a time; whole: the whole model.")
    offload: str = option("cpu", "cpu: the model in RAM; disk: each block read from the safetensors when it runs.")
    tokens: str = option("all", "Tokens whose activations count: all, or response (prompt/response data).")
    shuffle: bool = option(True, "Draw the --samples sequences at random with --seed (else the first ones in order).")
    seed: int = option(0, "Seed of the draw of the calibration sequences.")

    def __post_init__(self) -> None:
        if isinstance(self.collect, str):  # from the command line: "covariance,sensitivity"
            self.collect = tuple(c.strip() for c in self.collect.split(",") if c.strip())
        if self.collect is not None:
            self.collect = tuple(self.collect)
            unknown = set(self.collect) - {"covariance", "sensitivity"}
            if unknown or not self.collect:
                raise CalibrationError(f"--collect takes covariance and/or sensitivity, got {', '.join(self.collect)}")
        check_count("--seed", self.seed, 0, SEED_MAX)
        if self.offload not in ("cpu", "disk"):
            raise CalibrationError(f"--offload must be cpu or disk, got {self.offload!r}")
        if self.sensitivity_path not in ("sequential", "whole"):
            raise CalibrationError(f"--sensitivity-path must be sequential or whole, got {self.sensitivity_path!r}")
        if self.tokens not in ("all", "response"):
            raise CalibrationError(f"--tokens must be all or response, got {self.tokens!r}")
        if self.offload == "disk" and "sensitivity" in (self.collect or ()) and self.sensitivity_path == "whole":
            raise CalibrationError("--sensitivity-path whole needs the whole model in memory; use --offload cpu")
        if self.dtype not in ("fp32", "fp64"):
            raise CalibrationError(f"--dtype must be fp32 or fp64, got {self.dtype!r}")
        check_count("--samples", self.samples)
        check_count("--seq-len", self.seq_len, 2)  # sensitivity needs a next token to predict
        check_count("--batch-size", self.batch_size)


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
    """(hidden states, kwargs, extra args) reaching the first block for each micro-batch, on CPU."""
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


def _block_output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


class BlockRunner:
    """Brings block i onto the compute device (from RAM or, with a disk loader, from the files) and back."""

    def __init__(self, model: nn.Module, device: torch.device, loader: Any = None):
        self.model = model
        self.prefix, self.blocks = block_list(model)
        self.root = backbone(model)
        self.device = device
        self.loader = loader
        self.tuple_output = True

    def inputs(self, batches: list[dict]) -> AbstractContextManager[list[dict]]:
        """Within: `batches` as the model takes them (offloaded: renumbered into the embedding rows they use)."""
        return self.loader.token_rows(batches) if self.loader else nullcontext(batches)

    def head(self) -> AbstractContextManager[None]:
        """Within: the LM head is loaded (offloaded, it is read only for this)."""
        return self.loader.head() if self.loader else nullcontext()

    def load(self, index: int) -> nn.Module:
        block = self.loader.load(index, self.device) if self.loader else self.blocks[index].to(self.device)
        return block.requires_grad_(False)

    def release(self, index: int) -> None:
        if self.loader:
            self.loader.release(index)
        else:
            self.blocks[index].to("cpu")

    def targets(self, index: int, targets: list[str]) -> dict[str, nn.Linear]:
        return {n: self.root.get_submodule(n) for n in targets if n.startswith(f"{self.prefix}.{index}.")}

    def run(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict, args: tuple) -> torch.Tensor:
        result = block(hidden.to(self.device), *_to(args, self.device), **_to(kwargs, self.device))
        self.tuple_output = isinstance(result, (tuple, list))
        return _block_output(result)


# the settings that change what a calibration measures (not where or in what batches it runs)
MEASURED = ("samples", "seq_len", "dtype", "targets", "collect", "tokens", "shuffle", "seed")


def run_calibrate(
    model: str,
    data: DataSpec,
    cfg: CalibrateConfig,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    reuse: bool = False,
) -> Path:
    """Collect per-module statistics (see module doc) into a stats artifact at `out`; return `out`.
    With `reuse`, a stats artifact already at `out` is kept when it measured the same thing: the same
    model and data (their fingerprints, whatever the paths) and the same `MEASURED` settings."""
    device = compute_device(cfg.device)
    folder = resolve_model(model)
    if keeps_existing(out, reuse, overwrite):
        _check_reusable(Path(out), folder, data, cfg)
        return Path(out)
    main = is_main_process()
    with output_folder(out, "stats", [folder, data.path], overwrite, resume=resume, active=main) as run:
        _calibrate(model, folder, data, cfg, run, device)
    return Path(out)


def keeps_existing(out: Path, reuse: bool, overwrite: bool) -> bool:
    """Whether `run_calibrate` with these flags keeps (or refuses) a stats artifact at `out` without calibrating."""
    return reuse and not overwrite and (Path(out) / MANIFEST).is_file()


def default_collect(folder: Path) -> tuple[str, ...]:
    """The statistics `--collect` means when not given: both for a causal LM (sensitivities need its LM
    loss), covariances for any other model."""
    return ("covariance", "sensitivity") if default_task(folder) == "causal" else ("covariance",)


def _check_reusable(out: Path, folder: Path, data: DataSpec, cfg: CalibrateConfig) -> None:
    """Return if the stats artifact `out` measured what `cfg` on `data` would, else refuse naming the difference."""
    from lrsurgery.hf.load import load_tokenizer
    from lrsurgery.hf.resolve import model_fingerprint

    found = read_manifest(out, "stats")
    if found.config.get("merged_from"):
        raise CalibrationError(f"{out} merges several calibrations; --reuse takes one made by `lrsurgery calibrate`")
    if found.model.get("fingerprint") != model_fingerprint(folder):
        raise CalibrationError(f"{out} was calibrated on another model; choose another -o, or --overwrite")
    examples = build_examples(DataSpec(**{**asdict(data), "seq_len": cfg.seq_len}), load_tokenizer(folder))
    if found.data.get("fingerprint") != examples.fingerprint:
        raise CalibrationError(f"{out} was calibrated on other data; choose another -o, or --overwrite")
    wanted = {**{k: getattr(cfg, k) for k in MEASURED}, "collect": list(cfg.collect or default_collect(folder))}
    changed = [k for k in MEASURED if json.loads(json.dumps(wanted[k])) != found.config.get(k)]
    if changed:
        raise CalibrationError(
            f"{out} was calibrated with other settings ({', '.join(changed)}); choose another -o, or --overwrite"
        )
    print(f"{out} already holds this calibration (same model, data and settings): reused")


def _calibrate(model: str, folder: Path, data: DataSpec, cfg: CalibrateConfig, run: Work, device: torch.device):
    loader = None
    if cfg.offload == "disk":
        from lrsurgery.hf.offload import load_offloaded

        loaded, loader = load_offloaded(model)
    else:
        loaded = load_model(model, task=default_task(folder))
    loaded.model.requires_grad_(False)
    causal = default_task(loaded.folder) == "causal"
    if cfg.collect is None:
        cfg = replace(cfg, collect=default_collect(loaded.folder))
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit and cfg.seq_len > limit:
        raise CalibrationError(f"--seq-len {cfg.seq_len} is longer than the model allows ({limit})")
    if "sensitivity" in cfg.collect and not causal:
        raise CalibrationError("--collect sensitivity needs a causal language model (the loss is its LM loss)")
    if cfg.tokens == "response" and not data.prompt_template:
        raise CalibrationError("--tokens response needs prompt/response data (--prompt-template, --response-template)")
    examples = build_examples(DataSpec(**{**asdict(data), "seq_len": cfg.seq_len}), loaded.tokenizer)
    if len(examples) < cfg.samples:
        raise CalibrationError(
            f"the data gives {len(examples)} examples of {cfg.seq_len} tokens; --samples {cfg.samples} were asked for"
        )
    rows = examples.rows[: cfg.samples]
    if cfg.shuffle:  # a seeded draw, as TLoRA's released code shuffles its calibration data
        order = torch.randperm(len(examples.rows), generator=torch.Generator().manual_seed(cfg.seed))
        rows = [examples.rows[i] for i in order[: cfg.samples].tolist()]
    pad = loaded.tokenizer.pad_token_id
    batches = [collate(rows[i : i + cfg.batch_size], pad, "causal") for i in range(0, len(rows), cfg.batch_size)]
    for batch in batches:
        batch["count"] = batch["attention_mask"] if cfg.tokens == "all" else batch["labels"] != IGNORE
    shard = current_shard(len(batches))
    if shard.world > 1 and "sensitivity" in cfg.collect and cfg.sensitivity_path == "whole":
        raise CalibrationError("--sensitivity-path whole runs in one process; use the sequential path (the default)")
    targets = find_targets(loaded.model, cfg.targets)
    runner = BlockRunner(loaded.model, local_device(device), loader)
    blocks = len(runner.blocks)
    manifest = Manifest(
        kind="stats",
        config={**asdict(cfg), "collect": list(cfg.collect), "data": asdict(data)},
        model=model_record(loaded),
        data={"fingerprint": examples.fingerprint, "samples": len(rows), "path": data.path},
        extra={"blocks": blocks, "completed": 0, "tokens": 0, "modules": {}, "sequence_sums": True},
    )
    manifest.extra["processes"] = shard.world
    work = run.folder
    if shard.main:
        run.pin({"model": manifest.model["fingerprint"], "data": examples.fingerprint, "config": manifest.config})
        if not (work / MANIFEST).exists():
            write_manifest(work, manifest)
    state = read_manifest(work).extra if shard.main else manifest.extra
    if run.resumed and max(shard.world, state.get("processes", 1)) > 1:
        raise CalibrationError(
            f"{work} was started over {state.get('processes', 1)} process(es) and this run has {shard.world}: a "
            "calibration resumes in one process only; run it again with --overwrite"
        )
    covariance_from = state["completed"] if "covariance" in cfg.collect else blocks
    wants_sensitivity = "sensitivity" in cfg.collect and "sensitivity" not in state
    if wants_sensitivity and cfg.sensitivity_path == "whole":
        save_sensitivity(work, whole_model(loaded.model, batches, targets), samples_of(batches), "whole")
        run.keep()
        wants_sensitivity = False
    backward_from = state.get("sensitivity_next", blocks) if wants_sensitivity else 0
    forward_to = blocks if covariance_from < blocks or backward_from == blocks else backward_from - 1
    mine = shard.mine(batches)
    shard.sync()  # the main process has made the work folder the others spill into
    kept = BlockInputs(work / f"inputs.{shard.rank}" if loader and backward_from else None)
    try:
        hidden = _forward(runner, mine, targets, cfg, run, covariance_from, forward_to, kept, backward_from, shard)
        if wants_sensitivity:
            samples = samples_of(batches)
            backward_pass(loaded.model, runner, mine, targets, run, kept, hidden, backward_from, shard, samples)
    finally:
        kept.close()
    if shard.main:
        _check_complete(work)


def _forward(runner, batches, targets, cfg, run, covariance_from, forward_to, kept, keep_to, shard: Shard):
    """Run blocks [0, forward_to) on this process's micro-batches `batches`, collecting covariances from
    block `covariance_from` on (added over the processes of `shard`, written by the main one), and keep
    the inputs of blocks [0, keep_to) in `kept` (a BlockInputs) for the backward pass.

    Returns [(hidden, kwargs, args)] per batch after the last block run.
    """
    dtype = torch.float64 if cfg.dtype == "fp64" else torch.float32
    if max(forward_to, keep_to) <= 0:
        return []
    with torch.no_grad():
        with runner.inputs(batches) as feed:
            hidden = capture_block_inputs(runner.model, runner.blocks, feed)
        if keep_to == 0 and runner.loader:  # no backward to follow: nothing outside the blocks runs again
            runner.loader.release_rest()
        for index in progress(range(forward_to), desc="calibrate forward", unit="block"):
            if index < keep_to:
                kept.append([h for h, _, _ in hidden])
            block = runner.load(index)
            collector = CovarianceCollector(runner.targets(index, targets), dtype) if index >= covariance_from else None
            for b, (states, kwargs, args) in enumerate(hidden):
                if collector:
                    collector.start_batch(batches[b]["count"])
                out = runner.run(block, states, kwargs, args)
                if not all_finite(out):
                    raise CalibrationError(f"block {runner.prefix}.{index} outputs NaN or Inf activations")
                hidden[b] = (out.cpu(), kwargs, args)
            runner.release(index)
            if collector:
                collector.close()
                sums, tokens, sequences = _added(collector, shard)
                if shard.main:
                    write_block(run.folder, index, sums, collector.share, tokens, sequences)
                    run.keep()
        if forward_to < keep_to:
            kept.append([h for h, _, _ in hidden])
    return hidden


def _added(collector: CovarianceCollector, shard: Shard) -> tuple[dict, int, tuple[dict, torch.Tensor]]:
    """A block's covariance sums, token count and per-sequence sums, added (or, for the per-sequence sums,
    gathered in calibration order) over the processes of `shard`."""
    sums = shard.add(collector.finish())
    per_batch = {name: shard.interleave(parts) for name, parts in sorted(collector.sequence_sums.items())}
    tokens = shard.interleave(collector.sequence_tokens)
    sequence_sums = {name: torch.cat(parts) for name, parts in per_batch.items()}
    counts = torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.int64)
    return sums, shard.add_count(collector.tokens), (sequence_sums, counts)


def _check_complete(work: Path) -> None:
    manifest = read_manifest(work)
    covariance_done = "covariance" not in manifest.config["collect"] or (
        manifest.extra["completed"] == manifest.extra["blocks"]
    )
    if not covariance_done or ("sensitivity" in manifest.config["collect"] and "sensitivity" not in manifest.extra):
        raise RuntimeError(f"{work} is incomplete")  # a bug: every pass above ran to its end
