"""Benchmark: how each stage's time and peak memory grow from SmolLM2's layer shape to Llama-2-7B's.

For each layer shape (`--shapes`, from pipelines/synthetic_llama.py) a Llama with random weights and an
untied head is written twice, with 1 layer and with L layers, L = 2 to 8 so that the L layers hold at
least 200M parameters (fp32, sharded safetensors, SmolLM2's tokenizer and 49,152-token vocabulary).
Every stage runs as its own process, as a user runs it, timed on the wall clock, its peak RSS read
from wait4:

  calibrate --offload disk (covariances and sensitivities, 16 sequences of 128 tokens)
  init --method tlora --stats, init --method pissa (rank 8 on all 7 projections)
  train a LoRA (rank 8, batch 2 x 128, 3 steps; the median of steps 2-3)
  fuse (streaming, into an HF folder)
  PEFT: get_peft_model with init_lora_weights="pissa", and load + merge_and_unload + save_pretrained
        of the LoRA's exact PEFT export (each in a process of its own, the model loaded whole)

The difference gives each stage's cost per layer, and the extrapolation to a 32-layer model is

  per layer = (T(L) − T(1)) / (L − 1),    T(32) = T(1) + 31 · per layer

For memory, a stage whose peak follows one block has peak(L) ≈ peak(1); one that holds the model grows
by L − 1 layers' fp32 size. Figures (with matplotlib): time per layer and peak RSS against parameters per
layer, log-log, with the fitted exponent b of time ∝ pᵇ per stage.

  python pipelines/bench_scaling.py [--shapes smollm2,qwen05,tinyllama,llama7b] [--work DIR] [--no-peft]
                                    [--memory-limit qwen05-untied]

`--memory-limit SHAPE` ends with pipelines/bench_memory_limit.py on a whole model of that shape: the
stages inside a memory cgroup of half its fp32 size, where "one block resident" must hold.

Run it alone: the stages use both cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_lm_eval import timed  # noqa: E402
from synthetic_llama import SHAPES  # noqa: E402

PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
STAGES = ["calibrate", "init tlora", "init pissa", "train step", "fuse", "peft pissa", "peft merge"]

PEFT_PISSA = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=sys.argv[2].split(","), init_lora_weights="pissa"))
"""
PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])
"""


def measured(command: list[str]) -> tuple[float, float]:
    """Run `command`; return (wall seconds, peak RSS MiB). A failure stops the benchmark with its stderr's end."""
    run = timed(command, dict(os.environ))
    return run.seconds, run.peak_gb * 1024


def layer_parameters(shape: dict) -> int:
    """Parameters of one Llama block's 7 projections (the norms are negligible)."""
    hidden, mlp = shape["hidden"], shape["mlp"]
    kv = shape["kv_heads"] * hidden // shape["heads"]
    return 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp


