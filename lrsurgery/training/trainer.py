"""The `train` stage: fine-tune an init artifact's adapters on `accelerate`.

The run works in `OUT.partial/` (metrics log, checkpoints) and is renamed to `OUT` only when finished,
so `OUT` never holds a half-trained artifact. `--resume` continues from the last checkpoint in
`OUT.partial/` and, on CPU, gives bit-identical adapters to an uninterrupted run: the data order is a
function of (seed, step) alone, and the optimizer state and RNG state are checkpointed."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsurgery.data.examples import DataSpec, Examples, build_examples, collate, read_labels
from lrsurgery.errors import ArtifactError, OptionError, UserError
from lrsurgery.io.adapter_file import ADAPTED_KINDS, ADAPTER_FILE, to_tensors, trainable_count
from lrsurgery.io.artifacts import Manifest, file_digest, read_manifest, save_tensors, write_manifest
from lrsurgery.io.outputs import check_output, output_folder, write_text_atomic
from lrsurgery.layers.adapted import HEAD_PREFIX, adapted_layers, head_parameters
from lrsurgery.methods import MethodError, TrainHooks, get_method
from lrsurgery.progress import bar
from lrsurgery.stages.adapted import load_adapted
from lrsurgery.training.checkpoint import load_checkpoint, load_checkpoint_extra, save_checkpoint
from lrsurgery.training.flat import FlatParameters
from lrsurgery.training.heldout import heldout_loss
from lrsurgery.training.schedule import TrainConfig, adamw, batch_indices, lr_at, total_steps


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
) -> Path:
    """Train the adapters of `init_dir` on `data` and write a train artifact to `out`; return `out`.

    With `eval_data`, the held-out loss (training/heldout.py) is logged as `eval_loss` every `cfg.eval_every`
    steps and after the last one, and recorded in the artifact's manifest. `method_options` are
    train-time options of the artifact's method (e.g. the dual method's screening schedule); they
    override the init options, are validated by the method and pinned for `--resume`.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    out = Path(out)
    main = int(os.environ.get("RANK", "0")) == 0  # torchrun and accelerate set RANK; only rank 0 writes
    inputs = [init_dir, data.path, eval_data.path if eval_data else None]
    if not main:  # the main process checks, locks and writes the output; the others only refuse the same
        check_output(out, inputs, overwrite, "train")
    with output_folder(out, "train", inputs, overwrite, resume=resume, active=main) as run:
        work = run.folder
        # method options are checked before anything heavy is loaded
        recorded = read_manifest(Path(init_dir), ADAPTED_KINDS).config
        method_options = dict(method_options or {})
        try:  # what init recorded must be valid on its own, or the artifact is damaged
            get_method(recorded["method"], **recorded["options"])
        except MethodError as exc:
            raise ArtifactError(f"{init_dir}/manifest.json records options its method refuses: {exc}") from exc
        method_config = get_method(recorded["method"], **{**recorded["options"], **method_options})
        torch.manual_seed(cfg.seed)
        labels = read_labels(data) if data.task == "classification" else None
        loaded, init_manifest = load_adapted(
            Path(init_dir), task=data.task, num_labels=len(labels) if labels else None, force=force
        )
        model, tokenizer = loaded.model, loaded.tokenizer
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and data.seq_len > limit:
            raise OptionError(f"--seq-len {data.seq_len} is longer than the model allows ({limit})")
        examples = build_examples(data, tokenizer, labels)
        held_out = build_examples(eval_data, tokenizer, labels) if eval_data else None
        evaluated: dict[str, Any] = {}
        head = head_parameters(model) if data.task == "classification" else {}
        for p in head.values():
            p.requires_grad_(True)
        method_hooks = [method_config.hooks(), *(hooks or [])]
        if cfg.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # accelerate keeps one process-wide state; reset what a previous run in this process set
        AcceleratorState._reset_state()
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # lets torchrun/accelerate start several CPU processes (gloo)
            mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        )
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # placing and wrapping the model may give parameters new storage, so they move into their flat
        # buffers (see training/flat.py) afterwards; `flat.check()` below makes sure nothing moved them out again
        model = accelerator.prepare(model)
        flat = FlatParameters(list(named.values()))
        optimizer = accelerator.prepare(adamw(flat.flats, lr=cfg.lr, weight_decay=cfg.weight_decay))
        total = total_steps(cfg, len(examples), accelerator.num_processes)
        for h in method_hooks:
            h.setup(accelerator.unwrap_model(model), total)

        start = 0
        if accelerator.is_main_process:
            work.mkdir(parents=True, exist_ok=True)
            settings = {
                "init": str(Path(init_dir).resolve()),
                "init_fingerprint": file_digest(Path(init_dir) / ADAPTER_FILE),
                "train": asdict(cfg),
                "data": asdict(data),
                "data_fingerprint": examples.fingerprint,
                "eval_data": asdict(eval_data) if eval_data else None,
                "processes": accelerator.num_processes,
                "method_options": method_options,
            }
            run.pin(settings)
        accelerator.wait_for_everyone()
        if resume and (work / "checkpoint").exists():
            start = load_checkpoint(work / "checkpoint", named, optimizer, flat)
            extra = load_checkpoint_extra(work / "checkpoint")
            for i, h in enumerate(method_hooks):
                prefix = f"hook{i}."
                h.load_state_dict({k[len(prefix) :]: v for k, v in extra.items() if k.startswith(prefix)})
        _truncate_log(work / "metrics.jsonl", start)

        pad = tokenizer.pad_token_id
        model.train()
        progress = bar(total, desc="train", unit="step", initial=start)
        for step in range(start, total):
            began = time.perf_counter()
            lr = lr_at(step, total, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            task_loss = 0.0
            extra_logged: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                world, rank = accelerator.num_processes, accelerator.process_index
                idx = batch_indices(step, micro, len(examples), cfg, world, rank)
                rows = collate([examples.rows[i] for i in idx], pad, data.task)
                batch = {k: v.to(accelerator.device) for k, v in rows.items()}
                with accelerator.autocast():
                    loss = model(**batch).loss
                    extras = {k: v for h in method_hooks for k, v in h.extra_loss(model, step).items()}
                    total_loss = loss + sum(extras.values()) if extras else loss
                if not torch.isfinite(total_loss):
                    raise _diverged("the loss", float(total_loss.detach()), step, start, out, work)
                accelerator.backward(total_loss / cfg.grad_accum)
                task_loss += loss.item() / cfg.grad_accum
                for k, v in extras.items():
                    extra_logged[k] = extra_logged.get(k, 0.0) + v.item() / cfg.grad_accum
            if accelerator.num_processes > 1:  # log the loss of the whole global batch, not of one process
                task_loss = float(accelerator.reduce(torch.tensor(task_loss, device=accelerator.device), "mean"))
            for h in method_hooks:
                added = h.add_gradients(accelerator.unwrap_model(model), step)
                bad = [k for k, v in added.items() if not math.isfinite(v)]
                if bad:
                    raise _diverged(bad[0], added[bad[0]], step, start, out, work)
                extra_logged.update(added)
            if step == start:
                flat.check()  # nothing (accelerate, DDP, a hook) cut a gradient loose from the buffers
            grad_norm = accelerator.clip_grad_norm_(flat.flats, cfg.max_grad_norm)
            for h in method_hooks:
                h.after_backward(model, step)
            optimizer.step()
            flat.zero_grad()
            logged: dict[str, Any] = {}
            for h in method_hooks:
                logged.update(h.after_step(model, step, optimizer))
            due = step + 1 == total or (cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0)
            if held_out and accelerator.is_main_process and due:
                evaluated = heldout_loss(accelerator.unwrap_model(model), held_out, pad, data.task, cfg.batch_size)
                logged["eval_loss"] = evaluated["loss"]
            record = {
                "step": step + 1,
                "loss": task_loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "step_time": time.perf_counter() - began,
                **extra_logged,
                **logged,
            }
            if accelerator.is_main_process and (step + 1) % cfg.log_every == 0:
                with open(work / "metrics.jsonl", "a") as log:
                    log.write(json.dumps(record) + "\n")
            progress.update(1)
            progress.set_postfix(loss=f"{task_loss:.4f}")
            if accelerator.is_main_process and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                hook_state = {f"hook{i}.{k}": v for i, h in enumerate(method_hooks) for k, v in h.state_dict().items()}
                flat.check()
                save_checkpoint(work / "checkpoint", step + 1, named, optimizer, extra=hook_state, flat=flat)
                run.keep()  # from here on a failure leaves the run to --resume
        progress.close()

        model = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            summary = {k: v for h in method_hooks for k, v in h.summary().items()}
            _write_run(work, model, head, init_dir, init_manifest, examples, data, cfg, total, method_options, summary)
            if held_out:
                manifest = read_manifest(work)
                manifest.extra["eval"] = {**evaluated, "data": asdict(eval_data), "fingerprint": held_out.fingerprint}
                write_manifest(work, manifest)
            shutil.rmtree(work / "checkpoint", ignore_errors=True)
    accelerator.wait_for_everyone()
    return out


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


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to `step` (those after it were written after the checkpoint a resumed run
    starts from) and drop a line cut short by a crash or a full disk."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


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
