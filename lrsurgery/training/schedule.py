"""The training schedule: optimisation settings, the learning rate at each step, the data order, AdamW."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lrsurgery.config import option
from lrsurgery.errors import SEED_MAX, OptionError, check_choice, check_count, check_number
from lrsurgery.training.sharding import SHARDS

MAX_BATCH = 2**16  # examples per micro-batch, and micro-batches per step: far beyond any device's memory


@dataclass
class TrainConfig:
    """Optimisation settings (every field is a CLI flag)."""

    max_steps: int | None = option(None, "Optimizer steps (or give --epochs).")
    epochs: float | None = option(None, "Passes over the data (or give --max-steps).")
    lr: float = option(2e-4, "Peak learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    batch_size: int = option(4, "Examples per micro-batch per process.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    warmup_ratio: float = option(0.03, "Fraction of the steps of linear warmup.")
    schedule: str = option("cosine", "Learning-rate schedule after warmup: cosine, linear or constant.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    precision: str = option("fp32", "fp32, or bf16 autocast.")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward: less memory, more time.")
    compile: bool = option(
        False,
        "torch.compile each transformer block (about one block's compile time, then faster steps; "
        "equal to eager up to fp32 rounding).",
    )
    seed: int = option(0, "Seed of the data order, dropout and a new task head.")
    save_every: int = option(50, "Checkpoint every N steps (what --resume continues from).")
    log_every: int = 1
    eval_every: int = option(0, "With --eval-data: held-out loss every N steps (0: after the last step only).")
    shard: str = option(
        "none",
        "With several processes: none (data parallel, each holds the whole model) or fsdp (the frozen weights "
        "sharded over the processes, the adapters replicated).",
    )

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise OptionError("give exactly one of --max-steps or --epochs")
        check_choice("--schedule", self.schedule, ("linear", "cosine", "constant"))
        check_choice("--precision", self.precision, ("fp32", "bf16"))
        check_choice("--shard", self.shard, SHARDS)
        check_count("--max-steps", self.max_steps)
        check_number("--epochs", self.epochs, 0, 1e6, low_open=True)
        check_number("--lr", self.lr, 0, low_open=True)
        check_number("--weight-decay", self.weight_decay, 0)
        check_count("--batch-size", self.batch_size, 1, MAX_BATCH)
        check_count("--grad-accum", self.grad_accum, 1, MAX_BATCH)
        check_number("--warmup-ratio", self.warmup_ratio, 0, 1)
        check_number("--max-grad-norm", self.max_grad_norm, 0, low_open=True)
        check_count("--seed", self.seed, 0, SEED_MAX)
        check_count("--save-every", self.save_every)
        check_count("--log-every", self.log_every)
        check_count("--eval-every", self.eval_every, 0)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then linear/cosine/constant."""
    warmup = int(round(cfg.warmup_ratio * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(step: int, micro: int, n: int, cfg: TrainConfig, world: int, rank: int) -> list[int]:
    """Example indices for micro-batch `micro` of optimizer step `step` on process `rank`.

    The data is an endless stream of seeded permutations (one per epoch), so the order depends only
    on (seed, step) and a resumed run sees exactly the batches the uninterrupted one would.
    """
    per_step = cfg.batch_size * cfg.grad_accum * world
    start = step * per_step + (micro * world + rank) * cfg.batch_size
    out = []
    for pos in range(start, start + cfg.batch_size):
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        out.append(int(perm[offset]))
    return out


def total_steps(cfg: TrainConfig, n: int, world: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum * world
    return max(1, math.ceil(cfg.epochs * n / per_step))


def adamw(params: list[torch.Tensor], lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel where the parameters' device has one (CPU and CUDA do): one
    kernel for all of them, several times faster than the per-tensor loop on the hundreds of small
    adapter tensors. Falls back to the default implementation elsewhere."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
