"""`lrsurgery calibrate`, `merge-stats` and `inspect`: the commands that make and read stats artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lrsurgery.calibration.runner import CalibrateConfig
from lrsurgery.cli.common import (
    ConfigOption,
    ModelArgument,
    OverwriteOption,
    ResumeOption,
    app,
    out_option,
    timed,
    user_errors,
)
from lrsurgery.cli.options import config_options, with_options
from lrsurgery.data.examples import DataSpec

# what calibration reads of a data set: its rows (the sequence length is calibration's own)
DATA_OPTIONS = config_options(DataSpec, exclude=("task", "seq_len", "label_column", "limit"), panel="data")


@app.command()
@user_errors
@with_options(data=DATA_OPTIONS, calibration=config_options(CalibrateConfig, panel="calibration"))
def calibrate(
    model: str = ModelArgument,
    resume: bool = ResumeOption,
    out: Path = out_option("statistics folder"),
    overwrite: bool = OverwriteOption,
    config: Path = ConfigOption,
    *,
    data: dict[str, Any],
    calibration: dict[str, Any],
) -> None:
    """Collect input-activation covariances and/or sensitivities of every target linear, block by block."""
    from lrsurgery.calibration.runner import run_calibrate

    with timed(out):
        run_calibrate(model, DataSpec(**data), CalibrateConfig(**calibration), out, resume=resume, overwrite=overwrite)


@app.command("merge-stats")
@user_errors
def merge_stats_cmd(
    stats: list[Path] = typer.Argument(..., help="Two or more stats artifacts of the same model."),
    out: Path = out_option("statistics folder"),
    force: bool = typer.Option(False, "--force", help="Merge even if the model fingerprints differ."),
    overwrite: bool = OverwriteOption,
    config: Path = ConfigOption,
) -> None:
    """Add calibration statistics gathered on different data (sums and token counts add)."""
    from lrsurgery.calibration.stats_file import merge_stats

    with timed(out):
        merge_stats(stats, out, force=force, overwrite=overwrite)


@app.command()
@user_errors
def inspect(
    stats: Path = typer.Argument(..., help="A stats artifact (from `lrsurgery calibrate`)."),
    top: int = typer.Option(10, "--top", help="Modules shown in the sensitivity ranking (0: all)."),
    heatmap: Path = typer.Option(None, "--heatmap", help="Also write a PNG of sensitivity by block x module."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a heatmap PNG written by lrsurgery."),
    config: Path = ConfigOption,
) -> None:
    """Summarise a stats artifact: covariance trace, effective rank and condition; sensitivity ranking."""
    from lrsurgery.calibration.inspect import png_kind, save_heatmap, summarise
    from lrsurgery.calibration.stats_file import load_sensitivity
    from lrsurgery.errors import check_count
    from lrsurgery.io.artifacts import read_manifest
    from lrsurgery.io.outputs import check_output

    check_count("--top", top, 0)
    manifest = read_manifest(stats, "stats")
    if heatmap:
        check_output(heatmap, [stats], overwrite, "figure", png_kind, what="file")
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
    if heatmap:
        typer.echo(f"heatmap written to {save_heatmap(stats, heatmap, overwrite)}")
