"""Benchmark: training throughput with 1 process against N processes (data parallel, and FSDP-sharded) at the
same global batch, on the hardware at hand.

Each configuration is a real `lrsurgery train` run (torchrun for N processes), the same init artifact,
data, steps and global batch; throughput is the global batch's tokens over the median step time in the
run's metrics log (the first `--skip` steps, warm-up, left out), so start-up and loading are not counted.
On a CPU, N processes share its cores: they are given `--threads` threads each (default: the cores
divided among them), and 1 process gets them all. Prints one line per configuration with its ratio to
one process, and a peak-memory column (the main process's, from its manifest).

  python pipelines/bench_processes.py --model smollm2-135m --processes 2 --global-batch 8 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _run(command: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LRSURGERY_NO_PROGRESS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")


def _throughput(run: Path, tokens_per_step: int, skip: int) -> tuple[float, float]:
    """(tokens per second from the median step time after `skip` steps, peak memory MiB of the main process)."""
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    median = statistics.median(s["step_time"] for s in steps[skip:])
    peak = json.loads((run / "manifest.json").read_text())["extra"]["peak_memory_mb"]
    return tokens_per_step / median, float(peak.get("cuda", peak.get("rss", 0.0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the median")
    parser.add_argument("--threads", type=int, default=None, help="threads per process of N (CPU)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    n = args.processes
    if args.global_batch % n:
        sys.exit(f"--global-batch {args.global_batch} does not split over {n} processes")
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // n)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_processes_"))
    lrs = [sys.executable, "-m", "lrsurgery"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    _run([*lrs, "assets", "bbc-news", "-o", str(work / "data"), "--overwrite"], cores)
    init = work / "init"
    _run(
        [*lrs, "init", args.model, "--method", args.method, "--rank", str(args.rank), "-o", str(init), "--overwrite"],
        cores,
    )
    train = ["train", str(init), "--data", str(work / "data" / "train.jsonl"), "--max-steps", str(args.steps)]
    train += ["--seq-len", str(args.seq_len), "--lr", "1e-4", "--precision", args.precision, "--overwrite"]
    tokens = args.global_batch * args.seq_len
    configs = [
        ("1 process", [*lrs, *train, "--batch-size", str(args.global_batch)], cores),
        (
            f"{n} processes, data parallel",
            [*torchrun, "-m", "lrsurgery", *train, "--batch-size", str(args.global_batch // n)],
            threads,
        ),
        (
            f"{n} processes, --shard fsdp",
            [*torchrun, "-m", "lrsurgery", *train, "--batch-size", str(args.global_batch // n), "--shard", "fsdp"],
            threads,
        ),
    ]
    print(
        f"{args.model}, {args.method} rank {args.rank}, global batch {args.global_batch} x {args.seq_len} tokens, "
        f"{args.steps} steps ({args.skip} warm-up left out), {args.precision}, {cores} cores; "
        f"N processes get {threads} thread(s) each"
    )
    print(f"{'configuration':34} {'tokens/s':>10} {'vs 1 process':>13} {'peak MiB (main)':>16}")
    base = None
    for i, (name, command, n_threads) in enumerate(configs):
        run = work / f"run{i}"
        _run([*command, "-o", str(run)], n_threads)
        rate, peak = _throughput(run, tokens, args.skip)
        base = base or rate
        print(f"{name:34} {rate:10.1f} {rate / base:13.2f} {peak:16.0f}", flush=True)


if __name__ == "__main__":
    main()
