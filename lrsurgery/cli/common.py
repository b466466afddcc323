"""What every `lrsurgery` command shares: the Typer app, `--config FILE` and `--preset NAME` defaults,
and user errors turned into one red line.

Every command takes `--config FILE` (YAML or TOML); its keys are option names (dashes or
underscores) and act as defaults that flags on the command line override. `calibrate`, `init` and
`train` also take `--preset NAME`, a shipped file of a paper's settings (lrsurgery/presets/), whose
section for the command acts as defaults under those of `--config`."""

from __future__ import annotations

import contextlib
import difflib
import errno
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn

import typer
import yaml
from typer.core import TyperGroup

from lrsurgery.errors import UserError
from lrsurgery.presets import STAGES, preset_names, preset_text

# click's exception classes, wherever this typer takes click from (recent versions carry their own copy)
CLICK_ERRORS = sys.modules[typer.BadParameter.__module__]


ClickException: type[Exception] = CLICK_ERRORS.ClickException


NoArgsIsHelp: type[Exception] = getattr(CLICK_ERRORS, "NoArgsIsHelpError", ())  # click ≥ 8.2


class OneLineErrors(TyperGroup):
    """The command group, with click's usage errors (an unknown flag, a value of the wrong type, an
    unreadable path) shown as one red line, as lrsurgery's own user errors are, instead of a usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelp as exc:
            exc.show()  # `lrsurgery` alone prints the help
            sys.exit(exc.exit_code)
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.secho(f"error: {' '.join(exc.format_message().split())}{hint}", fg=typer.colors.RED, err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.secho("error: aborted", fg=typer.colors.RED, err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="Model surgery for transformers: calibrate → init → train → fuse → eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def load_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """Read `--config FILE` into the command's defaults; return `value`. Its keys are the option names as on
    the command line (`format` or `--format` for `--format`, `max_steps` or `max-steps` for `--max-steps`,
    `model` for an argument); an unknown key, or a value the option cannot take, is refused naming the file."""
    if value is None:
        return value
    _set_defaults(ctx, "config", option_defaults(ctx, read_config(value), f"--config {value}"))
    return value


def load_preset(ctx: typer.Context, value: str | None) -> str | None:
    """Read this command's section of `--preset NAME` (lrsurgery/presets/NAME.yaml) into its defaults, under
    those of `--config` whatever their order on the command line; return `value`. Its keys are checked as
    a `--config` file's are."""
    if value is None:
        return value
    text = preset_text(value)
    if text is None:
        fail(f"unknown preset {value!r}; the presets are {', '.join(preset_names())} (`lrsurgery presets` lists them)")
    data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    stage = ctx.command.name
    section = data.get(stage)
    if not section:
        sets = [s for s in STAGES if data.get(s)]
        fail(
            f"preset {value} sets nothing for `lrsurgery {stage}`; run it without --preset "
            f"(the preset is for {', '.join(f'`lrsurgery {s}`' for s in sets)})"
        )
    defaults = option_defaults(ctx, section, f"--preset {value}")
    ctx.meta[_PRESET] = value
    _set_defaults(ctx, "preset", defaults)
    return value


def check_preset_method(ctx: typer.Context, value: str | None) -> str | None:
    """`--method` checked against the one `--preset` sets (its options are for that method); return `value`."""
    name = ctx.meta.get(_PRESET)
    wanted = ctx.meta.get(_LAYERS, {}).get("preset", {}).get("method")
    if name is None or wanted is None or value == wanted:
        return value
    source = ctx.get_parameter_source("method")
    given = (
        f"--method {value}" if source is not None and source.name == "COMMANDLINE" else f"method: {value} in --config"
    )
    fail(f"--preset {name} is for --method {wanted}; drop {given}, or choose another preset (`lrsurgery presets`)")


def from_preset(ctx: typer.Context, name: str) -> bool:
    """Whether the value of parameter `name` came from `--preset` (neither the command line nor `--config`)."""
    layers = ctx.meta.get(_LAYERS, {})
    source = ctx.get_parameter_source(name)
    given = source is not None and source.name != "DEFAULT_MAP"
    return not given and name in layers.get("preset", {}) and name not in layers.get("config", {})


_PRESET = "lrsurgery.preset"  # ctx.meta: the --preset name
_LAYERS = "lrsurgery.defaults"  # ctx.meta: the defaults each of --preset and --config set


def _set_defaults(ctx: typer.Context, layer: str, defaults: dict[str, Any]) -> None:
    """Put `defaults` (from "preset" or "config") into the command's default map, `--config`'s over
    `--preset`'s, whichever of the two callbacks runs first."""
    layers = ctx.meta.setdefault(_LAYERS, {"base": dict(ctx.default_map or {})})
    layers[layer] = defaults
    ctx.default_map = {**layers["base"], **layers.get("preset", {}), **layers.get("config", {})}


def option_defaults(ctx: typer.Context, data: dict[Any, Any], origin: str) -> dict[str, Any]:
    """The {parameter name: value} defaults that the mapping `data` of option names (as on the command line,
    dashes or underscores, `model` for an argument) sets for the command of `ctx`. An unknown key, or a value
    its option cannot take, fails naming `origin` (`--config FILE`, `--preset NAME`)."""
    names: dict[str, Any] = {}  # every spelling a key may use → the parameter
    for param in ctx.command.params:
        if param.name and param.name not in ("config", "preset"):
            names[param.name] = param
            for flag in getattr(param, "opts", []):
                if flag.startswith("--"):
                    names[flag[2:].replace("-", "_")] = param
    defaults: dict[str, Any] = {}
    for key, setting in data.items():
        param = names.get(str(key).lstrip("-").replace("-", "_"))
        if param is None:
            close = difflib.get_close_matches(str(key).lstrip("-").replace("-", "_"), list(names), n=1)
            hint = f"; did you mean {_spelling(names[close[0]])}?" if close else ""
            fail(f"{origin}: unknown option {key!r}{hint}")
        defaults[param.name] = _config_value(origin, key, setting, param, ctx)
    return defaults


