"""Held-out loss of several training variants over seeds, as a Markdown table (and CSV with --csv).

Reads RUN_DIR/run-{variant}-{seed}/manifest.json (`extra.eval.loss`, written by `lrsurgery train
--eval-data`) and prints mean ± sample standard deviation per variant, with every seed's value."""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path


def held_out_losses(work: Path, variant: str, seeds: list[str]) -> list[float]:
    """The held-out loss of each seed's run of `variant`, in seed order."""
    return [
        json.loads((work / f"run-{variant}-{s}" / "manifest.json").read_text())["extra"]["eval"]["loss"] for s in seeds
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("work", type=Path)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--seeds", nargs="+", required=True)
    parser.add_argument("--csv", type=Path, help="Also write the table as CSV here.")
    args = parser.parse_args()
    rows = []
    for variant in args.variants:
        losses = held_out_losses(args.work, variant, args.seeds)
        std = statistics.stdev(losses) if len(losses) > 1 else 0.0
        rows.append((variant, statistics.mean(losses), std, losses))
    print("| variant | held-out loss (mean ± std) | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|---|" + "---|" * len(args.seeds))
    for variant, mean, std, losses in rows:
        print(f"| {variant} | {mean:.4f} ± {std:.4f} | " + " | ".join(f"{x:.4f}" for x in losses) + " |")
    if args.csv:
        with args.csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["variant", "mean", "std", *[f"seed_{s}" for s in args.seeds]])
            for variant, mean, std, losses in rows:
                writer.writerow([variant, f"{mean:.6f}", f"{std:.6f}", *[f"{x:.6f}" for x in losses]])
    sys.stdout.flush()


if __name__ == "__main__":
    main()
