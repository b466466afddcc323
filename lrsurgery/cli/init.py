"""`lrsurgery init`: cut adapters out of a model's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lrsurgery.cli.common import (
    ConfigOption,
    ForceOption,
    ModelArgument,
    OverwriteOption,
    PresetOption,
    app,
    check_preset_method,
    out_option,
    timed,
    user_errors,
)
from lrsurgery.cli.options import method_options, with_options
from lrsurgery.methods import method_names


@app.command()
@user_errors
@with_options(options=method_options("init"))
def init(
    model: str = ModelArgument,
    method: str = typer.Option(
        "lora",
        "--method",
        help=f"Initialisation method: {', '.join(method_names())}.",
        callback=check_preset_method,
    ),
    targets: str = typer.Option(
        None, "--targets", help="Regex over module names to adapt (default: every nn.Linear in the blocks)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of random initialisations."),
    device: str = typer.Option(
        "cpu", "--device", help="Where the SVDs and TLoRA's W·C products run: cpu, cuda or cuda:N."
    ),
    force: bool = ForceOption,
    out: Path = out_option("init artifact folder"),
    overwrite: bool = OverwriteOption,
    config: Path = ConfigOption,
    preset: str = PresetOption,
    *,
    options: dict[str, Any],
) -> None:
    """Cut adapters out of a model's weights and write an init artifact (each method takes its options)."""
    from lrsurgery.stages.init import run_init

    with timed(out):
        run_init(
            model,
            method,
            out,
            options,
            targets=targets,
            seed=seed,
            overwrite=overwrite,
            force=force,
            device=device,
            preset=preset,
        )
