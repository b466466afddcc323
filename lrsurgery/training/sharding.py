"""Sharded training (`train --shard fsdp`, or `accelerate launch --use_fsdp`): the frozen weights sharded over
the processes with PyTorch's FSDP2 (`fully_shard`, one unit per transformer block plus the rest of the
model), the trainable tensors (adapters, a task head) replicated.

Why the adapters stay replicated: they are ~1 % of the model, so sharding them saves little memory, and
every method decides from them and their gradients (dual's importance and masks, SRLoRA's pair choice,
the flat AdamW buffer of training/flat.py) exactly as with one process. Their gradients are averaged over
the processes with one all-reduce of the flat gradient buffer per optimizer step, which is what DDP does.

What needs the full weights: `init` none (it reads the weight files); importance and TLoRA's frozen A
none (they live in the replicated adapters); SRLoRA's switch adds B·A to the frozen W, and since row i
of W changes by row i of B times A, each process adds its own rows' share (`AdaptedLinear.add_edit`): the full W
is never gathered outside a forward or backward. Held-out evaluation runs a forward on every process,
as FSDP's all-gathers need them all.

DeepSpeed ZeRO-3 partitions the trainable parameters and owns the optimizer step, so neither the flat
buffers nor the methods' edits of frozen weights can run under it: `accelerate launch --use_deepspeed` is
refused with a message pointing to `--shard fsdp`."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from lrsurgery.errors import OptionError
from lrsurgery.hf.tree import block_list

SHARDS = ("none", "fsdp")


def sharding_from(shard: str) -> str:
    """The sharding to train with: `shard` (--shard), or fsdp when `accelerate launch --use_fsdp` asked for it.
    Refuses DeepSpeed (see the module doc)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise OptionError(
            "DeepSpeed is not supported: ZeRO-3 partitions the adapters and owns the optimizer step, which the "
            "methods' mechanics need; launch without --use_deepspeed and pass --shard fsdp to shard the frozen weights"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return shard


def shard_frozen(model: nn.Module, trainable: list[nn.Parameter]) -> None:
    """Shard `model`'s frozen parameters over the default process group with FSDP2, one unit per transformer
    block and one for the rest; the `trainable` parameters are left out (replicated, see the module doc)."""
    from torch.distributed.fsdp import fully_shard

    ignored = set(trainable)
    _, blocks = block_list(model)
    for block in blocks:
        fully_shard(block, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)


def average_gradients(gradients: list[torch.Tensor]) -> None:
    """Replace each gradient buffer by its mean over the processes (in place)."""
    world = dist.get_world_size()
    for grad in gradients:
        dist.all_reduce(grad)
        grad.div_(world)


def is_sharded(weight: torch.Tensor) -> bool:
    """Whether `weight` is an FSDP shard (each process holds other rows, so there is nothing to compare)."""
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor)
