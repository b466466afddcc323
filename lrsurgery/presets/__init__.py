"""The presets that `--preset NAME` reads: one YAML file per paper setting, shipped with the package.

Each file holds `description` (one line), `source` (the paper and table its values come from) and one
section per stage it sets (`calibrate`, `init`, `train`), each a mapping of option names to values as
in a `--config` file. This folder holds data only; the CLI (cli/common.py) reads and checks it."""

from __future__ import annotations

from importlib import resources

STAGES = ("calibrate", "init", "train")
SUFFIX = ".yaml"


def preset_names() -> list[str]:
    """The names of the shipped presets (their file names without `.yaml`), sorted."""
    folder = resources.files(__name__)
    return sorted(p.name.removesuffix(SUFFIX) for p in folder.iterdir() if p.name.endswith(SUFFIX))


def preset_text(name: str) -> str | None:
    """The YAML text of the preset `name`, or None when no preset of that name is shipped."""
    if name not in preset_names():  # also keeps a name such as "../x" from reaching the file system
        return None
    return resources.files(__name__).joinpath(name + SUFFIX).read_text(encoding="utf-8")
