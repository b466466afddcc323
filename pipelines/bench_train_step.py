"""Benchmark: train-step time and peak memory of lrsurgery methods vs PEFT LoRA vs the frozen model.

All variants run the same model, batch, rank and target modules, with AdamW (fused, as `lrsurgery
train` uses it) over the trainable parameters. Variants:
  frozen     forward + backward through the frozen model, no adapter (the floor)
  peft-lora  PEFT's LoRA (needs `pip install peft`)
  <method>   any registered lrsurgery method (lora, pissa, ...)
  <method>@outside  the same with each frozen nn.Linear running its own product and the branch op adding
             into its output (AdaptedLinear.base_inside = False), to measure what running it inside gives
  <variant>+compile  any of these with each transformer block compiled, as `lrsurgery train --compile`
             runs it (the first steps compile: give --warmup 3 or more)
Peak memory is what training adds on top of the model with its adapters in place, over the timed steps
after the warmup: gradients, optimizer state (made by the warmup and still held) and activations (CUDA
max-allocated on a GPU; on CPU the peak RSS, VmHWM, over the RSS once the adapters are in and freed heap
pages are returned), each variant in its own process. Time is measured with every
variant built in one process, taking turns step by step (see `paired_times`), so a shared machine's
slow spells do not land on one variant only; ratios are medians of per-round ratios. Prints a table
with ratios to a baseline variant (`--baseline`, default peft-lora) and to the frozen model.
`--stats` gives TLoRA its calibration folder.

  python pipelines/bench_train_step.py --variants frozen,peft-lora,lora --batch-size 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lrsurgery.training.flat import FlatParameters
from lrsurgery.training.schedule import adamw


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def build(variant: str, args: argparse.Namespace):
    """Return (model, trainable parameters) for one variant; a `+compile` suffix compiles its blocks."""
    from lrsurgery.training.compiled import prepare_training_forward

    variant, _, compiled = variant.partition("+")
    model, params = _build(variant, args)
    prepare_training_forward(model, compiled == "compile", torch.device(args.device))
    return model, params


def _build(variant: str, args: argparse.Namespace):
    """(model, trainable parameters) of a variant without its `+compile` suffix."""
    from lrsurgery.hf.load import load_model, model_record
    from lrsurgery.hf.tree import backbone, find_targets
    from lrsurgery.layers.adapted import adapted_layers, freeze_model, inject
    from lrsurgery.methods import get_method

    loaded = load_model(args.model, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    model = loaded.model.to(args.device)
    targets = find_targets(model, args.targets)
    if variant == "frozen":
        freeze_model(model)
        model.enable_input_require_grads()  # backward through every layer, as with adapters
        return model, []
    if variant == "peft-lora":
        from peft import LoraConfig, get_peft_model

        leaf_names = sorted({t.rsplit(".", 1)[-1] for t in targets})
        config = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=leaf_names)
        model = get_peft_model(model, config)
        return model, [p for p in model.parameters() if p.requires_grad]
    name, _, where = variant.partition("@")
    options = {"rank": args.rank, **({"stats": args.stats} if args.stats and name == "tlora" else {})}
    method = get_method(name, **options)
    root = backbone(model)
    weights = {n: root.get_submodule(n).weight.detach().float().cpu() for n in targets}
    method.prepare({n: tuple(w.shape) for n, w in weights.items()}, model_record(loaded))
    gen = torch.Generator().manual_seed(0)
    adapters = {}
    for name, weight in weights.items():
        adapters.update(method.init_modules({name: weight}, gen))
    inject(model, adapters)
    if where == "outside":
        for layer in adapted_layers(model).values():
            layer.base_inside = False
    return model, [p for p in model.parameters() if p.requires_grad]


def random_batch(model, args: argparse.Namespace) -> torch.Tensor:
    """A fixed (batch, seq_len) batch of token ids."""
    gen = torch.Generator().manual_seed(1)
    return torch.randint(100, model.config.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(args.device)


def make_step(variant: str, args: argparse.Namespace):
    """Build one variant; return (step, trainable parameters), step() being one full training step."""
    torch.manual_seed(0)
    model, params = build(variant, args)
    model.train()
    ids = random_batch(model, args)
    mark_baseline(args.device, model)
    # lrsurgery's variants keep their parameters in flat buffers, as `lrsurgery train` does; PEFT as PEFT runs
    flat = FlatParameters(params) if params and not variant.startswith("peft-lora") else None
    optimizer = adamw(flat.flats if flat else params, lr=1e-4) if params else None

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss  # no key/value cache: prepare_training_forward
        loss.backward()
        if optimizer:
            optimizer.step()
            if flat:
                flat.zero_grad()
            else:
                optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    return step, params


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    step, params = make_step(variant, args)
    return {"variant": variant, **measure(step, args), "trainable": sum(p.numel() for p in params)}


def paired_times(make, variants: list[str], args: argparse.Namespace) -> dict[str, list[float]]:
    """Step times of every variant built side by side in one process by `make(variant, args)` (which
    returns (step, params)), taking turns step by step (the order reversed every other round), so that
    slow and fast spells of a shared machine fall on all variants alike: the ratios of one round's
    times are what the variants' speeds really differ by."""
    steps = {v: make(v, args)[0] for v in variants}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.rounds):
        for v in variants if i % 2 == 0 else variants[::-1]:
            began = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - began)
    return times


