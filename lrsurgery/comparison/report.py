"""What a comparison found, read back from its runs' own artifacts: `results.json`, a Markdown and a CSV
table, PNG figures (with matplotlib) and `report.md` embedding them.

Every number comes from a file a stage wrote: trainable parameters and peak memory from the train
manifest, the step time from its `metrics.jsonl` (median over the steps after the first), the training
and held-out losses from `metrics.jsonl` (`loss`, `eval_loss`), the init time from `timing.json` (the
init process's wall time), the score from `lrsurgery eval`'s results file."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

from lrsurgery.calibration.inspect import PNG_SOFTWARE, png_kind
from lrsurgery.comparison.config import Comparison
from lrsurgery.evaluation.runner import stderr_key
from lrsurgery.io.artifacts import read_manifest
from lrsurgery.io.outputs import output_file, write_text_atomic

FIGURES = {
    "loss.png": "Training loss (line: moving mean over seeds) and held-out loss (dots) of every method",
    "tlora_ranks.png": "TLoRA's rank allocation, layer × module",
    "srlora_intervals.png": "SRLoRA's recycled pairs: when each singular direction was trained (middle block)",
    "dual_experts.png": "Dual: active experts over the steps",
}


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _score(results: Path, metric: str) -> tuple[float, float | None]:
    """(value, standard error) of `metric` in an `lrsurgery eval` results file (its only model and task)."""
    report = json.loads(results.read_text())["results"]
    (tasks,) = report.values()
    (values,) = tasks.values()
    stderr = values.get(stderr_key(metric))
    return float(values[metric]), None if stderr is None else float(stderr)


def collect(comparison: Comparison, out: Path) -> dict[str, Any]:
    """Every run's record, and the base model's score: {setting, metric, base, runs: [...]}; written to
    `out/results.json`."""
    from lrsurgery.comparison.runner import run_folder

    metric = comparison.score["metric"]
    runs = []
    for label in comparison.methods:
        for seed in comparison.seeds:
            folder = run_folder(out, label, seed)
            train = folder / "train"
            extra = read_manifest(train, "train").extra
            rows = _metrics(train)
            value, stderr = _score(folder / "score.json", metric)
            times = [r["step_time"] for r in rows[1:]] or [rows[0]["step_time"]]
            runs.append(
                {
                    "method": label,
                    "kind": comparison.method_of(label),
                    "seed": seed,
                    "trainable_parameters": extra["trainable_parameters"],
                    "init_seconds": json.loads((folder / "timing.json").read_text()).get("init_seconds"),
                    "step_seconds": statistics.median(times),
                    "peak_memory_mb": extra.get("peak_memory_mb", {}),
                    "train_loss": [r["loss"] for r in rows],
                    "eval_loss": {str(r["step"]): r["eval_loss"] for r in rows if "eval_loss" in r},
                    "expert_active": [r["expert_active"] for r in rows if "expert_active" in r],
                    metric: value,
                    stderr_key(metric): stderr,
                }
            )
    base, base_stderr = _score(out / "base_score.json", metric) if (out / "base_score.json").is_file() else (None, None)
    results = {
        "setting": comparison.name,
        "description": comparison.description,
        "model": comparison.model,
        "metric": metric,
        "budget_rank": comparison.budget,
        "seeds": comparison.seeds,
        "base": {metric: base, stderr_key(metric): base_stderr},
        "runs": runs,
    }
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    return results


def _spread(values: list[float], stderr: float | None = None) -> str:
    """mean ± std across seeds, or ± the one run's standard error."""
    mean = statistics.mean(values)
    if len(values) > 1:
        return f"{mean:.4f} ± {statistics.stdev(values):.4f}"
    return f"{mean:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The summary table: one row per method (values across its seeds), header first."""
    metric = results["metric"]
    runs = results["runs"]
    steps = sorted({int(s) for r in runs for s in r["eval_loss"]})
    header = [
        "method",
        "trainable parameters",
        *[f"held-out loss @ {s}" for s in steps],
        f"{metric} ({'mean ± std over seeds' if len(results['seeds']) > 1 else '± stderr'})",
        "init s",
        "train step s",
        "peak RSS MiB",
    ]
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        losses = [_spread([r["eval_loss"][str(s)] for r in mine if str(s) in r["eval_loss"]]) for s in steps]
        rows.append(
            [
                method,
                str(mine[0]["trainable_parameters"]),
                *losses,
                _spread([r[metric] for r in mine], mine[0][stderr_key(metric)]),
                f"{statistics.mean(r['init_seconds'] or 0 for r in mine):.1f}",
                f"{statistics.mean(r['step_seconds'] for r in mine):.2f}",
                f"{max(r['peak_memory_mb'].get('rss', 0) for r in mine):.0f}",
            ]
        )
    return header, rows


