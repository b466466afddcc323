"""`lrsurgery inspect`: what a stats artifact or a train run holds, as tables and a figure."""

from __future__ import annotations

from pathlib import Path

import typer

from lrsurgery.cli.common import ConfigOption, app, user_errors


@app.command()
@user_errors
def inspect(
    artifact: Path = typer.Argument(..., help="A stats artifact (`lrsurgery calibrate`) or a train run."),
    top: int = typer.Option(10, "--top", help="Stats: modules shown in the sensitivity ranking (0: all)."),
    plot: Path = typer.Option(
        None, "--plot", help="Also write a PNG: stats, sensitivity by block x module; an srlora run, active intervals."
    ),
    heatmap: Path = typer.Option(None, "--heatmap", help="Stats: the same as --plot (its older name)."),
    block: int = typer.Option(None, "--block", help="srlora run: the block drawn by --plot (default: the middle)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a PNG written by lrsurgery."),
    config: Path = ConfigOption,
) -> None:
    """Summarise an artifact. Stats: covariance trace, effective rank and condition; sensitivity ranking.
    Train run: method, steps, losses, and an srlora run's switches."""
    from lrsurgery.calibration.inspect import png_kind
    from lrsurgery.errors import OptionError, check_count
    from lrsurgery.io.artifacts import read_manifest
    from lrsurgery.io.outputs import check_output

    check_count("--top", top, 0)
    if block is not None:
        check_count("--block", block, 0)
    if plot and heatmap and plot != heatmap:
        raise OptionError("--heatmap is the old name of --plot: give one of them")
    png = plot or heatmap
    manifest = read_manifest(artifact, ("stats", "train"))
    if png:
        check_output(png, [artifact], overwrite, "figure", png_kind, what="file")
    if manifest.kind == "stats":
        _stats(artifact, manifest, top, png, overwrite)
        return
    from lrsurgery.training.report import run_summary, save_intervals_plot

    drawn = save_intervals_plot(artifact, png, block, overwrite) if png else None  # refused before any output
    for line in run_summary(artifact, manifest):
        typer.echo(line)
    if drawn:
        typer.echo(f"active intervals drawn in {drawn}")


def _stats(stats: Path, manifest, top: int, png: Path | None, overwrite: bool) -> None:
    from lrsurgery.calibration.inspect import save_heatmap, summarise
    from lrsurgery.calibration.stats_file import load_sensitivity

    if "covariance" in manifest.config["collect"]:
        typer.echo("| covariance | shared by | dim | trace | effective rank | condition |")
        typer.echo("|---|---|---|---|---|---|")
        for row in summarise(stats):
            shared = ", ".join(n.rsplit(".", 1)[-1] for n in row["shared_by"])
            typer.echo(
                f"| {row['covariance']} | {shared} | {row['dim']} | {row['trace']:.4g} | "
                f"{row['effective_rank']:.1f} | {row['condition']:.3g} |"
            )
    if "sensitivity" in manifest.extra:
        ranking = sorted(load_sensitivity(stats).items(), key=lambda kv: -kv[1])
        total = sum(v for _, v in ranking) or float("nan")  # all zero: no shares to show
        typer.echo("\n| rank | module | sensitivity | share |\n|---|---|---|---|")
        for i, (name, value) in enumerate(ranking[: top or None], start=1):
            typer.echo(f"| {i} | {name} | {value:.4g} | {value / total:.1%} |")
    if png:
        typer.echo(f"heatmap written to {save_heatmap(stats, png, overwrite)}")
