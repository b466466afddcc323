"""`lrsurgery calibrate` and `merge-stats`: the commands that make stats artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lrsurgery.calibration.runner import CalibrateConfig
from lrsurgery.cli.common import (
    ConfigOption,
    ModelArgument,
    OverwriteOption,
    PresetOption,
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
    reuse: bool = typer.Option(
        False,
        "--reuse",
        help="Keep the stats artifact already at -o when it measured the same model, data and settings "
        "(fingerprints decide); refuse it otherwise.",
    ),
    config: Path = ConfigOption,
    preset: str = PresetOption,
    *,
    data: dict[str, Any],
    calibration: dict[str, Any],
) -> None:
    """Collect input-activation covariances and/or sensitivities of every target linear, block by block."""
    from lrsurgery.calibration.runner import keeps_existing, run_calibrate

    spec, cfg = DataSpec(**data), CalibrateConfig(**calibration)
    if keeps_existing(out, reuse, overwrite):  # kept as it is, or refused: nothing is written
        run_calibrate(model, spec, cfg, out, reuse=True)
        return
    with timed(out):
        run_calibrate(model, spec, cfg, out, resume=resume, overwrite=overwrite, reuse=reuse)


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
