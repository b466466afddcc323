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
    PresetOption,
    ResumeOption,
    app,
    from_preset,
    out_option,
    timed,
    user_errors,
)
from lrsurgery.cli.options import config_options, method_options, with_options
from lrsurgery.data.examples import DataSpec
from lrsurgery.errors import check_count
from lrsurgery.training.schedule import TrainConfig


@app.command()
@user_errors
@with_options(
    data=config_options(DataSpec, panel="data"),
    train=config_options(TrainConfig, panel="training"),
    options=method_options("train"),
)
def train(
    ctx: typer.Context,
    init_dir: Path = typer.Argument(..., help="Init artifact folder (from `lrsurgery init`)."),
    eval_data: str = typer.Option(
        None, "--eval-data", help="Held-out data (same columns and templates): its loss is logged and recorded."
    ),
    eval_split: str = typer.Option("train", "--eval-split", help="Split of --eval-data."),
    eval_limit: int = typer.Option(None, "--eval-limit", help="Use only the first N rows of --eval-data."),
    resume: bool = ResumeOption,
    out: Path = out_option("train artifact folder"),
    overwrite: bool = OverwriteOption,
    force: bool = ForceOption,
    config: Path = ConfigOption,
    preset: str = PresetOption,
    *,
    data: dict[str, Any],
    train: dict[str, Any],
    options: dict[str, Any],
) -> None:
    """Fine-tune an init artifact's adapters and write a train artifact (its method's options override init's)."""
    from lrsurgery.training.trainer import run_train

    spec = DataSpec(**data)
    _one_length(ctx, train)
    check_count("--eval-limit", eval_limit)
    held_out = replace(spec, path=eval_data, split=eval_split, limit=eval_limit) if eval_data else None
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
            preset=preset,
        )


def _one_length(ctx: typer.Context, train: dict[str, Any]) -> None:
    """A run's length is --max-steps or --epochs: the one given on the command line or in --config replaces
    the other when `--preset` set that other (a preset's `epochs: 1` gives way to `--max-steps 20`)."""
    for mine, other in (("epochs", "max_steps"), ("max_steps", "epochs")):
        if train.get(mine) is not None and train.get(other) is not None:
            if from_preset(ctx, mine) and not from_preset(ctx, other):
                train[mine] = None
