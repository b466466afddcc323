"""How the model runs its training steps: no key/value cache, and with `--compile` each transformer block
compiled by torch.compile (regional compilation)."""

from __future__ import annotations

import shutil

import torch
from torch import nn

from lrsurgery.errors import OptionError
from lrsurgery.hf.tree import block_list


def prepare_training_forward(model: nn.Module, compile_blocks: bool, device: torch.device) -> int:
    """Set `model` up for training forwards in place; returns how many blocks were compiled (0 without
    `compile_blocks`).

    The forward keeps no key/value cache (transformers builds one whenever `config.use_cache` is set,
    which costs time and, compiled, recompiles). With `compile_blocks` every transformer block is wrapped
    by torch.compile. The blocks are modules of one class whose parameters dynamo takes as inputs, so they
    share the code compiled for the first one: compiling costs about one block, not the model (two
    compilations in practice, as the first block's input needs no gradient, and one more when the
    sequence length first changes, after which the length is dynamic). Inductor fuses the blocks'
    elementwise work (norms, rotary embeddings, activations, the adapters' scale and add), so the frozen
    model itself runs faster too. The results equal eager's up to fp32 rounding, not bit for bit.
    """
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if not compile_blocks:
        return 0
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        raise OptionError("--compile needs a C++ compiler on the CPU (g++); install one, or drop --compile")
    _, blocks = block_list(model)
    for block in blocks:
        block.compile()
    return len(blocks)
