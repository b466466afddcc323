"""What every `lrsurgery` command shares: the Typer app, `--config FILE` defaults, and user errors
turned into one red line.

Every command takes `--config FILE` (YAML or TOML); its keys are option names (dashes or
underscores) and act as defaults that flags on the command line override.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any

import typer
import yaml

from lrsurgery.artifacts import ArtifactError
from lrsurgery.assets import AssetError
from lrsurgery.data import DataError
from lrsurgery.methods import MethodError
from lrsurgery.models import ModelError

app = typer.Typer(
    help="Model surgery for transformers: calibrate → init → train → fuse → eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

USER_ERRORS: tuple[type[Exception], ...] = (  # CalibrationError is a ValueError
    ArtifactError,
    ModelError,
    DataError,
    MethodError,
    AssetError,
    ValueError,
    FileNotFoundError,
)


def load_config(ctx: typer.Context, value: Path | None) -> Path | None:
    if value is None:
        return value
    if not value.is_file():
        raise typer.BadParameter(f"config file {value} does not exist")
    text = value.read_text()
    if value.suffix == ".toml":
        import tomllib  # Python 3.11+

        data = tomllib.loads(text)
    else:
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise typer.BadParameter(f"config file {value} must hold a mapping of option names to values")
    ctx.default_map = {**(ctx.default_map or {}), **{k.replace("-", "_"): v for k, v in data.items()}}
    return value


ConfigOption = typer.Option(
    None,
    "--config",
    help="YAML/TOML file of option defaults; flags given on the command line win.",
    callback=load_config,
    is_eager=True,
    exists=False,
)


@contextlib.contextmanager
def timed(out: Path) -> Iterator[None]:
    began = time.perf_counter()
    yield
    typer.echo(f"wrote {out} in {time.perf_counter() - began:.1f}s")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can fix into one red line and exit code 1, not a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))

    return wrapper
