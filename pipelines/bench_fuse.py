"""Benchmark: lrsurgery's streaming fuse vs the PEFT path (load, apply adapter, merge_and_unload, save).

Both start from the same trained artifact: lrsurgery fuses it directly; the PEFT path loads the base
model, applies the artifact's exact PEFT export with `PeftModel.from_pretrained`, merges and calls
`save_pretrained`. Each runs in its own subprocess; wall time and peak RSS (VmHWM) are measured inside
it, along with the RSS after imports, so the table shows both totals and the part the work added.

  python pipelines/bench_fuse.py [--model smollm2-135m] [--rank 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(variant: str, artifact: Path, peft_dir: Path, out: Path) -> dict:
    import torch  # noqa: F401  (imports count in the baseline, not in the work)
    import transformers  # noqa: F401

    from lrsurgery.stages.fuse import run_fuse

    baseline = _kib("VmRSS")
    began = time.perf_counter()
    if variant == "lrsurgery":
        run_fuse(artifact, out)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lrsurgery.io.artifacts import read_manifest

        folder = read_manifest(artifact).model["folder"]
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, peft_dir).merge_and_unload()
        merged.save_pretrained(out)
        AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return {"seconds": time.perf_counter() - began, "peak_mb": _kib("VmHWM") / 1024, "baseline_mb": baseline / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, artifact, peft_dir, out = args.child
        print(json.dumps(child(variant, Path(artifact), Path(peft_dir), Path(out))))
        return
    from lrsurgery.stages.export_peft import run_export_peft
    from lrsurgery.stages.init import run_init

    env = {**os.environ, "LRSURGERY_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        artifact = run_init(args.model, "pissa", work / "init", {"rank": args.rank})
        run_export_peft(artifact, work / "peft")
        runs: dict[str, list[dict]] = {"peft": [], "lrsurgery": []}
        for i in range(args.repeats):
            for variant in runs:
                out = work / f"{variant}-{i}"
                cmd = [sys.executable, __file__, "--child", variant, str(artifact), str(work / "peft"), str(out)]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
                runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    ref = rows["peft"]
    print(f"fuse of {args.model}, PiSSA rank {args.rank}, fp32 output, median of {args.repeats} runs")
    print(
        f"{'path':<11}{'seconds':>9}{'peak RSS MB':>13}{'added MB':>10}{'time/PEFT':>11}{'peak/PEFT':>11}"
        f"{'added/PEFT':>12}"
    )
    for name, r in rows.items():
        added = r["peak_mb"] - r["baseline_mb"]
        ref_added = ref["peak_mb"] - ref["baseline_mb"]
        print(
            f"{name:<11}{r['seconds']:>9.2f}{r['peak_mb']:>13.0f}{added:>10.0f}{r['seconds'] / ref['seconds']:>11.3f}"
            f"{r['peak_mb'] / ref['peak_mb']:>11.3f}{added / ref_added:>12.3f}"
        )


if __name__ == "__main__":
    main()
