"""`lrsurgery presets`: the shipped presets of published hyperparameters, listed or printed."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from lrsurgery.cli.common import ConfigOption, app, fail, user_errors
from lrsurgery.presets import preset_names, preset_text


@app.command()
@user_errors
def presets(
    name: str = typer.Argument(None, help="A preset: print its file (default: list them all)."),
    config: Path = ConfigOption,
) -> None:
    """List the presets of published hyperparameters that calibrate, init and train take as --preset NAME,
    or print one preset's file."""
    if name is None:
        typer.echo("| name | source | description |\n|---|---|---|")
        for row in preset_rows():
            typer.echo(f"| {row['name']} | {row['source']} | {row['description']} |")
        return
    text = preset_text(name)
    if text is None:
        fail(f"unknown preset {name!r}; the presets are {', '.join(preset_names())}")
    typer.echo(text, nl=False)


def preset_rows() -> list[dict[str, str]]:
    """One {name, source, description} row per shipped preset, sorted by name."""
    rows = []
    for name in preset_names():
        data = yaml.safe_load(preset_text(name) or "") or {}
        rows.append(
            {"name": name, "source": str(data.get("source", "")), "description": str(data.get("description", ""))}
        )
    return rows
