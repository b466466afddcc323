"""Memory under a hard limit: each stage runs inside a cgroup (v1 memory controller; needs root) limited to a
fraction of the model's fp32 size, and must finish; prints each stage's exit status, the cgroup's peak charge
(page cache included, which the kernel reclaims before it kills), the peak of its anonymous memory (what
cannot be reclaimed: the margin under the limit), peak RSS and wall time.

"Only one block is resident" is a promise users plan hardware by; this checks it the way the kernel enforces
it (a stage over the limit is killed, exit 137). Default model: `synthetic_llama.py --shape qwen05-untied`
in fp32 (2.5 GB, of which 1.1 GB are the embedding and an untied head), in a limit of half of that.
`--shape` builds another of synthetic_llama.py's shapes (untied) instead.

  python pipelines/bench_memory_limit.py [--model DIR | --shape NAME] [--fraction 0.5] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup/memory")
HERE = Path(__file__).resolve().parent


def run_limited(command: list[str], limit: int, name: str) -> tuple[int, float, float, float, float]:
    """Run `command` in a new memory cgroup of `limit` bytes; return (exit status, the cgroup's peak charge
    MiB (what the kernel holds against the limit: the process's own memory and the page cache it reads,
    which the kernel reclaims before it kills), the peak of its anonymous memory MiB (the process's own,
    which cannot be reclaimed without swap; sampled every 20 ms), peak RSS MiB (which also counts shared
    libraries charged elsewhere), seconds)."""
    group = CGROUP / f"lrsurgery-{name}-{os.getpid()}"
    group.mkdir()
    anonymous = [0]
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit))  # no escape into swap
        began = time.perf_counter()
        child = subprocess.Popen(
            command, preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())), env=os.environ
        )
        done = threading.Event()
        watcher = threading.Thread(target=_watch_anonymous, args=(group, done, anonymous), daemon=True)
        watcher.start()
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - began
        done.set()
        watcher.join()
        code = os.waitstatus_to_exitcode(status)
        charged = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        return (128 - code if code < 0 else code), charged, anonymous[0] / 2**20, usage.ru_maxrss / 1024, seconds
    finally:
        group.rmdir()


def _watch_anonymous(group: Path, done: threading.Event, peak: list[int]) -> None:
    """Keep in peak[0] the largest `rss` (anonymous memory, huge pages included) of the cgroup's
    memory.stat until `done` is set."""
    while not done.is_set():
        try:
            stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
            peak[0] = max(peak[0], int(stat["rss"]))
        except (OSError, KeyError, ValueError):
            pass
        done.wait(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", type=Path, default=None, help="an HF folder (default: build the qwen05-untied shape)"
    )
    parser.add_argument("--shape", default="qwen05-untied", help="the synthetic_llama.py shape built without --model")
    parser.add_argument("--fraction", type=float, default=0.5, help="the limit as a fraction of the fp32 size")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    if not CGROUP.is_dir() or os.geteuid() != 0:
        sys.exit("needs root and cgroup v1's memory controller at /sys/fs/cgroup/memory")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_memory_limit_"))
    py = [sys.executable]
    model = args.model
    if model is None:
        model = work / "model"
        if not model.exists():
            build = [*py, str(HERE / "synthetic_llama.py"), str(model), "--shape", args.shape, "--dtype", "fp32"]
            build += ["--untied"]
            subprocess.run(build, check=True)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    size = index["metadata"]["total_size"]  # stored fp32: the model's fp32 size
    limit = int(args.fraction * size)
    lrs = [*py, "-m", "lrsurgery"]
    subprocess.run([*lrs, "assets", "bbc-news", "-o", str(work / "data"), "--overwrite"], check=True)
    data = str(work / "data" / "train.jsonl")
    stages = [
        (
            "calibrate",
            [
                *lrs,
                "calibrate",
                str(model),
                "--data",
                data,
                "--samples",
                str(args.samples),
                "--seq-len",
                str(args.seq_len),
                "--offload",
                "disk",
                "-o",
                str(work / "stats"),
                "--overwrite",
            ],
        ),
        (
            "init tlora",
            [
                *lrs,
                "init",
                str(model),
                "--method",
                "tlora",
                "--rank",
                "8",
                "--stats",
                str(work / "stats"),
                "-o",
                str(work / "tlora"),
                "--overwrite",
            ],
        ),
        (
            "init pissa",
            [*lrs, "init", str(model), "--method", "pissa", "--rank", "8", "-o", str(work / "pissa"), "--overwrite"],
        ),
    ]
    print(f"{model}: {size / 2**30:.2f} GiB in fp32; limit {limit / 2**30:.2f} GiB ({args.fraction:g} of it)")
    head = f"{'stage':12} {'exit':>5} {'cgroup peak GiB':>16} {'anonymous GiB':>14} {'anonymous/limit':>16}"
    print(f"{head} {'peak RSS GiB':>13} {'seconds':>8}")
    failed = 0
    for name, command in stages:
        code, charged, anonymous, rss, seconds = run_limited(command, limit, name.replace(" ", "-"))
        failed += code != 0
        line = f"{name:12} {code:5d} {charged / 1024:16.2f} {anonymous / 1024:14.2f} {anonymous * 2**20 / limit:16.2f}"
        print(f"{line} {rss / 1024:13.2f} {seconds:8.1f}", flush=True)
        if name == "calibrate" and code != 0:  # the next stage reads its statistics: make them without the limit
            print("  (calibrate failed under the limit; its statistics are made without it for the next stage)")
            subprocess.run(command, check=True, capture_output=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
