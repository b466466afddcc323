"""Benchmark: calibration vs plain passes over the same tokens.

Covariance calibration is compared with one no-grad forward pass, sensitivity calibration (whole-model
and sequential paths, per-sample gradients) with one forward+backward pass in micro-batches.

  python pipelines/bench_calibrate.py [--model smollm2-135m] [--samples 32] [--seq-len 256]

All use the same sequences; the plain forward is run first as warm-up and timed again after the
covariance calibration, and the faster of its two timings is the baseline.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--data", default=None, help="text JSONL (default: the BBC News articles)")
    args = parser.parse_args()

    from lrsurgery.calibration.runner import CalibrateConfig, run_calibrate
    from lrsurgery.data.assets import bbc_text
    from lrsurgery.data.examples import DataSpec, build_examples, collate
    from lrsurgery.hf.load import default_task, load_model
    from lrsurgery.hf.resolve import resolve_model

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data = args.data or bbc_text(work)
        spec = DataSpec(path=str(data), seq_len=args.seq_len)
        loaded = load_model(args.model, task=default_task(resolve_model(args.model)))
        examples = build_examples(spec, loaded.tokenizer).rows[: args.samples]
        batches = [
            collate(examples[i : i + args.batch_size], loaded.tokenizer.pad_token_id, "causal")
            for i in range(0, len(examples), args.batch_size)
        ]

        def plain_forward() -> float:
            began = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    loaded.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            return time.perf_counter() - began

        def forward_backward() -> float:
            for p in loaded.model.parameters():
                p.requires_grad_(True)
            began = time.perf_counter()
            for b in batches:
                loaded.model(**b, use_cache=False).loss.backward()
                loaded.model.zero_grad(set_to_none=True)
            for p in loaded.model.parameters():
                p.requires_grad_(False)
            return time.perf_counter() - began

        def timed_calibrate(name: str, **options) -> float:
            cfg = CalibrateConfig(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, **options)
            began = time.perf_counter()
            run_calibrate(args.model, spec, cfg, work / name)
            return time.perf_counter() - began

        first = plain_forward()
        covariance_s = timed_calibrate("cov", collect=("covariance",))
        forward_s = min(first, plain_forward())
        fwd_bwd_s = forward_backward()
        sensitivity_s = {
            p: timed_calibrate(f"sens-{p}", collect=("sensitivity",), sensitivity_path=p)
            for p in ("whole", "sequential")
        }
    tokens = args.samples * args.seq_len
    print(f"{args.model}: {args.samples} x {args.seq_len} tokens ({tokens}), batch {args.batch_size}, CPU fp32")
    print(f"plain no-grad forward            {forward_s:8.2f} s")
    print(
        f"calibrate covariance             {covariance_s:8.2f} s   {covariance_s / forward_s:.2f}x forward "
        "(target <= 1.5x)"
    )
    print(f"plain forward+backward           {fwd_bwd_s:8.2f} s")
    for path, seconds in sensitivity_s.items():
        print(
            f"calibrate sensitivity ({path:<10}) {seconds:6.2f} s   {seconds / fwd_bwd_s:.2f}x forward+backward "
            "(target <= 1.5x)"
        )


if __name__ == "__main__":
    main()
