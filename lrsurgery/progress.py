"""Progress bars for long work (tqdm on stderr; LRSURGERY_NO_PROGRESS=1 hides them)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("LRSURGERY_NO_PROGRESS", "") not in ("1", "true", "yes")


def quiet_libraries() -> None:
    """Silence transformers chatter (and datasets', if loaded); hide their bars when ours are hidden."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not enabled():
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        datasets = sys.modules["datasets"]
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its read errors come back as our one line
        if not enabled():
            datasets.disable_progress_bars()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """Wrap `items` in a progress bar labelled `desc`."""
    return tqdm(items, desc=desc, total=total, unit=unit, disable=not enabled(), dynamic_ncols=True)


def bar(total: int, desc: str, unit: str = "it", initial: int = 0) -> tqdm:
    """A manually advanced progress bar."""
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled(), dynamic_ncols=True)
