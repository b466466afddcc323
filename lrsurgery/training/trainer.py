"""The `train` stage: fine-tune an init artifact's adapters on `accelerate`.

The run works in `OUT.partial/` (metrics log, checkpoints) and is renamed to `OUT` only when finished,
so `OUT` never holds a half-trained artifact. `--resume` continues from the last checkpoint in
`OUT.partial/` and, on CPU, gives bit-identical adapters to an uninterrupted run: the data order is a
function of (seed, step) alone, and the optimizer state and RNG state are checkpointed."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsurgery.data.examples import DataSpec, Examples, build_examples, collate, read_labels
from lrsurgery.errors import ArtifactError, OptionError, UserError
from lrsurgery.io.artifacts import Manifest, file_digest, read_manifest, save_tensors, write_manifest
from lrsurgery.io.outputs import Work, check_output, is_main_process, output_folder, write_text_atomic
from lrsurgery.layers.adapted import HEAD_PREFIX, adapted_layers, head_parameters
from lrsurgery.layers.adapter_file import ADAPTED_KINDS, ADAPTER_FILE, to_tensors, trainable_count
from lrsurgery.methods import HookContext, Method, MethodError, TrainHooks, get_method
from lrsurgery.progress import bar
from lrsurgery.stages.adapted import load_adapted
from lrsurgery.training.accelerator import new_accelerator, peak_memory_mb
from lrsurgery.training.checkpoint import (
    checkpoint_step,
    load_checkpoint,
    load_checkpoint_extra,
    save_checkpoint,
    truncate_log,
)
from lrsurgery.training.compiled import prepare_training_forward
from lrsurgery.training.edit_log import EditFiles
from lrsurgery.training.flat import FlatParameters
from lrsurgery.training.heldout import heldout_loss
from lrsurgery.training.processes import check_same_frozen_weights
from lrsurgery.training.schedule import TrainConfig, adamw, batch_indices, lr_at, total_steps
from lrsurgery.training.sharding import average_gradients, is_sharded, shard_frozen, sharding_from


class TrainingDiverged(UserError, ValueError):
    """The loss became NaN or Inf."""


def run_train(
    init_dir: Path,
    data: DataSpec,
    cfg: TrainConfig,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    hooks: list[TrainHooks] | None = None,
    eval_data: DataSpec | None = None,
    method_options: dict[str, Any] | None = None,
    preset: str | None = None,
) -> Path:
    """Train the adapters of `init_dir` on `data` and write a train artifact to `out`; return `out`.
    `preset`, the `--preset` name the settings came from, is recorded in the manifest's config.

    With `eval_data`, the held-out loss (training/heldout.py) is logged as `eval_loss` every
    `cfg.eval_every` steps and after the last one, and recorded in the artifact's manifest.
    `method_options` are train-time options of the artifact's method (e.g. the dual method's screening
    schedule); they override the init options, are validated by the method and pinned for `--resume`.
    `hooks` run after the method's own.
    """
    out = Path(out)
    main = is_main_process()  # only the main process writes
    inputs = [init_dir, data.path, eval_data.path if eval_data else None]
    if not main:  # the main process checks, locks and writes the output; the others only refuse the same
        check_output(out, inputs, overwrite, "train")
    with output_folder(out, "train", inputs, overwrite, resume=resume, active=main) as run:
        trainer = Trainer(Path(init_dir), data, cfg, run, eval_data, method_options or {}, hooks or [])
        trainer.preset = preset
        trainer.setup(resume, force)
        for step in range(trainer.start, trainer.total):
            trainer.step(step)
        trainer.finish()
    trainer.accelerator.wait_for_everyone()
    return out


class Trainer:
    """One training run, read top to bottom: `setup` (method, model, data, optimizer, hooks, resume), `step`
    (one optimizer step, with its log line and checkpoint), `finish` (the train artifact)."""

    def __init__(
        self,
        init_dir: Path,
        data: DataSpec,
        cfg: TrainConfig,
        run: Work,
        eval_data: DataSpec | None,
        method_options: dict[str, Any],
        hooks: list[TrainHooks],
    ):
        self.init_dir, self.data, self.cfg, self.run = init_dir, data, cfg, run
        self.work = run.folder
        self.eval_data, self.method_options, self.extra_hooks = eval_data, dict(method_options), hooks
        self.preset: str | None = None
        self.evaluated: dict[str, Any] = {}
        self.start = 0

    # -- setup ----------------------------------------------------------------------------------------

    def setup(self, resume: bool, force: bool) -> None:
        """Build everything the steps need, check it, pin the run's settings and take up a checkpoint."""
        cfg, data = self.cfg, self.data
        method = self._method()  # checked before anything heavy is loaded
        torch.manual_seed(cfg.seed)
        labels = read_labels(data) if data.task == "classification" else None
        loaded, self.init_manifest = load_adapted(
            self.init_dir, task=data.task, num_labels=len(labels) if labels else None, force=force
        )
        model, self.tokenizer = loaded.model, loaded.tokenizer
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and data.seq_len > limit:
            raise OptionError(f"--seq-len {data.seq_len} is longer than the model allows ({limit})")
        self.examples = build_examples(data, self.tokenizer, labels)
        self.held_out = build_examples(self.eval_data, self.tokenizer, labels) if self.eval_data else None
        self.head = head_parameters(model) if data.task == "classification" else {}
        for p in self.head.values():
            p.requires_grad_(True)
        self.hooks = [method.hooks(), *self.extra_hooks]
        if cfg.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        shard = sharding_from(cfg.shard)  # before accelerate reads a launcher's DeepSpeed request
        self.accelerator = accelerator = new_accelerator(cfg.precision)
        if cfg.compile and shard == "fsdp" and accelerator.num_processes > 1:
            raise OptionError("--compile does not run with --shard fsdp; drop one of them")
        prepare_training_forward(model, cfg.compile, accelerator.device)
        self.named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # placing and wrapping the model may give parameters new storage, so they move into their flat
        # buffers (training/flat.py) afterwards; `flat.check()` in `step` makes sure nothing moved them out
        self.sharded = shard == "fsdp" and accelerator.num_processes > 1
        if self.sharded:  # FSDP2 over the frozen weights; the trainable ones replicated (training/sharding.py)
            shard_frozen(model, list(self.named.values()))  # sharded where the model was loaded, then moved:
            self.model = model.to(accelerator.device)  # no device holds the whole model
            if not all(is_sharded(p) for n, p in model.named_parameters() if n.endswith("base.weight")):
                raise RuntimeError("FSDP left a frozen weight unsharded")  # a bug, not the user's
        else:
            self.model = accelerator.prepare(model)
        self.flat = FlatParameters(list(self.named.values()))
        self.optimizer = accelerator.prepare(adamw(self.flat.flats, lr=cfg.lr, weight_decay=cfg.weight_decay))
        self.total = total_steps(cfg, len(self.examples), accelerator.num_processes)
        unwrapped = accelerator.unwrap_model(self.model)
        self.ctx = HookContext(unwrapped, self.flat, self.optimizer, accelerator, self.total, artifact=self.init_dir)
        self.layers = self.ctx.layers()
        self.init_edits = {name: len(layer.edits) for name, layer in self.layers.items()}
        self.edit_counts = dict(self.init_edits)
        # the main process moves each edit to disk; the others keep their (identical) edits in memory
        self.edit_files = EditFiles(self.work, self.layers, write=accelerator.is_main_process)
        self.ctx.on_edit = self.edit_files.spill
        if accelerator.is_main_process:
            self.run.pin(self._settings())
        accelerator.wait_for_everyone()
        checkpoint = self.work / "checkpoint"
        resuming = resume and checkpoint.exists()
        extra = load_checkpoint_extra(checkpoint) if resuming else {}
        if resuming:  # the hooks' setup sees the step and the frozen weights the run continues from
            self._replay(checkpoint, extra)
        for h in self.hooks:
            h.setup(self.ctx)
        if resuming:
            self._load(checkpoint, extra)
        truncate_log(self.work / "metrics.jsonl", self.start)
        self.model.train()
        self.progress = bar(self.total, desc="train", unit="step", initial=self.start)

    def _method(self) -> Method:
        recorded = read_manifest(self.init_dir, ADAPTED_KINDS).config
        try:  # what init recorded must be valid on its own, or the artifact is damaged
            get_method(recorded["method"], **recorded["options"])
        except MethodError as exc:
            raise ArtifactError(f"{self.init_dir}/manifest.json records options its method refuses: {exc}") from exc
        return get_method(recorded["method"], **{**recorded["options"], **self.method_options})

    def _settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        # the global batch, not its split into processes × micro-batches: a run may resume with another
        # number of processes when the batch per process makes up the same global batch; and with or
        # without --compile, which changes rounding only
        train = {k: v for k, v in asdict(self.cfg).items() if k not in ("batch_size", "grad_accum", "shard", "compile")}
        return {
            "init": str(self.init_dir.resolve()),
            "init_fingerprint": file_digest(self.init_dir / ADAPTER_FILE),
            "train": train,
            "global_batch": self.cfg.batch_size * self.cfg.grad_accum * self.accelerator.num_processes,
            "data": asdict(self.data),
            "data_fingerprint": self.examples.fingerprint,
            "eval_data": asdict(self.eval_data) if self.eval_data else None,
            "method_options": self.method_options,
        }

    # -- one optimizer step ------------------------------------------------------------------------------

    def step(self, step: int) -> None:
        """Forward and backward over the step's micro-batches, the hooks, clipping, AdamW; log and checkpoint."""
        cfg, accelerator, ctx = self.cfg, self.accelerator, self.ctx
        began = time.perf_counter()
        ctx.step = step
        lr = lr_at(step, self.total, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        task_loss, logged = self._backward(step)
        if self.sharded:
            average_gradients([flat.grad for flat in self.flat.flats])
        for h in self.hooks:
            added = h.add_gradients(ctx)
            bad = [k for k, v in added.items() if not math.isfinite(v)]
            if bad:
                raise _diverged(bad[0], added[bad[0]], step, self.start, self.run.out, self.work)
            logged.update(added)
        if step == self.start:
            self.flat.check()  # nothing (accelerate, DDP, a hook) cut a gradient loose from the buffers
        grad_norm = accelerator.clip_grad_norm_(self.flat.flats, cfg.max_grad_norm)
        for h in self.hooks:
            h.after_backward(ctx)
        self.optimizer.step()
        self.flat.zero_grad()
        for h in self.hooks:
            logged.update(h.after_step(ctx))
        if accelerator.num_processes > 1 and not self.sharded:  # sharded: each process holds other rows
            self._check_same_frozen_weights(step)
        due = step + 1 == self.total or (cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0)
        if self.held_out and (accelerator.is_main_process or self.sharded) and due:  # FSDP: every process runs it
            self.evaluated = heldout_loss(
                ctx.model, self.held_out, self.tokenizer.pad_token_id, self.data.task, cfg.batch_size
            )
            logged["eval_loss"] = self.evaluated["loss"]
        record = {"step": step + 1, "loss": task_loss, "lr": lr, "grad_norm": float(grad_norm)}
        record.update(step_time=time.perf_counter() - began, **logged)
        if accelerator.is_main_process and (step + 1) % cfg.log_every == 0:
            with open(self.work / "metrics.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{task_loss:.4f}")
        if accelerator.is_main_process and (step + 1) % cfg.save_every == 0 and step + 1 < self.total:
            self.save(step + 1)

    def _check_same_frozen_weights(self, step: int) -> None:
        """With several processes: the layers a hook edited this step hold the same weights on every process."""
        edited = [n for n, layer in self.layers.items() if len(layer.edits) != self.edit_counts.get(n)]
        self.edit_counts = {n: len(layer.edits) for n, layer in self.layers.items()}
        if edited:
            check_same_frozen_weights(self.accelerator, {n: self.layers[n] for n in edited}, step)

    def _backward(self, step: int) -> tuple[float, dict[str, float]]:
        """Accumulate the gradients of the step's micro-batches; the task loss and the extra loss terms."""
        cfg, accelerator = self.cfg, self.accelerator
        pad, world, rank = self.tokenizer.pad_token_id, accelerator.num_processes, accelerator.process_index
        task_loss, logged = 0.0, {}
        for micro in range(cfg.grad_accum):
            idx = batch_indices(step, micro, len(self.examples), cfg, world, rank)
            rows = collate([self.examples.rows[i] for i in idx], pad, self.data.task)
            batch = {k: v.to(accelerator.device) for k, v in rows.items()}
            # processes all-reduce the gradients on the step's last micro-batch only (DDP's no_sync)
            last = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(self.model):
                with accelerator.autocast():
                    loss = self.model(**batch).loss
                    extras = {k: v for h in self.hooks for k, v in h.extra_loss(self.ctx).items()}
                    total_loss = loss + sum(extras.values()) if extras else loss
                if not torch.isfinite(total_loss):
                    raise _diverged("the loss", float(total_loss.detach()), step, self.start, self.run.out, self.work)
                accelerator.backward(total_loss / cfg.grad_accum)
            task_loss += loss.item() / cfg.grad_accum
            for k, v in extras.items():
                logged[k] = logged.get(k, 0.0) + v.item() / cfg.grad_accum
        if world > 1:  # log the loss of the whole global batch, not of one process
            task_loss = float(accelerator.reduce(torch.tensor(task_loss, device=accelerator.device), "mean"))
        return task_loss, logged

    # -- checkpoints -------------------------------------------------------------------------------------

    def save(self, steps: int) -> None:
        """Checkpoint after `steps` steps: parameters, AdamW state, RNG, hook state and how many weight edits
        each layer has made during training (their factors are already in the work folder's edit files)."""
        extra = {f"hook{i}.{k}": v for i, h in enumerate(self.hooks) for k, v in h.state_dict().items()}
        for name, layer in self.layers.items():  # the edits themselves are in the work folder (edit_log.py)
            widths = [b.shape[1] for b, _ in layer.edits[self.init_edits[name] :]]
            if widths:
                extra[f"edits.{name}"] = torch.tensor(widths, dtype=torch.int64)
        self.flat.check()
        save_checkpoint(self.work / "checkpoint", steps, self.named, self.optimizer, extra=extra, flat=self.flat)
        self.run.keep()  # from here on a failure leaves the run to --resume

    def _replay(self, folder: Path, extra: dict[str, torch.Tensor]) -> None:
        """Take up a checkpoint's step and replay the weight edits made before it, in their order, so the
        frozen weights are bit for bit those of the uninterrupted run."""
        self.start = self.ctx.step = checkpoint_step(folder)
        for name, layer in self.layers.items():
            if f"edits.{name}" in extra:
                self.edit_files.replay(name, layer, extra[f"edits.{name}"].tolist())

    def _load(self, folder: Path, extra: dict[str, torch.Tensor]) -> None:
        """Restore a checkpoint's trainable tensors, optimizer state, RNG and hook state (after the hooks'
        setup, which may build the state they load)."""
        load_checkpoint(folder, self.named, self.optimizer, self.flat)
        for i, h in enumerate(self.hooks):
            prefix = f"hook{i}."
            h.load_state_dict({k[len(prefix) :]: v for k, v in extra.items() if k.startswith(prefix)})

    # -- the artifact ------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Write the train artifact into the work folder (the main process) and drop the checkpoint."""
        self.progress.close()
        if not self.accelerator.is_main_process:
            return
        summary = {k: v for h in self.hooks for k, v in h.summary().items()}
        summary["peak_memory_mb"] = peak_memory_mb(self.accelerator.device)
        summary["processes"] = {"count": self.accelerator.num_processes, "shard": "fsdp" if self.sharded else "none"}
        _write_run(
            self.work,
            self.ctx.model,
            self.head,
            self.init_dir,
            self.init_manifest,
            self.examples,
            self.data,
            self.cfg,
            self.total,
            self.method_options,
            summary,
            self.preset,
        )
        for h in self.hooks:
            for name, text in h.files().items():
                if Path(name).name != name or name in (ADAPTER_FILE, "manifest.json", "metrics.jsonl", "checkpoint"):
                    raise ValueError(f"a training hook may not write the file {name!r} into the run")
                write_text_atomic(self.work / name, text)
        if self.held_out:
            manifest = read_manifest(self.work)
            record = {**self.evaluated, "data": asdict(self.eval_data), "fingerprint": self.held_out.fingerprint}
            manifest.extra["eval"] = record
            write_manifest(self.work, manifest)
        shutil.rmtree(self.work / "checkpoint", ignore_errors=True)
        shutil.rmtree(self.edit_files.folder, ignore_errors=True)


def _diverged(what: str, value: float, step: int, start: int, out: Path, work: Path) -> TrainingDiverged:
    """The error for a non-finite loss or penalty, with the advice that fits where the run stands."""
    where = f"{what} is {value} at step {step + 1}; nothing was written to {out}."
    if step == start == 0:
        return TrainingDiverged(
            f"{where} It is not finite before any update, so the model, its init artifact or the data give "
            "non-finite values: check them (a lower --lr will not help)"
        )
    if (work / "checkpoint").exists():
        return TrainingDiverged(
            f"{where} The last checkpoint in {work} is kept: lower --lr and continue with --resume, "
            "or start over with --overwrite"
        )
    return TrainingDiverged(f"{where} No checkpoint was saved yet: lower --lr and run again")


def _write_run(
    work: Path,
    model: nn.Module,
    head: dict[str, nn.Parameter],
    init_dir: Path,
    init_manifest: Manifest,
    examples: Examples,
    data: DataSpec,
    cfg: TrainConfig,
    steps: int,
    method_options: dict[str, Any],
    summary: dict[str, Any],
    preset: str | None,
) -> None:
    adapters = {n: layer.export() for n, layer in adapted_layers(model).items()}
    tensors, meta = to_tensors(adapters)
    for name, p in head.items():
        tensors[HEAD_PREFIX + name] = p.detach().float().cpu()
    head_info = {"task": data.task}
    if data.task == "classification":
        head_info.update(num_labels=len(examples.labels), id2label=dict(enumerate(examples.labels)))
    save_tensors(work / ADAPTER_FILE, tensors)
    manifest = Manifest(
        kind="train",
        config={
            **init_manifest.config,
            "train": asdict(cfg),
            "method_train_options": method_options,
            **({"train_preset": preset} if preset else {}),
            "data": asdict(data),
            "steps": steps,
        },
        model=init_manifest.model,
        data={"fingerprint": examples.fingerprint, "path": data.path, "split": data.split, "examples": len(examples)},
        parent={"kind": init_manifest.kind, "path": str(Path(init_dir).resolve()), "created": init_manifest.created},
        extra={
            "modules": meta,
            "head": head_info,
            "trainable_parameters": trainable_count(meta) + sum(p.numel() for p in head.values()),
            **summary,
        },
    )
    write_manifest(work, manifest)
