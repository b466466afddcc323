"""Lazy reading and sharded writing of safetensors model weights (one tensor in memory at a time)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from lrsurgery.artifacts import save_tensors

INDEX = "model.safetensors.index.json"
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'5GB' → 5_000_000_000 bytes (decimal units, as transformers; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    unit = (match.group(2) or "B").upper() if match else ""
    if not match or unit not in SIZE_UNITS:
        raise ValueError(f"cannot read size {text!r}; write e.g. 500MB or 5GB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


class LazyWeights:
    """The tensors of a model folder's safetensors files, opened lazily and read one at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} has no safetensors weights")
        self.location: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self.location[key] = file

    def keys(self) -> list[str]:
        return list(self.location)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self.location[key]), framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) file by file, so each file is opened once."""
        by_file: dict[Path, list[str]] = {}
        for key, file in self.location.items():
            by_file.setdefault(file, []).append(key)
        with ExitStack() as stack:
            for file, keys in by_file.items():
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
                for key in keys:
                    yield key, handle.get_tensor(key)


class ShardWriter:
    """Write tensors into `model-0000i-of-0000N.safetensors` shards of at most `max_bytes` plus an index.

    A single tensor larger than `max_bytes` gets a shard of its own. With one shard the file is
    `model.safetensors` and no index is written, as transformers does.
    """

    def __init__(self, folder: Path, max_bytes: int, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.metadata = metadata or {"format": "pt"}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f".shard-{len(self.written):05d}.safetensors"
        save_tensors(path, self.pending, metadata=self.metadata)
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Name the shards, write the index; return the shard paths."""
        self.flush()
        count = len(self.written)
        if count == 1:
            final = self.folder / "model.safetensors"
            os.replace(self.written[0][0], final)
            return [final]
        weight_map, paths = {}, []
        for i, (path, names) in enumerate(self.written):
            final = self.folder / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(path, final)
            paths.append(final)
            weight_map.update({n: final.name for n in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2))
        return paths
