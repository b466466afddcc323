"""The errors a user can fix, and the checks of option values.

Every user error derives from `UserError`: its message names the file or option at fault and says what
to do, and the command line prints it as one red line and exits with 1. Any other exception is a bug
in lrsurgery and keeps its traceback.
"""

from __future__ import annotations

import math
from numbers import Real


class UserError(Exception):
    """An error the user can fix (bad option, bad file, wrong artifact): one line, no traceback."""


class ArtifactError(UserError):
    """An artifact is missing, corrupt, of the wrong kind, or made for another model."""


class OptionError(UserError, ValueError):
    """An option's value is outside its meaning: NaN, infinite, zero, negative or out of range."""


def check_count(
    flag: str, value: int | None, minimum: int = 1, maximum: int | None = None, error: type[Exception] = OptionError
) -> None:
    """Refuse an integer option outside [minimum, maximum] (None means "not given" and passes)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{flag} must be a whole number, got {value!r}")
    if value < minimum:
        raise error(f"{flag} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise error(f"{flag} must be at most {maximum}, got {value}")


SEED_MAX = 2**32 - 1


def check_number(
    flag: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    error: type[Exception] = OptionError,
) -> None:
    """Refuse a numeric option that is NaN, infinite or outside [low, high] (an open end excludes it).

    None means "not given" and passes.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise error(f"{flag} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise error(f"{flag} must be in {left}{lo}, {hi}{right}, got {value:g}")


def check_choice(flag: str, value: str | None, choices: tuple[str, ...], error: type[Exception] = OptionError) -> None:
    """Refuse a value that is not one of `choices` (None passes)."""
    if value is not None and value not in choices:
        raise error(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library messages often run on), or its type's name."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = (lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")) if lines else ""
    first = first or type(exc).__name__
    return first.replace("For details look at the above report!", "the config and the weights disagree").strip()
