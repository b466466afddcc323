"""Benchmark: train-step time and peak memory of lrsurgery methods vs PEFT LoRA vs the frozen model.

Each variant runs in its own subprocess (so peak memory is its own) on the same model, batch, rank
and target modules, with AdamW over the trainable parameters. Variants:
  frozen     forward + backward through the frozen model, no adapter (the floor)
  peft-lora  PEFT's LoRA (needs `pip install peft`)
  <method>   any registered lrsurgery method (lora, pissa, ...)
Peak memory is CUDA max-allocated on a GPU, and on CPU the rise in peak RSS (VmHWM, reset before the
timed steps) over the RSS before them. Prints a table with ratios to a baseline variant (`--baseline`,
default peft-lora) and to the frozen model. `--stats` gives TLoRA its calibration folder.

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


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def build(variant: str, args: argparse.Namespace):
    """Return (model, trainable parameters) for one variant."""
    from lrsurgery.adapters import freeze_model, inject
    from lrsurgery.methods import get_method
    from lrsurgery.models import backbone, find_targets, load_model
    from lrsurgery.surgery import model_record

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
    options = {"rank": args.rank, **({"stats": args.stats} if args.stats and variant == "tlora" else {})}
    method = get_method(variant, **options)
    root = backbone(model)
    weights = {n: root.get_submodule(n).weight.detach().float().cpu() for n in targets}
    method.prepare({n: tuple(w.shape) for n, w in weights.items()}, model_record(loaded))
    gen = torch.Generator().manual_seed(0)
    adapters = {}
    for name, weight in weights.items():
        adapters.update(method.init_modules({name: weight}, gen))
    inject(model, adapters)
    return model, [p for p in model.parameters() if p.requires_grad]


def random_batch(model, args: argparse.Namespace) -> torch.Tensor:
    """A fixed (batch, seq_len) batch of token ids."""
    gen = torch.Generator().manual_seed(1)
    return torch.randint(100, model.config.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(args.device)


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model, params = build(variant, args)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = random_batch(model, args)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return {"variant": variant, **measure(step, args), "trainable": sum(p.numel() for p in params)}


def measure(step, args: argparse.Namespace) -> dict:
    """Median time of `args.steps` calls of `step()` after `args.warmup` untimed ones, and the peak memory
    they add (CUDA max-allocated, or on CPU the peak-RSS rise), as {"step_s", "peak_mb"}."""
    for _ in range(args.warmup):
        step()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        before = _rss_kib("VmRSS") * 1024
    times = []
    for _ in range(args.steps):
        began = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    return {"step_s": statistics.median(times), "peak_mb": (peak - before) / 2**20}


def run_children(script: str, variants: list[str], repeats: int) -> dict[str, dict]:
    """Run `script ARGV --child VARIANT` for each variant, `repeats` times interleaved, each in its own process;
    return per variant the median of each float field of the child's JSON (other fields from its first run)."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    env = {**os.environ, "LRSURGERY_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    for _ in range(repeats):
        for variant in variants:
            cmd = [sys.executable, script, *sys.argv[1:], "--child", variant]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"variant {variant} failed:\n{out.stderr[-3000:]}")
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        v: {k: statistics.median(r[k] for r in rs) if isinstance(x, float) else x for k, x in rs[0].items()}
        for v, rs in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default="frozen,peft-lora,lora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default=None, help="regex over module names (default: all block linears)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, interleaved; medians reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--stats", default=None, help="stats folder for methods that need one (tlora)")
    parser.add_argument("--baseline", default="peft-lora", help="variant the time/memory ratios divide by")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return
    rows = run_children(__file__, args.variants.split(","), args.repeats)
    print(
        f"model {args.model}, batch {args.batch_size} x {args.seq_len}, rank {args.rank}, {args.device} "
        f"{args.dtype}, median of {args.repeats} runs x {args.steps} steps"
    )
    ref = rows.get(args.baseline)
    name = args.baseline.upper() if args.baseline == "lora" else "PEFT" if args.baseline == "peft-lora" else "base"
    floor = rows.get("frozen")
    print(
        f"{'variant':<12}{'step s':>9}{'peak MB':>10}{'trainable':>11}{'time/' + name:>11}{'mem/' + name:>10}"
        f"{'time/frozen':>13}{'mem/frozen':>12}"
    )
    for v, r in rows.items():
        line = f"{v:<12}{r['step_s']:>9.3f}{r['peak_mb']:>10.1f}{r['trainable']:>11}"
        line += f"{r['step_s'] / ref['step_s']:>11.3f}{r['peak_mb'] / ref['peak_mb']:>10.3f}" if ref else " " * 21
        if floor:
            line += f"{r['step_s'] / floor['step_s']:>13.3f}{r['peak_mb'] / floor['peak_mb']:>12.3f}"
        print(line)


if __name__ == "__main__":
    main()
