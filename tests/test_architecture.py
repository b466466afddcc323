"""The package's folders import one way (ARCHITECTURE.md): each only from the folders before it."""

from __future__ import annotations

import ast
from pathlib import Path

import lrsurgery

LAYERS = [
    {"errors", "config", "progress", "presets"},
    {"io"},
    {"hf"},
    {"linalg"},
    {"layers"},
    {"data"},
    {"calibration"},
    {"methods"},
    {"stages"},
    {"training"},
    {"evaluation"},
    {"comparison"},
    {"cli", "__main__"},
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}
PACKAGE = Path(lrsurgery.__file__).parent


def imported_parts(path: Path) -> set[str]:
    """The top-level lrsurgery parts (folder or module names) that the file at `path` imports."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "lrsurgery" and len(pieces) > 1:
                parts.add(pieces[1])
    return parts


def test_every_part_has_a_level():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")}
    assert tops - {"__init__"} <= set(LEVEL), f"parts missing from LAYERS: {sorted(tops - set(LEVEL))}"


def test_imports_go_one_way():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if top == "__init__":
            continue
        for part in imported_parts(path):
            if part in LEVEL and LEVEL[part] > LEVEL[top]:
                upward.append(f"{path.relative_to(PACKAGE)} imports lrsurgery.{part}")
    assert not upward, "\n".join(upward)
