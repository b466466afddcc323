"""Benchmark: train-step time and peak memory of the dual method vs LoRA at equal total rank.

Both variants run the same step as `lrsurgery train` (forward, method extra loss, backward, gradient
`add_gradients`, clipping, `after_backward`, fused AdamW, `after_step`) on the same model, batch and targets: each in
its own subprocess for peak memory, and side by side in one process, taking turns step by step, for
time (see bench_train_step.py). LoRA has rank r_share + r_expert and dropout p on the whole branch;
dual has the PiSSA shared module (rank r_share, no dropout) and the gated expert (rank r_expert,
dropout p). The dual steps run inside the screening phase [T1, T2), where importance is updated every
step and masks every ΔT steps, its most expensive phase; screening steps are among the timed ones.

  python pipelines/bench_dual.py --r-share 8 --r-expert 8 --batch-size 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from bench_train_step import mark_baseline, measure, paired_ratio, paired_times, random_batch, run_child, run_children

from lrsurgery.training.flat import FlatParameters
from lrsurgery.training.schedule import adamw


def build(variant: str, args: argparse.Namespace):
    """Return (model, trainable parameters, hooks not yet set up) for `lora` or `dual`."""
    from lrsurgery.hf.load import load_model
    from lrsurgery.hf.tree import backbone, find_targets
    from lrsurgery.layers.adapted import inject
    from lrsurgery.methods import TrainHooks, get_method

    model = load_model(args.model).model.to(args.device)
    targets = find_targets(model, args.targets)
    rank = args.r_share + args.r_expert
    if variant == "lora":
        method = get_method("lora", rank=rank, dropout=args.dropout)
    elif variant == "dual":
        method = get_method("dual", r_share=args.r_share, r_expert=args.r_expert, expert_dropout=args.dropout)
    else:
        raise SystemExit(f"unknown variant {variant!r}: lora or dual")
    root = backbone(model)
    gen = torch.Generator().manual_seed(0)
    inject(model, {n: method.init_module(n, root.get_submodule(n).weight.detach().float().cpu(), gen) for n in targets})
    hooks = method.hooks() if variant == "dual" else TrainHooks()
    return model, [p for p in model.parameters() if p.requires_grad], hooks


def make_step(variant: str, args: argparse.Namespace):
    """Build one variant; return (step, trainable parameters), step() being one `lrsurgery train` step."""
    from lrsurgery.methods import HookContext

    torch.manual_seed(0)
    model, params, hooks = build(variant, args)
    model.train()
    ids = random_batch(model, args)
    mark_baseline(args.device, model)
    flat = FlatParameters(params)  # as `lrsurgery train`: gradients (counted) in one buffer
    optimizer = adamw(flat.flats, lr=1e-4)
    ctx = HookContext(model, flat, optimizer, None, args.total)
    hooks.setup(ctx)  # the importance EMAs are training state: they count
    ctx.step = getattr(hooks, "lo", 0)  # dual: start at T1, inside the screening phase
    return hooked_step(model, ids, flat, optimizer, hooks, ctx, args.device), params


def hooked_step(model, ids, flat, optimizer, hooks, ctx, device: str):
    """One `lrsurgery train` step with every hook in its order, as a closure that advances `ctx.step`."""

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        extras = hooks.extra_loss(ctx)
        (loss + sum(extras.values())).backward()
        hooks.add_gradients(ctx)
        torch.nn.utils.clip_grad_norm_(flat.flats, 1.0)
        hooks.after_backward(ctx)
        optimizer.step()
        flat.zero_grad()
        hooks.after_step(ctx)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ctx.step += 1

    return step


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    step, params = make_step(variant, args)
    return {"variant": variant, **measure(step, args), "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--r-share", type=int, default=8)
    parser.add_argument("--r-expert", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout = dual expert dropout")
    parser.add_argument("--targets", default=None, help="regex over module names (default: all block linears)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--rounds", type=int, default=20, help="timed rounds of one step per variant (screening every ΔT = 10)"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each memory run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--total", type=int, default=1000, help="run length the dual schedule assumes")
    parser.add_argument("--repeats", type=int, default=2, help="memory runs per variant, interleaved; medians reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "paired":
        print(json.dumps(paired_times(make_step, ["lora", "dual"], args)))
        return
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return
    rows = run_children(__file__, ["lora", "dual"], args.repeats)
    times = run_child(__file__, "paired")
    print(
        f"model {args.model}, batch {args.batch_size} x {args.seq_len}, total rank {args.r_share + args.r_expert} "
        f"(dual {args.r_share}+{args.r_expert}), dropout {args.dropout}, {args.device}; time: {args.rounds} rounds "
        f"of one step per variant in turn; memory: median of {args.repeats} separate runs"
    )
    print(f"{'variant':<8}{'mean s':>9}{'median s':>10}{'peak MB':>10}{'trainable':>11}")
    for v, r in rows.items():
        mean, median = statistics.mean(times[v]), statistics.median(times[v])
        print(f"{v:<8}{mean:>9.3f}{median:>10.3f}{r['peak_mb']:>10.1f}{r['trainable']:>11}")
    mean_ratio = statistics.mean(times["dual"]) / statistics.mean(times["lora"])
    print(
        f"dual/LoRA: time {paired_ratio(times, 'dual', 'lora'):.3f} (median of per-round ratios), "
        f"{mean_ratio:.3f} (ratio of means, screening steps included); "
        f"peak memory {rows['dual']['peak_mb'] / rows['lora']['peak_mb']:.3f}"
    )


if __name__ == "__main__":
    main()
