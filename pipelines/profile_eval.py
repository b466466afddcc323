"""Profile: where `lrsurgery eval` and lm-evaluation-harness spend their time on the same task file.

For each task (the task files and command lines of `bench_lm_eval.py`), each tool runs twice as a fresh
process: once plain (whole-process wall time, as the benchmark times it) and once inside this script's
child mode, which starts torch's CPU profiler before the tool's own imports and runs the tool's command
line in-process. From the profile it prints, per tool:

  start-up   from the child's start to the first linear layer's product (imports, task and data
             loading, model load)
  GEMM       the self time of the matrix products (aten::mm, addmm, bmm, ...), their FLOPs (the
             profiler's count from the recorded shapes) and the rate they ran at
  attention  scaled-dot-product attention kernels
  softmax    (log-)softmax and logsumexp over the vocabulary
  other ops  every other torch operator (copies, element-wise, allocation, indexing)
  Python     the rest of the span from the first product to the last one: time outside torch's
             operators (tokenization, batching, the generation loop's logic)
  after      from the last product to the end (scores, writing results)

and the machine's GEMM rate on the model's own shapes, measured in the same run, so "GEMM at the
machine's peak" is a measured statement. The last line per task is the floor this says lrsurgery's
ratio cannot go under without doing fewer FLOPs: (lrsurgery's start-up + its products' FLOPs at the
machine's GEMM rate + its attention time) / lm-eval's plain wall time. (lm-eval's own GEMM time is no
floor: it includes the page faults of the fresh buffers its products write into.) The profiler adds
its own overhead per operator; the plain walls show how much. It also keeps every operator's record in
memory: a rolling-perplexity task of 40 documents outgrows 24 GiB in lm-eval's child, so profile it
with `--limit 10`.

  python pipelines/profile_eval.py --lm-eval-python /path/to/venv/bin/python [--tasks bbc_topic_gen,...]

Run it alone: both tools use every core.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkl_linear", "mkldnn::_linear_pointwise")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")
SOFTMAX = ("aten::_log_softmax", "aten::_softmax", "aten::logsumexp")
GROUP = {**dict.fromkeys(GEMM, "gemm"), **dict.fromkeys(ATTENTION, "attention"), **dict.fromkeys(SOFTMAX, "softmax")}
START_MARK = "profile_eval::start"


def child(out: Path, argv: list[str]) -> None:
    """Run one tool's command line (`lrsurgery ...` or `lm_eval ...`) under the profiler and write its
    summary (seconds per part, GEMM FLOPs) to `out` as JSON. Imports nothing from lrsurgery before the
    tool runs: it also runs in lm-eval's own Python."""
    began = time.perf_counter()
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        marked = time.perf_counter()
        with record_function(START_MARK):
            pass
        sys.argv = argv
        try:
            if argv[0] == "lrsurgery":
                from lrsurgery.cli import app

                app(prog_name="lrsurgery", args=argv[1:])
            else:
                from lm_eval.__main__ import cli_evaluate

                cli_evaluate()
        except SystemExit as done:
            if done.code not in (0, None):
                raise
        ended = time.perf_counter()
    events = prof.events()
    start = next(e.time_range.start for e in events if e.name == START_MARK)
    products = [e for e in events if e.name == "aten::linear"]
    first, last = min(e.time_range.start for e in products), max(e.time_range.end for e in products)
    main_thread = products[0].thread
    seconds = {"gemm": 0.0, "attention": 0.0, "softmax": 0.0, "other": 0.0}
    flops, by_name = 0, {}
    for e in events:
        if e.thread != main_thread or e.time_range.start < first or e.time_range.end > last:
            continue
        group = GROUP.get(e.name, "other")
        seconds[group] += e.self_cpu_time_total / 1e6
        by_name[e.name] = by_name.get(e.name, 0.0) + e.self_cpu_time_total / 1e6
        flops += e.flops if group == "gemm" else 0
    span = (last - first) / 1e6
    summary = {
        "threads": torch.get_num_threads(),
        "profiled": ended - began,
        "startup": marked - began + (first - start) / 1e6,
        **seconds,
        "python": span - sum(seconds.values()),
        "after": ended - marked - (last - start) / 1e6,
        "gemm_flops": flops,
        "top": sorted(by_name.items(), key=lambda kv: -kv[1])[:8],
    }
    out.write_text(json.dumps(summary))


