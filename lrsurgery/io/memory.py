"""Memory: how much this process may still take (to size work buffers to the machine, not to a constant),
and handing freed heap pages back to the OS."""

from __future__ import annotations

import ctypes
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
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
