"""The `lrsurgery` command line: the Typer app, `--config`, user errors as one line, a module per stage."""

from lrsurgery.cli import commands, stats  # noqa: F401  (each registers its commands on `app`)
from lrsurgery.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    """The console script: `lrsurgery COMMAND ...`."""
    app(prog_name="lrsurgery")
