"""Streaming read and write of safetensors model weights: one tensor in memory at a time.

Reading parses each file's header and reads a tensor's bytes with plain file I/O (no mmap, so the
resident set does not grow with the file). Writing plans every shard's header up front from the
tensors' names, shapes and dtypes, then appends each tensor's bytes as it comes."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from lrsurgery.errors import OptionError, UserError

INDEX = "model.safetensors.index.json"


SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def parse_size(text: str | int) -> int:
    """'5GB' → 5_000_000_000 bytes (decimal units, as transformers; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    unit = (match.group(2) or "B").upper() if match else ""
    try:
        value = float(match.group(1)) * SIZE_UNITS[unit] if match and unit in SIZE_UNITS else None
    except ValueError:  # "1.2.3"
        value = None
    if value is None or not 1 <= value < 2**63:
        raise OptionError(f"cannot read size {text!r}: write a positive size such as 500MB or 5GB")
    return int(value)


class WeightsFileError(UserError):
    """A safetensors file is truncated or malformed."""


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name → dtype, shape, data_offsets) and where its data starts.

    Every entry is checked against the file: a known dtype, a shape whose size matches its byte range,
    and a byte range inside the file, so a truncated or damaged file is refused here, naming it, and
    never read as zeros or garbage.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise WeightsFileError(f"{path} is truncated or not a safetensors file (no valid header)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError) as exc:
            raise WeightsFileError(f"{path} is damaged: its safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise WeightsFileError(f"{path} is damaged: its safetensors header is not a table of tensors")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    for name, info in header.items():
        try:
            dtype = CODE_DTYPES[info["dtype"]]
            begin, end = (int(x) for x in info["data_offsets"])
            count = _numel(tuple(int(d) for d in info["shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsFileError(f"{path} is damaged: tensor {name!r} has a malformed entry") from exc
        if end - begin != count * dtype.itemsize or not 0 <= begin <= end <= data_size:
            raise WeightsFileError(f"{path} is truncated or damaged: tensor {name!r} lies outside the file's data")
    return header, 8 + length


class LazyWeights:
    """The tensors of a model folder's safetensors files (or of one file), read one at a time on request."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = [self.folder] if self.folder.is_file() else sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise WeightsFileError(f"{folder} has no safetensors weights")
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        for file in files:
            header, start = read_header(file)
            for name, info in header.items():
                self.entries[name] = (file, start, info)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key][2]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return CODE_DTYPES[self.entries[key][2]["dtype"]]

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor, converted to `dtype` (default: as stored) row block by row block, so the
        only extra memory beyond the result is one block of rows."""
        shape = self.shape(key)
        if not shape:
            return self._read(key, 0, 1).to(dtype or self.dtype(key))
        if dtype in (None, self.dtype(key)):  # as stored: the bytes go straight into the result
            return self._read(key, 0, shape[0])
        out = torch.empty(shape, dtype=dtype)
        first = 0
        for block in self.row_chunks(key):
            out[first : first + block.shape[0]] = block
            first += block.shape[0]
        return out

    def row_chunks(self, key: str, max_bytes: int | None = 16 * 2**20) -> Iterator[torch.Tensor]:
        """Yield the tensor in blocks of whole rows of at most `max_bytes` (one block if None)."""
        shape = self.shape(key)
        if not shape:
            yield self._read(key, 0, 1)
            return
        row_bytes = self.dtype(key).itemsize * _numel(shape[1:])
        step = shape[0] if max_bytes is None else max(1, max_bytes // max(1, row_bytes))
        for first in range(0, shape[0], step):
            yield self._read(key, first, min(shape[0], first + step))
        if shape[0] == 0:
            yield torch.empty(shape, dtype=self.dtype(key))

    def rows(self, key: str, first: int, last: int) -> torch.Tensor:
        """Rows `first:last` of a tensor of at least one dimension, as stored."""
        return self._read(key, first, last)

    def _read(self, key: str, first: int, last: int) -> torch.Tensor:
        file, start, info = self.entries[key]
        shape = tuple(info["shape"])
        row_bytes = self.dtype(key).itemsize * _numel(shape[1:])
        buffer = bytearray((last - first) * row_bytes)
        with open(file, "rb") as handle:
            handle.seek(start + info["data_offsets"][0] + first * row_bytes)
            if handle.readinto(buffer) != len(buffer):
                raise WeightsFileError(f"{file} was truncated while reading tensor {key!r}")
        rows = (last - first,) + shape[1:] if shape else ()
        return torch.frombuffer(buffer, dtype=self.dtype(key)).reshape(rows)


class ShardWriter:
    """Write a planned list of tensors into `model-0000i-of-0000N.safetensors` shards plus an index.

    `plan` lists (name, shape, dtype) in the order `write` will be called. Shards hold at most
    `max_bytes` of data (a larger single tensor gets its own shard); with one shard the file is
    `model.safetensors` with no index, as transformers writes it.
    """

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int):
        self.folder = Path(folder)
        self.shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        used = 0
        for name, shape, dtype in plan:
            size = dtype.itemsize * _numel(shape)
            if self.shards[-1] and used + size > max_bytes:
                self.shards.append([])
                used = 0
            self.shards[-1].append((name, shape, dtype, size))
            used += size
        self.order = [(i, entry[0]) for i, shard in enumerate(self.shards) for entry in shard]
        self.planned = {name: (tuple(shape), dtype) for name, shape, dtype in plan}
        self.position = 0
        self.handle = None
        self.current = -1

    @property
    def total_size(self) -> int:
        return sum(entry[3] for shard in self.shards for entry in shard)

    def file_name(self, index: int) -> str:
        count = len(self.shards)
        return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"

    def _open(self, index: int) -> None:
        if self.handle:
            self.handle.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, size in self.shards[index]:
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.handle = open(self.folder / self.file_name(index), "wb")
        self.handle.write(struct.pack("<Q", len(raw)) + raw)
        self.current = index

    def write(self, name: str, parts: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Append the next planned tensor, whole or as consecutive row blocks (in any iterable)."""
        index, expected = self.order[self.position]
        if name != expected:
            raise RuntimeError(f"shard writer expected {expected}, got {name}")
        shape, dtype = self.planned[name]
        if index != self.current:
            self._open(index)
        written = 0
        for part in [parts] if isinstance(parts, torch.Tensor) else parts:
            if part.dtype != dtype or tuple(part.shape[1:]) != shape[1:]:
                raise RuntimeError(f"{name}: planned {shape} {dtype}, got a block {tuple(part.shape)} {part.dtype}")
            self.handle.write(part.contiguous().view(-1).view(torch.uint8).numpy())  # no intermediate copy
            written += part.numel()
        if written != _numel(shape):
            raise RuntimeError(f"{name}: planned {_numel(shape)} values, got {written}")
        self.position += 1

    def close(self) -> None:
        """Finish the last shard and write the index (when there are several shards)."""
        if self.position != len(self.order):
            raise RuntimeError(f"shard writer got {self.position} of {len(self.order)} planned tensors")
        if self.handle:
            self.handle.close()
        if len(self.shards) > 1:
            weight_map = {e[0]: self.file_name(i) for i, shard in enumerate(self.shards) for e in shard}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2))


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
