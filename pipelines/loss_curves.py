"""Training-loss curves of several runs over the same steps: a table of the mean loss over each fifth of the
run (and the held-out loss, when the runs logged one) and a PNG of the curves (raw, and a moving average).

  python pipelines/loss_curves.py runs/srlora/smollm2/run-* --png smollm2-loss.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def moving_average(values: list[float], window: int) -> list[float]:
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--title", default="")
    parser.add_argument("--parts", type=int, default=5)
    args = parser.parse_args()
    curves = {run.name.removeprefix("run-"): losses(run) for run in args.runs}
    steps = min(len(c) for c in curves.values())
    bounds = [round(steps * k / args.parts) for k in range(args.parts + 1)]
    header = " | ".join(f"steps {a + 1}-{b}" for a, b in zip(bounds, bounds[1:], strict=False))
    print(f"{args.title}: mean training loss over each part of the run ({steps} steps)\n")
    print(f"| run | {header} | held-out loss |\n|---|" + "---|" * (args.parts + 1))
    for name, curve in curves.items():
        means = " | ".join(f"{statistics.mean(curve[a:b]):.4f}" for a, b in zip(bounds, bounds[1:], strict=False))
        manifest = json.loads((args.runs[list(curves).index(name)] / "manifest.json").read_text())
        held = manifest["extra"].get("eval", {}).get("loss")
        print(f"| {name} | {means} | {'' if held is None else f'{held:.4f}'} |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        window = max(1, steps // 20)
        for i, (name, curve) in enumerate(curves.items()):
            ax.plot(range(1, len(curve) + 1), curve, color=f"C{i}", alpha=0.2, linewidth=0.8)
            ax.plot(range(1, len(curve) + 1), moving_average(curve, window), color=f"C{i}", label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"training loss (faint: per step; line: mean of the last {window})")
        ax.set_title(args.title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"\ncurves drawn in {args.png}")


if __name__ == "__main__":
    main()
