"""Disk offload: a model whose transformer blocks stay empty until needed, one block read at a time.

The blocks' parameters live on the meta device (no memory): `BlockLoader.load(i)` reads block i's
tensors from the safetensors files, `release(i)` empties it again. Outside the blocks, the small parts
(final norm, position embeddings, rotary buffers) are loaded normally, but not the two vocabulary-sized
matrices, which can outweigh several blocks (a 150k-token vocabulary at hidden 896 is 0.5 GB each):
`token_rows(batches)` gives the input embedding only the rows of the tokens the batches hold, and
`head_rows` streams the LM head's rows (tied: the embedding's) for the sensitivity pass's loss gradient
(calibration/head.py); `head()` loads the whole head instead, for models whose logits are more than
the head's product. Peak memory is one block plus those, so a model larger than RAM can be calibrated;
`release_rest()` empties the non-block part too once nothing outside the blocks runs again (covariance
calibration, after the first block's inputs are captured)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device

from lrsurgery.hf.load import LoadedModel, empty_model, load_tokenizer
from lrsurgery.hf.resolve import resolve_model
from lrsurgery.hf.tree import block_list, file_keys, module_prefix
from lrsurgery.io.memory import return_freed_memory
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
        modules = {id(m): n for n, m in self.model.named_modules()}
        self.embedding = _weight_name(modules, self.model.get_input_embeddings())
        self.output = _weight_name(modules, self.model.get_output_embeddings())
        # vocabulary-sized, loaded on demand (see module doc)
        self.on_demand: dict[str, str] = {}
        for name, key in file_keys(self.model, self.weights).items():
            if name.startswith(head):
                self.by_block.setdefault(int(name[len(head) :].split(".")[0]), []).append((key, name))
            elif name in (self.embedding, self.output):
                self.on_demand[name] = key
            else:
                self.rest.append((key, name))

    def load_rest(self) -> None:
        for key, name in self.rest:
            self._set(name, self.weights.get(key, self._dtype(name)))

    def _set(self, name: str, value: torch.Tensor, device: torch.device | str = "cpu") -> None:
        set_module_tensor_to_device(self.model, name, device, value=value)

    @property
    def tied(self) -> bool:
        """Whether the LM head is the input embedding's matrix (no head of its own in the files)."""
        return self.output is not None and self.output not in self.on_demand

    @contextmanager
    def token_rows(self, batches: list[dict]) -> Iterator[list[dict]]:
        """Within: the input embedding holds only the rows of the tokens in `batches`, and the batches
        yielded have their input_ids renumbered into those rows (the batches given are not changed). The
        rows go back to the meta device after."""
        module = self.model.get_input_embeddings()
        key = self.on_demand[self.embedding]
        ids = torch.unique(torch.cat([b["input_ids"].reshape(-1) for b in batches]))  # sorted
        rows = torch.stack([self.weights.rows(key, i, i + 1)[0] for i in ids.tolist()])
        padding, empty = getattr(module, "padding_idx", None), module.weight
        module.padding_idx = None  # a row number of the whole vocabulary (it only stops gradients)
        module.weight = torch.nn.Parameter(rows.to(self._dtype(self.embedding)), requires_grad=False)
        try:
            yield [{**b, "input_ids": torch.searchsorted(ids, b["input_ids"])} for b in batches]
        finally:
            module.padding_idx, module.weight = padding, empty
            return_freed_memory()

    @contextmanager
    def head(self) -> Iterator[None]:
        """Within: the LM head's weight is loaded (tied: the embedding matrix, which it is). Emptied after."""
        name = self._head_name()
        self._set(name, self.weights.get(self.on_demand[name], self._dtype(name)))
        if self.tied:
            self.model.tie_weights()
        try:
            yield
        finally:
            self._empty(name)

    @property
    def head_dtype(self) -> torch.dtype:
        """The dtype the model computes its logits in (its head's, tied or not)."""
        return self._dtype(self._head_name())

    def head_rows(self, step: int, device: torch.device | str) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (first row, rows (≤ step, d) in head_dtype on `device`) over the LM head's vocabulary rows,
        read from the files (tied: the embedding matrix's), so that only `step` rows are in memory."""
        key = self.on_demand[self._head_name()]
        for first in range(0, self.weights.shape(key)[0], step):
            rows = self.weights.rows(key, first, min(first + step, self.weights.shape(key)[0]))
            yield first, rows.to(device=device, dtype=self.head_dtype)

    def _head_name(self) -> str:
        name = self.embedding if self.tied else self.output
        if name is None:
            raise ValueError("the model has no LM head")  # a bug: only causal LMs reach the sensitivity pass
        return name

    def _empty(self, name: str) -> None:
        module, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(module)
        owner.register_parameter(attr, torch.nn.Parameter(getattr(owner, attr).to("meta"), requires_grad=False))
        if self.tied:
            self.model.tie_weights()
        return_freed_memory()

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


def _weight_name(modules: dict[int, str], module: torch.nn.Module | None) -> str | None:
    """The state-dict name of `module`'s weight ("model.embed_tokens.weight"), or None without a module."""
    if module is None or id(module) not in modules:
        return None
    prefix = modules[id(module)]
    return f"{prefix}.weight" if prefix else "weight"


def load_offloaded(spec: str) -> tuple[LoadedModel, BlockLoader]:
    """The model of `spec` with empty blocks (see module doc) and the loader that fills them."""
    folder = resolve_model(spec)
    model = empty_model(folder)
    tokenizer = load_tokenizer(folder)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, folder=Path(folder), source=str(spec))
    loader = BlockLoader(loaded)
    loader.load_rest()
    return loaded, loader
