"""The `lrsurgery` command line: the Typer app, `--config`, user errors as one line, a module per stage;
each stage's flags are generated from its config dataclasses and its methods' options (cli/options.py)."""

# each module registers its command, in the order `lrsurgery --help` lists them
from lrsurgery.cli import calibrate, init, train, fuse, eval, compare, inspect, assets, presets  # noqa: F401, I001
from lrsurgery.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    """The console script: `lrsurgery COMMAND ...`."""
    app(prog_name="lrsurgery")