def gemm_peak(hidden: int, intermediate: int, vocab: int, tokens: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of fp32 products of the model's own shapes ((tokens, hidden) by its projections' and LM
    head's weights), best of `repeats`."""
    import torch

    x = torch.randn(tokens, hidden)
    weights = [torch.randn(hidden, n) for n in (hidden, intermediate, vocab)]
    y = torch.randn(tokens, intermediate)
    down = torch.randn(intermediate, hidden)
    work = 2 * tokens * (hidden * (hidden + intermediate + vocab) + intermediate * hidden)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for w in weights:
            x @ w
        y @ down
        best = min(best, time.perf_counter() - began)
    return work / best / 1e9


PARTS = ("startup", "gemm", "attention", "softmax", "other", "python", "after")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(Path(sys.argv[2]), sys.argv[3:])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_lm_eval as bench
    from transformers import AutoConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser, "shakespeare_ppl,bbc_topic_gen")
    args = parser.parse_args()
    setup = bench.prepare(args)
    config = AutoConfig.from_pretrained(setup.model)
    peak = gemm_peak(config.hidden_size, config.intermediate_size, config.vocab_size)
    print(
        f"model {args.model}, CPU fp32, {args.limit} documents per task, batch {args.batch_size}; "
        f"GEMM rate on the model's shapes: {peak:.0f} GFLOP/s"
    )
    print(
        f"{'task':20}{'tool':11}{'plain s':>8}{'kernel':>7}{'profiled':>9}"
        + "".join(f"{p:>10}" for p in PARTS)
        + f"{'GFLOP/s':>9}"
    )
    for name in args.tasks.split(","):
        pair = bench.commands(name, setup, args)
        rows = {}
        for who, command in (("lm-eval", pair.lm_eval), ("lrsurgery", pair.lrsurgery)):
            plain = bench.timed(command, setup.env)
            out = setup.work / "profiles" / f"{pair.task}.{who}.json"
            out.parent.mkdir(exist_ok=True)
            tool = ["lm_eval"] if who == "lm-eval" else ["lrsurgery"]
            python = command[0]
            bench.timed([python, __file__, "--child", str(out), *tool, *command[3:]], setup.env)
            rows[who] = summary = {"plain": plain, **json.loads(out.read_text())}
            rate = summary["gemm_flops"] / max(summary["gemm"], 1e-9) / 1e9
            print(f"{pair.task:20}{who:11}{plain.seconds:>8.1f}{plain.kernel_s:>7.1f}{summary['profiled']:>9.1f}"
                  + "".join(f"{summary[p]:>10.1f}" for p in PARTS) + f"{rate:>9.0f}")  # fmt: skip
            print(f"{'':20}{'':11}{summary['gemm_flops'] / 1e12:.2f} TFLOP in products; slowest operators: "
                  + ", ".join(f"{n.removeprefix('aten::')} {t:.1f}" for n, t in summary["top"]))  # fmt: skip
        theirs, ours = rows["lm-eval"], rows["lrsurgery"]
        wall = theirs["plain"].seconds
        floor = (ours["startup"] + ours["gemm_flops"] / (peak * 1e9) + ours["attention"]) / wall
        print(
            f"{'':20}ratio {ours['plain'].seconds / wall:.3f} plain; floor (lrsurgery's start-up and attention, its "
            f"products at the machine's GEMM rate): {floor:.3f}; scores {bench.score_line(pair)}"
        )


if __name__ == "__main__":
    main()
