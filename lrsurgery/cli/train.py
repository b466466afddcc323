"""`lrsurgery train`: fine-tune an init artifact's adapters."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from lrsurgery.cli.common import (
    ConfigOption,
    ForceOption,
    OverwriteOption,
    ResumeOption,
    app,
    out_option,
    timed,
    user_errors,
)
from lrsurgery.cli.options import config_options, method_options, with_options
from lrsurgery.data.examples import DataSpec
from lrsurgery.training.schedule import TrainConfig


@app.command()
@user_errors
@with_options(
    data=config_options(DataSpec, panel="data"),
    train=config_options(TrainConfig, panel="training"),
    options=method_options("train"),
)
def train(
    init_dir: Path = typer.Argument(..., help="Init artifact folder (from `lrsurgery init`)."),
    eval_data: str = typer.Option(
        None, "--eval-data", help="Held-out data (same columns and templates): its loss is logged and recorded."
    ),
    eval_split: str = typer.Option("train", "--eval-split", help="Split of --eval-data."),
    resume: bool = ResumeOption,
    out: Path = out_option("train artifact folder"),
    overwrite: bool = OverwriteOption,
    force: bool = ForceOption,
    config: Path = ConfigOption,
    *,
    data: dict[str, Any],
    train: dict[str, Any],
    options: dict[str, Any],
) -> None:
    """Fine-tune an init artifact's adapters and write a train artifact (its method's options override init's)."""
    from lrsurgery.training.trainer import run_train

    spec = DataSpec(**data)
    held_out = replace(spec, path=eval_data, split=eval_split, limit=None) if eval_data else None
    with timed(out):
        run_train(
            init_dir,
            spec,
            TrainConfig(**train),
            out,
            resume=resume,
            overwrite=overwrite,
            force=force,
            eval_data=held_out,
            method_options=options,
        )
