"""Benchmark: SRLoRA's train step against PiSSA's at equal rank: time between switches, the cost of one
switch, the amortised step time, and peak memory.

Both variants are built from init artifacts (SRLoRA reads its reserve of singular directions from its own, as
`lrsurgery train` does) and run the step of `lrsurgery train` with every hook (bench_dual.hooked_step):
forward, backward, clipping, `after_backward` (SRLoRA's importance EMAs), fused AdamW, `after_step`. Time:
both variants side by side in one process, taking turns step by step (bench_train_step.paired_times); ratios
are medians of per-round ratios. Switch cost: every switch of a run (r_target − r reserve directions, r′ per
switch), each timed alone. Amortised: (interval · step + switch) / (interval · PiSSA step), with the interval
Eq. 14 gives for `--total` steps. Memory: peak above the model with its adapters in place
(bench_train_step.mark_baseline), each variant alone in a process over `--steps` steps, a switch among them
for SRLoRA.

  python pipelines/bench_srlora.py --rank 8 --r-target 32 --batch-size 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_dual import hooked_step
from bench_train_step import mark_baseline, measure, paired_ratio, paired_times, random_batch, run_child, run_children

from lrsurgery.training.edit_log import EditFiles
from lrsurgery.training.flat import FlatParameters
from lrsurgery.training.schedule import adamw

VARIANTS = ["pissa", "srlora"]


def make_init(args: argparse.Namespace) -> None:
    """Write the two init artifacts under `args.work` (randomized SVD: the init's cost is not measured)."""
    from lrsurgery.stages.init import run_init

    options = {"rank": args.rank, "svd": "randomized"}
    run_init(args.model, "pissa", Path(args.work) / "pissa", options, targets=args.targets)
    run_init(
        args.model, "srlora", Path(args.work) / "srlora", {**options, "r_target": args.r_target}, targets=args.targets
    )


def make_step(variant: str, args: argparse.Namespace, switch_first: bool = False):
    """Build one variant from its init artifact; return (step, trainable parameters, hooks, context).
    `switch_first`: SRLoRA's first step is a switch step."""
    from lrsurgery.methods import HookContext, get_method
    from lrsurgery.stages.adapted import load_adapted

    torch.manual_seed(0)
    artifact = Path(args.work) / variant
    loaded, manifest = load_adapted(artifact)
    model = loaded.model.to(args.device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = random_batch(model, args)
    mark_baseline(args.device, model)
    flat = FlatParameters(params)
    optimizer = adamw(flat.flats, lr=1e-4)
    method = get_method(manifest.config["method"], **manifest.config["options"])
    ctx = HookContext(model, flat, optimizer, None, args.total, artifact=artifact)
    edits = EditFiles(Path(tempfile.mkdtemp(dir=args.work)), ctx.layers())
    ctx.on_edit = edits.spill  # as `lrsurgery train` keeps the edit log: on disk
    hooks = method.hooks()
    hooks.setup(ctx)  # SRLoRA's importance EMAs are training state: they count
    every = getattr(hooks, "every", 0)
    ctx.step = every - 1 if switch_first else (every // 2 if every else 0)  # between switches unless asked
    return hooked_step(model, ids, flat, optimizer, hooks, ctx, args.device), params, hooks, ctx


def switch_times(args: argparse.Namespace) -> dict:
    """Seconds of each switch of a run (after one ordinary step, so the optimizer state exists)."""
    step, _, hooks, ctx = make_step("srlora", args)
    step()
    times = []
    for k in range(1, hooks.cfg.switches + 1):
        if k * hooks.every >= hooks.total:  # the run skips a switch on its last step
            break
        ctx.step = k * hooks.every - 1
        began = time.perf_counter()
        logged = hooks.after_step(ctx)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
        assert "srlora_switch" in logged, logged
    return {"switch_s": times, "interval": hooks.every, "recycled": hooks.cfg.recycled}


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    step, params, _, _ = make_step(variant, args, switch_first=True)
    return {"variant": variant, **measure(step, args), "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--r-target", type=int, default=32)
    parser.add_argument("--targets", default=None, help="regex over module names (default: all block linears)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds of one step per variant")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each memory run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--total", type=int, default=1000, help="run length the switch schedule assumes")
    parser.add_argument("--repeats", type=int, default=2, help="memory runs per variant, interleaved; medians reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "paired":
        print(json.dumps(paired_times(lambda v, a: make_step(v, a)[:2], VARIANTS, args)))
        return
    if args.child == "switch":
        print(json.dumps(switch_times(args)))
        return
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        make_init(args)
        sys.argv += ["--work", work]  # the children read the same artifacts
        rows = run_children(__file__, VARIANTS, args.repeats)
        times = run_child(__file__, "paired")
        switches = run_child(__file__, "switch")
    pissa, srlora = (statistics.median(times[v]) for v in VARIANTS)
    ratio = paired_ratio(times, "srlora", "pissa")
    switch = statistics.median(switches["switch_s"])
    every = switches["interval"]
    amortised = (every * ratio * pissa + switch) / (every * pissa)
    print(
        f"model {args.model}, batch {args.batch_size} x {args.seq_len}, rank {args.rank}, r_target {args.r_target}, "
        f"{args.device}; time: {args.rounds} rounds of one step per variant in turn; memory: median of "
        f"{args.repeats} separate runs of {args.steps} steps (SRLoRA's first a switch)"
    )
    print(f"{'variant':<8}{'step s':>9}{'peak MB':>10}{'trainable':>11}")
    for v in VARIANTS:
        print(f"{v:<8}{statistics.median(times[v]):>9.3f}{rows[v]['peak_mb']:>10.1f}{rows[v]['trainable']:>11}")
    print(
        f"switch: {switches['recycled']} pairs per module, median {switch:.3f} s over {len(switches['switch_s'])} "
        f"switches ({', '.join(f'{t:.3f}' for t in switches['switch_s'])}), every {every} steps of a "
        f"{args.total}-step run"
    )
    print(
        f"SRLoRA/PiSSA: step time {ratio:.3f} between switches, {amortised:.3f} amortised with the switches; "
        f"peak memory {rows['srlora']['peak_mb'] / rows['pissa']['peak_mb']:.3f}"
    )


if __name__ == "__main__":
    main()
