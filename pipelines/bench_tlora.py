"""Benchmark: TLoRA init time vs PEFT's PiSSA init, then TLoRA vs LoRA train steps.

  python pipelines/bench_tlora.py [--model smollm2-135m] [--rank 8] [--samples 16] [--seq-len 128] [--device cuda]

1. Calibrates the model once on BBC News text (covariance + sensitivity; not timed).
2. Init time, each in a fresh process, including loading the model: `lrsurgery init --method tlora
   --stats` (allocation, W·C subspaces, writing the artifact) vs PEFT `get_peft_model` with
   `init_lora_weights="pissa"` (a full SVD of every target) on the same modules at the same rank.
   With `--device cuda` both compute on the GPU: PEFT's SVDs on the model moved there, TLoRA's
   `init --device cuda`; both clocks start after the CUDA context exists and stop after a sync.
3. Train-step time and peak memory of TLoRA vs LoRA at the same average rank (budget = rank x
   modules), via pipelines/bench_train_step.py with LoRA as the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _import_transformers() -> None:
    """Both timed children start with the same libraries imported: peft (which the PEFT child needs, and
    which brings in accelerate and transformers' model machinery) and transformers' auto classes, so
    neither timer counts imports the other does not."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: F401


def _start(device: str) -> float:
    """The clock after `device` is initialised (a CUDA context costs the same to both children)."""
    import torch

    if device != "cpu":
        torch.empty(1, device=device)
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _stop(device: str, began: float) -> float:
    import torch

    if device != "cpu":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def _child_peft_pissa(model: str, rank: int, device: str) -> float:
    from peft import LoraConfig, get_peft_model

    from lrsurgery.hf.load import load_model
    from lrsurgery.hf.tree import find_targets

    _import_transformers()
    began = _start(device)
    loaded = load_model(model)
    leaves = sorted({t.rsplit(".", 1)[-1] for t in find_targets(loaded.model)})
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=leaves, init_lora_weights="pissa")
    get_peft_model(loaded.model.to(device), config)  # PEFT's SVDs run where the weights are
    return _stop(device, began)


def _child_tlora(model: str, rank: int, device: str, stats: str, out: str) -> float:
    from lrsurgery.stages.init import run_init

    _import_transformers()
    began = _start(device)
    run_init(model, "tlora", Path(out), {"rank": rank, "alpha": 2 * rank, "stats": stats}, device=device)
    return _stop(device, began)


def _runs(seconds: list[float]) -> str:
    return ", ".join(f"{s:.2f}" for s in seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where both inits compute: cpu or cuda")
    parser.add_argument("--no-train-step", action="store_true", help="time the inits only")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "peft":
            seconds = _child_peft_pissa(args.model, args.rank, args.device)
        else:
            seconds = _child_tlora(args.model, args.rank, args.device, *rest)
        print(json.dumps({"seconds": seconds}))
        return

    from lrsurgery.calibration.runner import CalibrateConfig, run_calibrate
    from lrsurgery.data.assets import bbc_text
    from lrsurgery.data.examples import DataSpec

    env = {**os.environ, "LRSURGERY_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        text = bbc_text(work, limit=200)
        cfg = CalibrateConfig(
            samples=args.samples, seq_len=args.seq_len, collect=("covariance", "sensitivity"), device=args.device
        )
        stats = run_calibrate(args.model, DataSpec(path=str(text)), cfg, work / "stats")

        def timed(*child: str) -> float:
            cmd = [sys.executable, __file__, "--model", args.model, "--rank", str(args.rank), "--device", args.device]
            cmd += ["--child", *child]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(done.stderr[-3000:])
            return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]

        peft_s, tlora_s = [], []
        for i in range(args.repeats):
            peft_s.append(timed("peft"))
            tlora_s.append(timed("tlora", str(stats), str(work / f"init{i}")))
        peft_best, tlora_best = min(peft_s), min(tlora_s)
        print(
            f"{args.model}: init at rank {args.rank} on every block linear on {args.device}, best of {args.repeats}, "
            "model load included"
        )
        print(f"  PEFT init_lora_weights='pissa'       {peft_best:7.2f} s   (runs: {_runs(peft_s)})")
        print(
            f"  lrsurgery init --method tlora        {tlora_best:7.2f} s   ({tlora_best / peft_best:.2f}x PEFT PiSSA; "
            f"runs: {_runs(tlora_s)})"
        )
        if args.no_train_step:
            return
        print("train step, TLoRA vs LoRA at the same average rank:", flush=True)
        step = [sys.executable, str(HERE / "bench_train_step.py"), "--model", args.model, "--rank", str(args.rank)]
        step += ["--variants", "frozen,lora,tlora", "--baseline", "lora", "--stats", str(stats)]
        subprocess.run(step, check=True, env=env)


if __name__ == "__main__":
    main()
