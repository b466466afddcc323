"""`lrsurgery assets`: the offline data packages as JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lrsurgery.cli.common import ConfigOption, OverwriteOption, app, out_option, user_errors
from lrsurgery.data.assets import DATASETS


@app.command()
@user_errors
def assets(
    name: str = typer.Argument(..., help=f"Offline data set to prepare: {', '.join(DATASETS)}."),
    out: Path = out_option("folder for train.jsonl and test.jsonl"),
    overwrite: bool = OverwriteOption,
    config: Path = ConfigOption,
) -> None:
    """Write an offline data package as JSONL files usable with --data."""
    from lrsurgery.data.assets import run_assets

    typer.echo(json.dumps(run_assets(name, out, overwrite)))
