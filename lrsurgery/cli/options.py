"""Typer options generated from config dataclasses (lrsurgery/config.py): a command lists the configs it
takes, and gets one flag per option field, with the field's default and help."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass
from functools import wraps
from types import NoneType, UnionType
from typing import Any, Optional

import typer

from lrsurgery.config import flag_of, option_fields


@dataclass
class Group:
    """The options one config contributes to a command: (field, type, help panel) each. With `given_only`,
    only the options given on the command line (or in --config) are passed on, so a method's own
    defaults apply to the rest."""

    fields: list[tuple[Field, Any, str | None]]
    given_only: bool = False


def config_options(cls: type, exclude: tuple[str, ...] = (), panel: str | None = None) -> Group:
    """Every option field of the config dataclass `cls`, but `exclude`."""
    return Group([(f, hint, panel) for f, hint in option_fields(cls) if f.name not in exclude])


def method_options(stage: str) -> Group:
    """The `stage` ("init" or "train") options of every registered method, each flag once (methods that
    share an option, such as a rank or an EMA factor, share its flag), in a help panel per method."""
    from lrsurgery.methods.base import Method, registered

    seen: set[str] = set()
    out = []
    for cls in (Method, *registered().values()):
        for f, hint in option_fields(cls, stage):
            if f.name not in seen:
                seen.add(f.name)
                out.append((f, hint, "method options" if cls is Method else f"{cls.name} options"))
    return Group(out, given_only=True)


def with_options(**groups: Group) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command: it gains the options of every group, and receives each group as a keyword
    argument holding a dict of {field name: value} (for a `given_only` group, the given ones only)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn)
        own = [p.replace(annotation=hints.get(n, p.annotation)) for n, p in inspect.signature(fn).parameters.items()]
        own = [p for p in own if p.name not in groups]
        taken = {p.name for p in own}
        generated: dict[str, tuple[str, inspect.Parameter]] = {}
        for group_name, group in groups.items():
            for f, hint, panel in group.fields:
                if f.name in generated:
                    continue
                if f.name in taken:
                    raise RuntimeError(f"option {f.name} of {group_name} clashes with a parameter of {fn.__name__}")
                generated[f.name] = (group_name, _parameter(f, hint, panel, group.given_only))

        @wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            values: dict[str, dict[str, Any]] = {name: {} for name in groups}
            for name, (group_name, _) in generated.items():
                value = kwargs.pop(name)
                if not (groups[group_name].given_only and value is None):
                    values[group_name][name] = value
            return fn(*args, **kwargs, **values)

        parameters = [p for p in own if p.kind != inspect.Parameter.KEYWORD_ONLY]
        parameters += [p for _, p in generated.values()] + [p for p in own if p.kind == inspect.Parameter.KEYWORD_ONLY]
        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return decorate


def _parameter(f: Field, hint: Any, panel: str | None, given_only: bool) -> inspect.Parameter:
    """The typer option of one field."""
    flag, base = flag_of(f), _without_none(hint)
    required = f.default is MISSING and not given_only
    default = None if given_only or required else f.default
    help_text = f.metadata["help"]
    if given_only and f.default is not MISSING and f.default is not None:
        help_text += f" (default: {f.default})"
    if base is bool:
        decls = [f"{flag}/--no-{flag[2:]}"]
    else:
        decls = [flag] + ([f.metadata["short"]] if f.metadata.get("short") else [])
    if base is tuple or typing.get_origin(base) is tuple:  # a comma-separated list on the command line
        base = str
        default = ",".join(default) if isinstance(default, tuple) else default
    option = typer.Option(... if required else default, *decls, help=help_text, rich_help_panel=panel)
    annotation = base if required or (default is not None and not given_only) else Optional[base]  # noqa: UP045
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _without_none(hint: Any) -> Any:
    """`X` for `X | None` (or Optional[X]); the hint itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, UnionType):
        args = [a for a in typing.get_args(hint) if a is not NoneType]
        if len(args) == 1:
            return args[0]
    return hint
