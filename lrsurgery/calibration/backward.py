"""The sequential sensitivity pass of `calibrate` (see calibration/runner.py): the model's own head turns the
last block's outputs into per-sample losses, whose gradient is carried down block by block in reverse,
each block recomputed from its stored input, with its per-sample |W ⊙ ∇W| reduced as it goes
(calibration/sensitivity.py). Each block's results and the gradient entering it are written as the block
finishes, the resume point of an interrupted pass."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsurgery.calibration.head import head_gradients
from lrsurgery.calibration.processes import Shard
from lrsurgery.calibration.sensitivity import SensitivityCollector, per_sample_loss
from lrsurgery.calibration.stats_file import write_sensitivity
from lrsurgery.data.examples import IGNORE
from lrsurgery.io.artifacts import load_tensors, read_manifest, save_tensors, write_manifest
from lrsurgery.progress import progress


class BlockInputs:
    """The inputs of blocks [0, n) kept for the backward pass, one tensor per micro-batch and block: in
    memory, or, given a `folder` (with --offload disk), written there as each block runs and read back
    one block at a time, so that the memory held follows one block rather than the model's depth (at 32
    blocks, 128 sequences of 2048 tokens and hidden 4096, 137 GB in fp32)."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.held: list[list[torch.Tensor]] = []
        self.count = 0
        if folder is not None:
            folder.mkdir(exist_ok=True)

    def append(self, states: list[torch.Tensor]) -> None:
        """Keep the next block's input, one (B, T, d) tensor per micro-batch."""
        if self.folder is None:
            self.held.append(states)
        else:
            save_tensors(self._file(self.count), {f"batch.{b}": h for b, h in enumerate(states)})
        self.count += 1

    def pop(self, index: int) -> list[torch.Tensor]:
        """Block `index`'s inputs, which are then dropped (the backward pass reads each block once)."""
        if self.folder is None:
            states, self.held[index] = self.held[index], []
            return states
        saved = load_tensors(self._file(index))
        self._file(index).unlink()
        return [saved[f"batch.{b}"] for b in range(len(saved))]

    def _file(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"input_{index:04d}.safetensors"

    def close(self) -> None:
        """Remove the folder, if any, and what is left in it."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class _Replay(nn.Module):
    """Stands in for the block list's only entry: returns a stored hidden state, ignoring its input."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden = hidden
        self.as_tuple = as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.hidden,) if self.as_tuple else self.hidden


@contextmanager
def _from_last_block(model: nn.Module, runner: Any) -> Iterator[Callable[[dict, torch.Tensor], torch.Tensor]]:
    """Within: a function (batch, last block output (B, T, d)) -> the model's logits (B, T, V), the block
    list standing in for a single block that returns that output."""
    parent_name, _, attr = runner.prefix.rpartition(".")
    parent = runner.root.get_submodule(parent_name) if parent_name else runner.root
    original = getattr(parent, attr)

    def forward(batch: dict, last: torch.Tensor) -> torch.Tensor:
        setattr(parent, attr, nn.ModuleList([_Replay(last, runner.tuple_output)]))
        # the replayed block ignores its input, so the embedding is skipped (zeros of its shape go in)
        embeds = torch.zeros(last.shape, dtype=last.dtype)
        return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False).logits

    try:
        yield forward
    finally:
        setattr(parent, attr, original)


def _head_gradients(model: nn.Module, runner: Any, batches: list[dict], hidden: list[tuple]) -> list:
    """∂(Σ per-sample losses)/∂(last block output) per micro-batch, from the model's own head: offloaded,
    streamed from the files (calibration/head.py) where the model allows it, else with the head loaded."""
    lasts = [states for states, _, _ in hidden]
    with _from_last_block(model, runner) as forward:
        if runner.loader:
            grads = head_gradients(model, runner.loader, forward, batches, lasts)
            if grads is not None:
                return grads
        with runner.head():
            grads = []
            for batch, states in zip(batches, lasts, strict=True):
                last = states.clone().requires_grad_(True)
                per_sample_loss(forward(batch, last), batch["labels"])[0].backward()
                grads.append(last.grad)
    return grads


def backward_pass(model, runner, batches, targets, run, kept, hidden, backward_from, shard: Shard, samples: int):
    """Sequential sensitivity: carry the loss gradient down blocks [0, backward_from) in reverse, over this
    process's micro-batches `batches`; each block's sums are added over the processes of `shard`, and the
    main one writes them (`samples`: the samples of all the processes' micro-batches)."""
    work = run.folder
    if backward_from == len(runner.blocks):
        grads = _head_gradients(model, runner, batches, hidden)
    else:
        saved = load_tensors(work / f"grad_{backward_from:04d}.safetensors")
        grads = [saved[f"batch.{b}"] for b in range(len(batches))]
    for index in progress(reversed(range(backward_from)), desc="calibrate backward", total=backward_from, unit="block"):
        block = runner.load(index)
        collector = SensitivityCollector(runner.targets(index, targets))
        below, inputs = [], kept.pop(index)
        for b, (batch, (_, kwargs, args)) in enumerate(zip(batches, hidden, strict=True)):
            x = inputs[b].to(runner.device).requires_grad_(True)
            runner.run(block, x, kwargs, args).backward(grads[b].to(runner.device))
            below.append(x.grad.cpu())
            collector.samples += per_sample_count(batch["labels"])
        runner.release(index)
        grads = below
        collector.rows, collector.cols = shard.add(collector.rows), shard.add(collector.cols)
        collector.samples = shard.add_count(collector.samples)
        tensors = collector.close()
        if shard.main:
            _write_sensitivity_block(work, index, tensors, grads)
            run.keep()
    if shard.main:
        save_sensitivity(work, _gather_sensitivity(work), samples, "sequential")


def per_sample_count(labels: torch.Tensor) -> int:
    """Samples in a micro-batch with at least one predicted token (those the sensitivity averages over)."""
    return int(((labels[:, 1:] != IGNORE).sum(dim=1) > 0).sum())


def _write_sensitivity_block(work: Path, index: int, tensors: dict, grads: list[torch.Tensor]) -> None:
    """Write block `index`'s sensitivities and the gradient entering it, then move the resume point."""
    save_tensors(work / f"sens_{index:04d}.safetensors", tensors)
    save_tensors(work / f"grad_{index:04d}.safetensors", {f"batch.{b}": g for b, g in enumerate(grads)})
    manifest = read_manifest(work)
    manifest.extra["sensitivity_next"] = index
    write_manifest(work, manifest)
    (work / f"grad_{index + 1:04d}.safetensors").unlink(missing_ok=True)


def _gather_sensitivity(work: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(work.glob("sens_*.safetensors")):
        tensors.update(load_tensors(file))
    return tensors


def samples_of(batches: list[dict]) -> int:
    """Samples with at least one predicted token in all of `batches`."""
    return sum(per_sample_count(b["labels"]) for b in batches)


def save_sensitivity(work: Path, tensors: dict, samples: int, path: str) -> None:
    """Write the sensitivity file (means over `samples`) and drop the sequential pass's per-block work files."""
    write_sensitivity(work, tensors, samples, path)
    for file in [*work.glob("sens_*.safetensors"), *work.glob("grad_*.safetensors")]:
        file.unlink()
