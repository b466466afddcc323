"""The module tree of a transformers model: the backbone, its block list, the linear layers adapters
target, and how weight-file tensor names map to the model's names."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lrsurgery.hf.resolve import ModelError
from lrsurgery.io.shards import LazyWeights


def module_prefix(model: nn.Module) -> str:
    """How backbone-relative module names are prefixed in the model's state dict."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""


def map_key(key: str, keys: set[str], prefix: str) -> str | None:
    """A weight-file tensor name as the model names it (the backbone may be saved with or without prefix)."""
    if key in keys:
        return key
    if prefix and prefix + key in keys:
        return prefix + key
    if prefix and key.startswith(prefix) and key[len(prefix) :] in keys:
        return key[len(prefix) :]
    return None


def file_keys(model: nn.Module, weights: LazyWeights) -> dict[str, str]:
    """The model's state-dict names of the tensors in its weight files, each mapped to its name in the file."""
    keys, prefix = set(model.state_dict()), module_prefix(model)
    mapped = {key: map_key(key, keys, prefix) for key in weights.keys()}
    return {name: key for key, name in mapped.items() if name is not None}


def target_weights(folder: Path, model: nn.Module, names: list[str]) -> Callable[[str], torch.Tensor]:
    """A reader of the fp32 weight of each module `names[i]` (backbone-relative) of an empty `model`
    (`empty_model`), straight from the folder's safetensors: one tensor read per call, the model never
    built. Raises ModelError when a weight is not in the files under a name the model would load."""
    weights = LazyWeights(folder)
    sources, prefix, root = file_keys(model, weights), module_prefix(model), backbone(model)
    keys = {}
    for name in names:
        key = sources.get(f"{prefix}{name}.weight")
        expected = tuple(root.get_submodule(name).weight.shape)
        if key is None or weights.shape(key) != expected:
            found = "is missing" if key is None else f"has shape {weights.shape(key)}, not {expected}"
            raise ModelError(f"the weight of {name} {found} in the safetensors files of {folder}")
        keys[name] = key
    return lambda name: weights.get(keys[name], torch.float32)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer backbone (`model.base_model`), the root all module names are relative to."""
    return getattr(model, "base_model", model)


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the transformer blocks: the ModuleList of same-typed children holding most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in backbone(model).named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) != 1:
                continue
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ModelError(f"{type(model).__name__} has no recognisable list of transformer blocks")
    return best[1], best[2]


def find_targets(model: nn.Module, pattern: str | None = None) -> list[str]:
    """Names (relative to the backbone) of the nn.Linear layers to adapt.

    Default: every nn.Linear inside the transformer blocks. With `pattern`, every nn.Linear in the
    backbone whose name matches the regex (re.search).
    """
    root = backbone(model)
    if pattern:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ModelError(f"--targets {pattern!r} is not a valid regular expression: {exc}") from exc
        names = [n for n, m in root.named_modules() if isinstance(m, nn.Linear) and regex.search(n)]
        where = f"matching {pattern!r}"
    else:
        prefix, blocks = block_list(model)
        names = [f"{prefix}.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
        where = "inside the transformer blocks"
    if not names:
        raise ModelError(f"no nn.Linear layers {where} in {type(model).__name__}")
    return names
