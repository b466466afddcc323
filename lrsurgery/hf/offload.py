"""Disk offload: a model whose transformer blocks stay empty until needed, one block read at a time.

Everything outside the block list (embeddings, final norm, head, rotary buffers) is loaded normally;
the blocks' parameters live on the meta device (no memory) and `BlockLoader.load(i)` reads block i's
tensors from the safetensors files, `release(i)` empties it again. Peak memory is the non-block part
plus one block, so a model larger than RAM can be calibrated; `release_rest()` empties the non-block
part too once nothing outside the blocks runs again (covariance calibration, after the first block's
inputs are captured)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device

from lrsurgery.hf.load import LoadedModel, empty_model, load_tokenizer
from lrsurgery.hf.resolve import resolve_model
from lrsurgery.hf.tree import block_list, file_keys, module_prefix
from lrsurgery.io.shards import LazyWeights


class BlockLoader:
    """Reads one transformer block's weights from disk into an otherwise empty model."""

    def __init__(self, loaded: LoadedModel):
        self.model = loaded.model
        self.weights = LazyWeights(loaded.folder)
        self.block_prefix, self.blocks = block_list(self.model)
        self.by_block: dict[int, list[tuple[str, str]]] = {}
        self.rest: list[tuple[str, str]] = []
        head = f"{module_prefix(self.model)}{self.block_prefix}."
        for name, key in file_keys(self.model, self.weights).items():
            if name.startswith(head):
                self.by_block.setdefault(int(name[len(head) :].split(".")[0]), []).append((key, name))
            else:
                self.rest.append((key, name))

    def load_rest(self) -> None:
        for key, name in self.rest:
            set_module_tensor_to_device(self.model, name, "cpu", value=self.weights.get(key, self._dtype(name)))
        self.model.tie_weights()

    def load(self, index: int, device: torch.device | str) -> torch.nn.Module:
        for key, name in self.by_block.get(index, []):
            set_module_tensor_to_device(self.model, name, device, value=self.weights.get(key, self._dtype(name)))
        return self.blocks[index]

    def _dtype(self, name: str) -> torch.dtype:
        """The dtype the empty model declares for tensor `name` (the file's may differ, e.g. bf16)."""
        module, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(module), attr).dtype

    def release(self, index: int) -> None:
        self.blocks[index].to("meta")
        return_freed_memory()

    def release_rest(self) -> None:
        """Empty every parameter outside the blocks (embeddings, final norm, head, tied or not), for
        when nothing outside the blocks runs again."""
        inside = {id(p) for block in self.blocks for p in block.parameters()}
        for module in self.model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if id(param) not in inside and param.device.type != "meta":
                    module.register_parameter(name, torch.nn.Parameter(param.to("meta"), requires_grad=False))
        return_freed_memory()


def return_freed_memory() -> None:
    """Hand the heap pages freed so far back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Without it, glibc keeps the blocks' freed weights and the replaced activations of every block in
    its arenas, and the resident size creeps up block after block.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_offloaded(spec: str) -> tuple[LoadedModel, BlockLoader]:
    """The model of `spec` with empty blocks (see module doc) and the loader that fills them."""
    folder = resolve_model(spec)
    model = empty_model(folder)
    tokenizer = load_tokenizer(folder)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, folder=Path(folder), source=str(spec))
    loader = BlockLoader(loaded)
    loader.load_rest()
    return loaded, loader