def paired_ratio(times: dict[str, list[float]], variant: str, baseline: str) -> float:
    """Median over rounds of the variant's step time over the baseline's in the same round."""
    return statistics.median(t / b for t, b in zip(times[variant], times[baseline], strict=True))


_BASELINE: dict[str, int] = {}


def mark_baseline(device: str, model: torch.nn.Module) -> None:
    """Take the memory in use now (the model with its adapters, before any step) as the zero of
    `measure`, and restart peak tracking; so the first step's gradients and optimizer state count.

    On CPU every weight is read first: transformers maps the safetensors file, so a weight that
    building the variant did not touch would otherwise be paged in, and counted, by the first step.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _BASELINE["bytes"] = torch.cuda.memory_allocated()
        return
    from lrsurgery.io.memory import return_freed_memory

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
    return_freed_memory()  # what building the variant freed is not the step's
    _reset_peak()
    _BASELINE["bytes"] = _rss_kib("VmRSS") * 1024


def measure(step, args: argparse.Namespace) -> dict:
    """Median time of `args.steps` calls of `step()` after `args.warmup` untimed ones, and the peak memory
    over the timed ones above `mark_baseline` (CUDA max-allocated, or on CPU peak RSS), as {"step_s",
    "peak_mb"}. `step()` synchronises a GPU itself."""
    if "bytes" not in _BASELINE:
        raise RuntimeError("call mark_baseline once the variant is built, before measure")
    for _ in range(args.warmup):
        step()
    cuda = args.device.startswith("cuda")
    # the peak of the steady steps: the gradients and optimizer state the warmup made are still in use
    # and count; what compiling a +compile variant took and gave back does not
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak()
    times = []
    for _ in range(args.steps):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    return {"step_s": statistics.median(times), "peak_mb": (peak - _BASELINE["bytes"]) / 2**20}


def run_children(script: str, variants: list[str], repeats: int) -> dict[str, dict]:
    """Run `script ARGV --child VARIANT` for each variant, `repeats` times interleaved, each in its own process;
    return per variant the median of each float field of the child's JSON (other fields from its first run)."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            runs[variant].append(run_child(script, variant, MEMORY_RUN_ENV))
    return {
        v: {k: statistics.median(r[k] for r in rs) if isinstance(x, float) else x for k, x in rs[0].items()}
        for v, rs in runs.items()
    }


# glibc serves every allocation of 64 KiB or more by mmap and unmaps it when freed (no dynamic threshold),
# so the process's peak RSS follows the peak of live tensors instead of what the heap happened to keep
MEMORY_RUN_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run_child(script: str, child: str, extra_env: dict[str, str] | None = None):
    """Run `script ARGV --child CHILD` in a fresh process; return the JSON it prints last."""
    env = {**os.environ, "LRSURGERY_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    cmd = [sys.executable, script, *sys.argv[1:], "--child", child]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{child} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default="frozen,peft-lora,lora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default=None, help="regex over module names (default: all block linears)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each memory run")
    parser.add_argument("--rounds", type=int, default=12, help="rounds of the paired timing (one step per variant)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, interleaved; medians reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--stats", default=None, help="stats folder for methods that need one (tlora)")
    parser.add_argument("--baseline", default="peft-lora", help="variant the time/memory ratios divide by")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = args.variants.split(",")
    if args.child == "paired":
        print(json.dumps(paired_times(make_step, variants, args)))
        return
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return
    rows = run_children(__file__, variants, args.repeats)  # peak memory, each variant alone in a process
    times = run_child(__file__, "paired")  # time: all variants in one process, taking turns step by step
    print(
        f"model {args.model}, batch {args.batch_size} x {args.seq_len}, rank {args.rank}, {args.device} {args.dtype}; "
        f"time: {args.rounds} rounds of one step per variant in turn (median step, median per-round ratio); "
        f"memory: median of {args.repeats} separate runs"
    )
    ref = rows.get(args.baseline)
    name = args.baseline.upper() if args.baseline == "lora" else "PEFT" if args.baseline == "peft-lora" else "base"
    floor = "frozen" if "frozen" in rows else None
    width = max(12, *(len(v) + 2 for v in rows))
    print(
        f"{'variant':<{width}}{'step s':>9}{'peak MB':>10}{'trainable':>11}{'time/' + name:>11}{'mem/' + name:>10}"
        f"{'time/frozen':>13}{'mem/frozen':>12}{'time/same-mode':>16}"
    )
    for v, r in rows.items():
        line = f"{v:<{width}}{statistics.median(times[v]):>9.3f}{r['peak_mb']:>10.1f}{r['trainable']:>11}"
        if ref:
            line += f"{paired_ratio(times, v, args.baseline):>11.3f}{r['peak_mb'] / ref['peak_mb']:>10.3f}"
        else:
            line += " " * 21
        if floor:
            line += f"{paired_ratio(times, v, floor):>13.3f}{r['peak_mb'] / rows[floor]['peak_mb']:>12.3f}"
        # a +compile variant against the baseline and the floor compiled the same way, where they ran
        same = [b + "+compile" for b in (args.baseline, "frozen")] if v.endswith("+compile") else []
        line += "".join(f"  {paired_ratio(times, v, b):.3f}/{b}" for b in same if b in times and b != v)
        print(line)


if __name__ == "__main__":
    main()
