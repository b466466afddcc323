"""`lrsurgery compare`: every method of a comparison file side by side, with tables, figures and a report."""

from __future__ import annotations

from pathlib import Path

import typer

from lrsurgery.cli.common import OverwriteOption, app, out_option, timed, user_errors


@app.command()
@user_errors
def compare(
    config: Path = typer.Argument(..., help="Comparison file (YAML): see examples/compare/."),
    out: Path = out_option("results folder (an interrupted comparison continues there)"),
    seeds: str = typer.Option(None, "--seeds", help="Comma-separated seeds, replacing the file's (e.g. 0,1,2)."),
    quick: bool = typer.Option(False, "--quick", help="The file's `quick` size: a few steps, for a first look."),
    overwrite: bool = OverwriteOption,
) -> None:
    """Run every method of CONFIG on the same data, steps, schedule and seeds at an equal trainable budget;
    write results.json, table.md/.csv, figures and report.md into the results folder."""
    from lrsurgery.comparison.config import CompareError, read_comparison
    from lrsurgery.comparison.runner import run_compare

    chosen = None
    if seeds is not None:
        try:
            chosen = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError as exc:
            raise CompareError(f"--seeds takes comma-separated whole numbers, got {seeds!r}") from exc
    comparison = read_comparison(config, quick=quick, seeds=chosen)
    with timed(out):
        run_compare(comparison, out, overwrite=overwrite)
    typer.echo((out / "table.md").read_text())
