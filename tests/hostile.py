"""What every hostile-input test asserts: a refused command exits non-zero with one `error:` line and no
traceback, leaves nothing at (or beside) its output path, and leaves every input byte-identical."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from helpers import cli


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (files or folders), by path; the state an input must keep."""
    state: dict[str, str] = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            state[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return state


def refused(*args, expect: str, out: Path | None = None, inputs: tuple[Path, ...] = ()) -> str:
    """Run the CLI with `args`; check the refusal (see module doc) and that its one line matches `expect`.

    `out` is the output path: if it existed before it must be unchanged, else absent, and nothing new
    may appear beside it (no work folder, temporary file or lock). Returns the error line.
    """
    watched = tuple(inputs) + ((out,) if out is not None and out.exists() else ())
    before = snapshot(*watched)
    beside = set(out.parent.iterdir()) if out is not None and out.parent.is_dir() else None
    code, text = cli(*args)  # a traceback is re-raised by `cli` and fails the test
    assert code != 0, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text
    assert re.search(expect, errors[0]), errors[0]
    assert snapshot(*watched) == before, "an input or the existing output was modified"
    if out is not None:
        if beside is None:
            assert not out.parent.exists() or not out.exists()
        else:
            assert set(out.parent.iterdir()) == beside, set(out.parent.iterdir()) ^ beside
    return errors[0]
