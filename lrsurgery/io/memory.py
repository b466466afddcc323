"""Memory: how much this process may still take (to size work buffers to the machine, not to a constant),
handing freed heap pages back to the OS, or keeping them for the next allocation."""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

CGROUP = Path("/sys/fs/cgroup")


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes this process can still allocate on `device`, or None where that cannot be read.

    CUDA: the device's free memory. CPU: the smaller of the kernel's MemAvailable and what the process's
    memory cgroup (v2 `memory.max`, or v1 `memory.limit_in_bytes`) leaves above its current usage, since
    a container's or a job scheduler's limit is the one that kills.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    found = [value for value in (_meminfo_available(), _cgroup_headroom()) if value is not None]
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_headroom() -> int | None:
    """The process's cgroup limit minus its usage (v2 or v1 memory controller), or None if unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: limit / usage
            files, folder = ("memory.max", "memory.current"), CGROUP / path.lstrip("/")
        elif "memory" in controllers.split(","):  # v1
            files, folder = ("memory.limit_in_bytes", "memory.usage_in_bytes"), CGROUP / "memory" / path.lstrip("/")
        else:
            continue
        try:
            limit, usage = ((folder / name).read_text().strip() for name in files)
        except OSError:
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # unlimited (v1 writes a huge number)
            continue
        return max(0, int(limit) - int(usage))
    return None


def return_freed_memory() -> None:
    """Hand the heap pages freed so far back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Without it, glibc keeps the blocks' freed weights and the replaced activations of every block in
    its arenas, and the resident size creeps up block after block.
    """
    if (malloc_trim := glibc_function("malloc_trim")) is not None:
        malloc_trim(0)


def glibc_function(name: str) -> Callable[..., int] | None:
    """glibc's function `name`, or None where this process has no libc.so.6 or it lacks `name`."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc keep freed heap memory for the next allocation; returns whether the policy was set.

    glibc serves every allocation above 32 MiB (a batch's logits: batch × length × vocab floats; the
    attention scores of a padded batch) by a fresh mmap and unmaps it on free, so the next batch's buffer
    of the same size faults in zeroed pages again: in a rolling-perplexity eval that was a third of the
    wall time, spent in the kernel. With mmap off (all of it from the heap) and the heap never trimmed, a
    freed buffer is reused as it is, at the cost of holding the process's peak heap (a few buffers of
    each large size, as alignment padding delays coalescing) until it exits. For a process whose
    working set is the same every step (eval); not for the block-by-block stages, whose freed blocks
    must go back to the OS (`return_freed_memory`). Leaves malloc alone where the environment already
    tunes it (GLIBC_TUNABLES glibc.malloc.*, MALLOC_*_), and off glibc.
    """
    if platform.libc_ver()[0] != "glibc" or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ):
        return False
    if (mallopt := glibc_function("mallopt")) is None:
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, -1)) and bool(mallopt(M_MMAP_MAX, 0))  # -1: never trim