def run_size(name: str, layers: int, work: Path, data: Path, peft: bool) -> dict[str, tuple[float, float]]:
    """Every stage on the `name`-shaped model with `layers` layers; {stage: (seconds, peak RSS MiB)}."""
    folder = work / f"{name}-{layers}"
    model = folder / "model"
    if not (model / "config.json").exists():
        build = [sys.executable, str(HERE / "synthetic_llama.py"), str(model), "--shape", name, "--layers"]
        subprocess.run([*build, str(layers), "--untied", "--dtype", "fp32", "--overwrite"], check=True)
    lrs = [sys.executable, "-m", "lrsurgery"]
    out: dict[str, tuple[float, float]] = {}
    stats, run = folder / "stats", folder / "lora-run"
    calibrate = [*lrs, "calibrate", str(model), "--data", str(data), "--samples", "16", "--seq-len", "128"]
    out["calibrate"] = measured([*calibrate, "--offload", "disk", "-o", str(stats), "--overwrite"])
    tlora = [*lrs, "init", str(model), "--method", "tlora", "--rank", "8", "--stats", str(stats)]
    out["init tlora"] = measured([*tlora, "-o", str(folder / "tlora"), "--overwrite"])
    pissa = [*lrs, "init", str(model), "--method", "pissa", "--rank", "8", "-o", str(folder / "pissa")]
    out["init pissa"] = measured([*pissa, "--overwrite"])
    lora = [*lrs, "init", str(model), "--method", "lora", "--rank", "8", "-o", str(folder / "lora"), "--overwrite"]
    subprocess.run(lora, check=True, capture_output=True)
    train = [*lrs, "train", str(folder / "lora"), "--data", str(data), "--seq-len", "128", "--batch-size", "2"]
    seconds, rss = measured([*train, "--max-steps", "3", "--lr", "1e-4", "-o", str(run), "--overwrite"])
    steps = [json.loads(line)["step_time"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    out["train step"] = (statistics.median(steps[1:]), rss)
    out["fuse"] = measured([*lrs, "fuse", str(run), "-o", str(folder / "merged"), "--overwrite"])
    if peft:
        out["peft pissa"] = measured([sys.executable, "-c", PEFT_PISSA, str(model), PROJECTIONS])
        export = [*lrs, "fuse", str(run), "--format", "peft", "-o", str(folder / "peft"), "--overwrite"]
        subprocess.run(export, check=True, capture_output=True)
        merged = folder / "peft-merged"
        out["peft merge"] = measured([sys.executable, "-c", PEFT_MERGE, str(model), str(folder / "peft"), str(merged)])
        shutil.rmtree(merged)
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares exponent b of y ∝ x^b (NaN without two positive points)."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(points) < 2:
        return float("nan")
    mx, my = statistics.fmean(p[0] for p in points), statistics.fmean(p[1] for p in points)
    den = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / den if den else float("nan")


def deeper(shape: dict) -> int:
    """L, the second model's layer count: 2 to 8, enough for 200M parameters in its layers."""
    return max(2, min(8, math.ceil(200e6 / layer_parameters(shape))))


def report(results: dict, shapes: list[str], out: Path) -> None:
    """Print the tables and draw the log-log figures into `out`. `results[name]` holds "layers" (L) and
    "1" and "L": {stage: (seconds, peak RSS MiB)} of the 1- and L-layer models."""
    params = {name: layer_parameters(SHAPES[name]) for name in shapes}
    print("\nseconds per layer (T(L) - T(1)) / (L - 1), and T(32) = T(1) + 31 x per layer")
    heads = [f"{n}, {params[n] / 1e6:.0f}M/layer, L={results[n]['layers']}" for n in shapes]
    print(f"{'stage':12} " + " ".join(f"{h:>28}" for h in heads))
    per_layer: dict[str, list[float]] = {}
    for stage in STAGES:
        cells, row = [], []
        for name in shapes:
            one, many, layers = results[name]["1"].get(stage), results[name]["L"].get(stage), results[name]["layers"]
            if one is None or many is None:
                cells.append(f"{'-':>28}")
                row.append(float("nan"))
                continue
            delta = (many[0] - one[0]) / (layers - 1)
            row.append(delta)
            cells.append(f"{delta:12.2f} {one[0] + 31 * delta:15.1f}")
        per_layer[stage] = row
        print(f"{stage:12} " + " ".join(cells))
    print("\npeak RSS MiB of the 1- and L-layer models, and the growth against the L - 1 layers' fp32 size")
    for stage in STAGES:
        cells = []
        for name in shapes:
            one, many, layers = results[name]["1"].get(stage), results[name]["L"].get(stage), results[name]["layers"]
            if one is None or many is None:
                cells.append(f"{'-':>28}")
                continue
            grown = (many[1] - one[1]) / ((layers - 1) * params[name] * 4 / 2**20)
            cells.append(f"{one[1]:8.0f} {many[1]:8.0f} {grown:9.2f}x")
        print(f"{stage:12} " + " ".join(cells))
    xs = [params[n] for n in shapes]
    print("\nexponent b of seconds per layer ∝ (parameters per layer)^b, least squares over the shapes")
    for stage in STAGES:
        print(f"{stage:12} b = {slope(xs, per_layer[stage]):.2f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(figures need matplotlib: pip install 'lrsurgery[plot]')")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in STAGES:
        ys = per_layer[stage]
        if any(y > 0 for y in ys):
            left.loglog(xs, ys, "o-", label=f"{stage} (b={slope(xs, ys):.2f})")
        peaks = [results[n]["1"][stage][1] if stage in results[n]["1"] else float("nan") for n in shapes]
        if any(p > 0 for p in peaks):
            right.loglog(xs, peaks, "o-", label=stage)
    right.loglog(xs, [x * 4 / 2**20 for x in xs], "k--", label="one layer's fp32 size")
    left.set(xlabel="parameters per layer", ylabel="seconds per layer", title="time per layer")
    right.set(xlabel="parameters per layer", ylabel="peak RSS MiB (1-layer model)", title="peak memory")
    for axis in (left, right):
        axis.legend(fontsize=7)
        axis.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    print(f"figure: {out / 'scaling.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2,qwen05,tinyllama,llama7b")
    parser.add_argument("--work", type=Path, default=None, help="keeps the models between runs (default: a temp dir)")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's PiSSA init and merge")
    parser.add_argument(
        "--memory-limit",
        metavar="SHAPE",
        default=None,
        help="then run pipelines/bench_memory_limit.py on a whole model of this shape (e.g. qwen05-untied): "
        "calibrate and init inside a cgroup limit of half its fp32 size (root, cgroup v1)",
    )
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "train.jsonl").exists():
        subprocess.run([sys.executable, "-m", "lrsurgery", "assets", "bbc-news", "-o", str(data)], check=True)
    results: dict[str, dict[int, dict]] = {}
    for name in shapes:
        results[name] = {"layers": deeper(SHAPES[name])}
        for key, layers in (("1", 1), ("L", results[name]["layers"])):
            results[name][key] = run_size(name, layers, work, data / "train.jsonl", not args.no_peft)
            cells = ", ".join(f"{k} {s:.1f}s/{m:.0f}MiB" for k, (s, m) in results[name][key].items())
            print(f"{name} x{layers}: {cells}", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    report(results, shapes, work)
    if args.memory_limit:
        limited = [sys.executable, str(HERE / "bench_memory_limit.py"), "--shape", args.memory_limit]
        subprocess.run([*limited, "--work", str(work / f"limit-{args.memory_limit}")], check=False)


if __name__ == "__main__":
    main()