def write_report(comparison: Comparison, out: Path, results: dict[str, Any]) -> list[str]:
    """Write table.md, table.csv, the figures matplotlib can draw and report.md; return the figure names
    drawn (none without matplotlib, which the report then says)."""
    header, rows = table_rows(results)
    metric = results["metric"]
    base = results["base"]
    markdown = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    markdown += "".join("| " + " | ".join(row) + " |\n" for row in rows)
    if base[metric] is None:
        base_line = "The base model is not scored: its classification head is the one each run trains.\n"
    else:
        base_line = f"Base model before training: {metric} {_spread([base[metric]], base[stderr_key(metric)])}.\n"
    write_text_atomic(out / "table.md", markdown + "\n" + base_line)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    write_text_atomic(out / "table.csv", buffer.getvalue())
    try:
        drawn = draw_figures(out, results)
        note = ""
    except ImportError:
        drawn = []
        note = "\nThe figures need matplotlib: `pip install 'lrsurgery[plot]'`, then run the comparison again.\n"
    sections = [
        f"# {comparison.name}\n",
        f"{comparison.description}\n" if comparison.description else "",
        f"Model `{comparison.model}`; every method at the trainable budget of LoRA rank {comparison.budget} "
        "(TLoRA trains B only, so its rank budget is LoRA's times Σ(d_in + d_out) / Σ d_out; dual splits the "
        "rank between its shared and expert modules, the gates adding r_expert per module); the same data "
        f"order, steps, schedule and seeds ({', '.join(map(str, comparison.seeds))}).\n",
        markdown,
        base_line,
        note,
        *[f"\n## {FIGURES[name]}\n\n![{name}]({name})\n" for name in drawn],
    ]
    write_text_atomic(out / "report.md", "\n".join(s for s in sections if s))
    return drawn


def _save(fig: Any, png: Path) -> None:
    import matplotlib.pyplot as plt

    with output_file(png, "figure", png_kind, [], overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": PNG_SOFTWARE})
    plt.close(fig)


def _shown(runs: list[dict[str, Any]], kind: str) -> str | None:
    """The entry whose method-specific figure is drawn: the one labelled `kind`, else the first of that kind."""
    labels = list(dict.fromkeys(r["method"] for r in runs if r.get("kind", r["method"]) == kind))
    return kind if kind in labels else (labels[0] if labels else None)


def draw_figures(out: Path, results: dict[str, Any]) -> list[str]:
    """Draw the figures the comparison's methods have (ImportError without matplotlib); return their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrsurgery.comparison.runner import run_folder

    runs, drawn = results["runs"], []
    methods = list(dict.fromkeys(r["method"] for r in runs))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, method in enumerate(methods):
        curves = [r["train_loss"] for r in runs if r["method"] == method]
        steps = min(map(len, curves))
        mean = [statistics.mean(c[t] for c in curves) for t in range(steps)]
        window = max(1, steps // 20)
        smooth = [statistics.mean(mean[max(0, t - window + 1) : t + 1]) for t in range(steps)]
        variant = any(r.get("kind", method) != method for r in runs if r["method"] == method)
        ax.plot(range(1, steps + 1), smooth, "--" if variant else "-", color=f"C{i}", label=method)
        held = [r["eval_loss"] for r in runs if r["method"] == method]
        points = sorted({int(s) for h in held for s in h})
        ax.plot(points, [statistics.mean(h[str(s)] for h in held if str(s) in h) for s in points], "o", color=f"C{i}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    plotted = [y for line in ax.get_lines() for y in line.get_ydata()]
    if min(plotted) > 0 and max(plotted) / min(plotted) > 5:  # a fall from the base's loss: see the end too
        ax.set_yscale("log")
    ax.set_title(f"{results['setting']}: training (line) and held-out (dots) loss")
    ax.legend()
    fig.tight_layout()
    _save(fig, out / "loss.png")
    drawn.append("loss.png")
    seed = results["seeds"][0]
    tlora, srlora, dual = (_shown(runs, kind) for kind in ("tlora", "srlora", "dual"))
    if tlora:
        ranks = read_manifest(run_folder(out, tlora, seed) / "init", "init").extra["method"]["ranks"]
        layers = sorted({int(p) for n in ranks for p in n.split(".") if p.isdigit()})
        kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in ranks))
        grid = [[0] * len(kinds) for _ in layers]
        for name, rank in ranks.items():
            layer = next(int(p) for p in name.split(".") if p.isdigit())
            grid[layers.index(layer)][kinds.index(name.rsplit(".", 1)[-1])] = rank
        fig, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2, 0.22 * len(layers) + 1.5))
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, label="rank r_i")
        ax.set_title(f"TLoRA rank allocation ({tlora})")
        fig.tight_layout()
        _save(fig, out / "tlora_ranks.png")
        drawn.append("tlora_ranks.png")
    if srlora:
        from lrsurgery.training.report import save_intervals_plot

        save_intervals_plot(run_folder(out, srlora, seed) / "train", out / "srlora_intervals.png", overwrite=True)
        drawn.append("srlora_intervals.png")
    screened = [r for r in runs if r["method"] == dual and r["expert_active"]]
    if screened:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for r in screened:
            ax.plot(range(1, len(r["expert_active"]) + 1), r["expert_active"], label=f"{dual}, seed {r['seed']}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("active experts (all modules)")
        ax.set_title("Dual: experts kept by the screening")
        ax.legend()
        fig.tight_layout()
        _save(fig, out / "dual_experts.png")
        drawn.append("dual_experts.png")
    return drawn
