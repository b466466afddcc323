"""Options declared once: a config dataclass's field carries its default and its help text, and the
command line's flags are generated from the fields (cli/options.py), so a new option, or a new method's
options, needs no edit of the CLI.

A field made with `option()` is a command-line option: `--field-name` unless `flag` says otherwise; a
bool field is a `--name/--no-name` switch. `stage` puts a method's option on `init` (default) or `train`.
Fields made without `option()` are internal.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, Field, field, fields
from typing import Any


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    short: str | None = None,
    stage: str = "init",
) -> Any:
    """A dataclass field that is also a command-line option (see the module doc)."""
    metadata = {"help": help, "flag": flag, "short": short, "stage": stage}
    return field(default=default, metadata=metadata)


def option_fields(cls: type, stage: str | None = None) -> list[tuple[Field, Any]]:
    """The option fields of dataclass `cls` (of one `stage`, if given), each with its resolved type."""
    hints = typing.get_type_hints(cls)
    return [
        (f, hints[f.name])
        for f in fields(cls)
        if "help" in f.metadata and (stage is None or f.metadata["stage"] == stage)
    ]


def flag_of(f: Field) -> str:
    """The command-line flag of an option field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")
