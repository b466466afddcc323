"""Benchmark: peak RSS of covariance calibration with `--offload disk` vs the whole model in RAM.

  python pipelines/bench_calibrate_rss.py [--model smollm2-135m] [--samples 32] [--seq-len 256]

Each path runs in a fresh process and reports its peak RSS (VmHWM) above the RSS after imports (the
libraries and the model's code, no weights). Beside
the disk path it prints the bound it should stay under: the largest block + everything outside the
blocks (embeddings, final norm, head) + activations (the block inputs of every sample held on CPU,
their outputs, and one micro-batch's working set inside a block) + one block's statistics. The two
artifacts are compared, so the figures are for the same, correct result. Both paths also hold the
tokenizer and the tokenized data, which the bound leaves out: a third process measures those alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_child(args: argparse.Namespace) -> None:
    """Calibrate once with args.child as the offload mode; print the added peak RSS in MB as JSON."""
    import datasets  # noqa: F401
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from lrsurgery.calibration.runner import CalibrateConfig, run_calibrate
    from lrsurgery.data.examples import DataSpec
    from lrsurgery.hf.load import default_task
    from lrsurgery.hf.resolve import resolve_model

    folder = resolve_model(args.model)
    cls = AutoModelForCausalLM if default_task(folder) == "causal" else AutoModel
    with torch.device("meta"):  # imports the model's code (no weights): part of the baseline, not of the run
        cls.from_config(AutoConfig.from_pretrained(folder))
    base = _status_kib("VmRSS")
    if args.child == "data":  # only what both paths hold besides the model: tokenizer and tokenized data
        from transformers import AutoTokenizer

        from lrsurgery.data.examples import build_examples

        build_examples(DataSpec(path=args.data, seq_len=args.seq_len), AutoTokenizer.from_pretrained(folder))
    else:
        cfg = CalibrateConfig(
            samples=args.samples,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            offload=args.child,
            collect=("covariance",),
        )
        run_calibrate(args.model, DataSpec(path=args.data), cfg, Path(args.out))
    print(json.dumps({"added_mb": (_status_kib("VmHWM") - base) * 1024 / MB}))


def bound_parts(args: argparse.Namespace, stats: Path) -> dict[str, float]:
    """The terms of the bound, in MB, from the model's config and parameter sizes (fp32 on the CPU)."""
    from lrsurgery.hf.offload import load_offloaded

    loaded, loader = load_offloaded(args.model)
    config = loaded.model.config
    outside = sum(p.numel() * 4 for p in loaded.model.parameters() if p.device.type != "meta")
    block = max(sum(p.numel() * 4 for p in b.parameters()) for b in loader.blocks)
    hidden, tokens = config.hidden_size, args.samples * args.seq_len
    width = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    micro = args.batch_size * args.seq_len
    working = 4 * (micro * (4 * hidden + 3 * width) + 2 * args.batch_size * heads * args.seq_len**2)
    statistics = (stats / "block_0000.safetensors").stat().st_size
    return {
        "largest block": block / MB,
        "outside the blocks": outside / MB,
        "activations": (2 * tokens * hidden * 4 + working) / MB,
        "one block's statistics": statistics / MB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--child", choices=["cpu", "disk", "data"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    from lrsurgery.data.assets import bbc_news
    from lrsurgery.hf.resolve import resolve_model
    from lrsurgery.io.artifacts import load_tensors

    resolve_model(args.model)  # materialise a named model once, outside the measured processes
    env = {**os.environ, "LRSURGERY_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        bbc_news(work / "bbc")
        rows = [json.loads(x) for x in (work / "bbc" / "train.jsonl").read_text().splitlines()[:400]]
        data = work / "text.jsonl"
        data.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
        added = {}
        for mode in ("data", "cpu", "disk"):
            cmd = [sys.executable, __file__, "--model", args.model, "--samples", str(args.samples)]
            cmd += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
            cmd += ["--child", mode, "--data", str(data), "--out", str(work / mode)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(done.stderr[-3000:])
            added[mode] = json.loads(done.stdout.strip().splitlines()[-1])["added_mb"]
        worst = 0.0
        for file in sorted((work / "cpu").glob("block_*.safetensors")):
            a, b = load_tensors(file), load_tensors(work / "disk" / file.name)
            worst = max(worst, *(float((a[k] - b[k]).norm() / a[k].norm()) for k in a))
        parts = bound_parts(args, work / "disk")
    bound = sum(parts.values())
    print(f"{args.model}: covariance calibration, {args.samples} x {args.seq_len} tokens, batch {args.batch_size}")
    print("peak RSS above the RSS after imports:")
    print(f"  whole model in RAM (--offload cpu)  {added['cpu']:8.1f} MB")
    print(f"  block by block (--offload disk)     {added['disk']:8.1f} MB   ({added['disk'] / added['cpu']:.2f}x)")
    print(f"  tokenizer and tokenized data alone  {added['data']:8.1f} MB")
    within = added["disk"] - added["data"]
    print(f"  disk path less tokenizer and data   {within:8.1f} MB   ({within / bound:.2f} of the bound)")
    print(f"  bound for the disk path             {bound:8.1f} MB")
    for name, value in parts.items():
        print(f"    {name:<24} {value:8.1f} MB")
    print(f"largest relative difference between the two artifacts' covariance sums: {worst:.2e}")


if __name__ == "__main__":
    main()