def _config_value(origin: str, key: Any, setting: Any, param: Any, ctx: typer.Context) -> Any:
    """`setting` checked against what the option takes (one value or a list, its type); fail naming `origin`."""
    single = not getattr(param, "multiple", False) and param.nargs == 1
    if isinstance(setting, dict) or (single and isinstance(setting, list)):
        fail(f"{origin}: {key!r} must be a single value, got {setting!r}")
    flag_like = getattr(param, "is_flag", False)
    if isinstance(setting, bool) and not flag_like:
        fail(f"{origin}: {key!r} takes a value, not {str(setting).lower()}")
    if setting is None:
        return None
    try:
        for item in setting if isinstance(setting, list) else [setting]:
            if hasattr(param, "get_runtime_param"):  # typer ≥ 0.26 converts with its own coercion
                param.get_runtime_param().coerce(item, param=param, ctx=ctx)
            else:
                param.type.convert(item, param, ctx)
    except ClickException as exc:
        fail(f"{origin}: {key!r}: {exc.format_message()}")
    return setting


def _spelling(param: Any) -> str:
    """How a parameter is written on the command line: its long flag, or its argument name."""
    flags = [f for f in getattr(param, "opts", []) if f.startswith("--")]
    return flags[0] if flags and getattr(param, "param_type_name", "") == "option" else param.name


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise yaml.constructor.ConstructorError(None, None, f"{twice!r} is given twice", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_config(path: Path) -> dict[str, Any]:
    """The mapping of option names to values in a YAML or TOML file (an empty file: none)."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        fail(f"--config {path} is not a text file; give a YAML or TOML file of option: value lines")
    except OSError as exc:
        fail(f"--config {path}: {describe_os_error(exc)}")
    try:
        if path.suffix == ".toml":
            import tomllib  # Python 3.11+

            data = tomllib.loads(text)
        else:
            data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        fail(f"--config {path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        fail(f"--config {path} must hold a mapping of option names to values")
    return data


def out_option(what: str) -> Any:
    """The `-o/--out` option of a command that writes `what`."""
    return typer.Option(..., "-o", "--out", help=f"Output {what}.")


OverwriteOption = typer.Option(
    False, "--overwrite", help="Replace an existing output of the same kind that lrsurgery wrote (never another)."
)
ForceOption = typer.Option(
    False, "--force", help="Use an artifact made from another model's weights (shapes are still checked)."
)
ResumeOption = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint.")
# the default is hf.resolve.DEFAULT_MODEL, written out so that building the CLI does not import torch
ModelArgument = typer.Argument(
    "smollm2-135m", help="Model: a HF folder, a hub id in the local cache, a .gguf file or a named default."
)
ConfigOption = typer.Option(
    None,
    "--config",
    help="YAML/TOML file of option defaults; flags given on the command line win.",
    callback=load_config,
    is_eager=True,
    exists=False,
)
PresetOption = typer.Option(
    None,
    "--preset",
    help="A paper's published settings for this command (`lrsurgery presets` lists them); --config and flags win.",
    callback=load_preset,
    is_eager=True,
)


@contextlib.contextmanager
def timed(out: Path) -> Iterator[None]:
    """Print the stage's output and wall time when it finishes (once: only the main process of several)."""
    from lrsurgery.io.outputs import is_main_process

    began = time.perf_counter()
    yield
    if is_main_process():
        typer.echo(f"wrote {out} in {time.perf_counter() - began:.1f}s")


_WHOLE_PROCESS = False  # set by `main()`, the console script: the command is all this process runs


def claim_process() -> None:
    """Mark this process as the command line's own (called by `lrsurgery.cli.main` before the command)."""
    global _WHOLE_PROCESS
    _WHOLE_PROCESS = True


def owns_process() -> bool:
    """True when the running command is the whole process (the `lrsurgery` console script or
    `python -m lrsurgery`), so it may change process-wide state such as malloc's policy; False when a
    Python caller runs it in its own process (a test's CliRunner, a notebook)."""
    return _WHOLE_PROCESS


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `message` as one red line on stderr and exit with `code`."""
    typer.secho(f"error: {' '.join(str(message).split())}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error: what happened, to which file, and what to do."""
    where = exc.filename or ""
    if exc.errno == errno.ENOSPC:
        return (
            f"no space left on the device{' writing ' + str(where) if where else ''}: free some space and run the "
            "command again (train and calibrate continue from their last checkpoint with --resume)"
        )
    if isinstance(exc, PermissionError):
        return f"permission denied: {where}" if where else f"permission denied: {exc}"
    if isinstance(exc, FileNotFoundError):
        return f"no such file or folder: {where}" if where else str(exc)
    return f"{exc.strerror or exc}: {where}".rstrip(": ")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can fix into one red line and exit code 1; any other exception is a bug
    and keeps its traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None  # `kill` cleans up as Ctrl-C
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(describe_os_error(exc))
        except KeyboardInterrupt:
            fail("interrupted; the output was not written (train and calibrate continue with --resume)", 130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM as a KeyboardInterrupt, so work folders without progress and locks are cleaned up."""
    raise KeyboardInterrupt
