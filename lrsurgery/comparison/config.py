"""A comparison file: one setting (model, data, calibration, schedule, score, budget) and the methods to run
on it, read from YAML and checked before anything runs.

    name: smollm2-bbc-topics
    model: smollm2-135m
    data: {assets: bbc-news, prompt_template: "...", response_template: " {label}", seq_len: 128}
    calibrate: {samples: 32}                # options of `lrsurgery calibrate`
    train: {max_steps: 60, batch_size: 8, lr: 5.0e-4, eval_every: 10}   # options of `lrsurgery train`
    score: {task: ../tasks/bbc_topic.yaml, env: {BBC_DATA: data}, metric: acc, limit: 100}   # device: cuda
    budget: {rank: 8}                       # every method at LoRA rank 8's trainable parameters
    methods: {lora: {}, pissa: {}, tlora: {}, dual: {train: {k_final: 3}}, srlora: {init: {r_target: 32}}}
    seeds: [0, 1, 2]
    quick: {train: {max_steps: 6}, calibrate: {samples: 4}, score: {limit: 20}, seeds: [0]}

Paths in the file (data files, the task file) are relative to the file; `score.env` values are relative
to the results folder (where `data.assets` writes its files). Every method runs with the same data
order, steps, schedule and seed; a method's `init` / `train` entries are its own options on top.

A method entry is keyed by a label, which is the method's name unless the entry names its `method`, so
one method can run as several variants (`tlora-w: {method: tlora, init: {a_init: w}}`). A file may
`extends: OTHER.yaml`: it starts from that file's settings and merges its own over them, section by
section (its methods are added to the other file's), so an ablation file run into the same results
folder adds its variants to the comparison's table without repeating the finished runs."""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lrsurgery.errors import UserError, check_count

SECTIONS = frozenset(
    (
        "name",
        "description",
        "extends",
        "model",
        "data",
        "calibrate",
        "train",
        "score",
        "budget",
        "methods",
        "seeds",
        "quick",
    )
)
SCORE_KEYS = frozenset(("task", "env", "metric", "limit", "device"))  # device: where `lrsurgery eval` runs
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a method's label names its runs' folder


class CompareError(UserError, ValueError):
    """A comparison file that cannot be run as written."""


@dataclass
class Comparison:
    """One setting and its methods (see the module doc); `source` is the file it was read from."""

    name: str
    model: str
    data: dict[str, Any]
    train: dict[str, Any]
    score: dict[str, Any]
    budget: int
    methods: dict[str, dict[str, dict[str, Any]]]
    seeds: list[int]
    calibrate: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: Path = Path(".")

    def method_of(self, label: str) -> str:
        """The registered method the entry `label` runs."""
        return self.methods[label].get("method", label)

    @property
    def needs_stats(self) -> bool:
        """Whether a calibration runs: some method takes a stats artifact."""
        return any(takes_stats(self.method_of(label)) for label in self.methods)


def takes_stats(method: str) -> bool:
    """Whether the registered `method` reads a stats artifact (has a `stats` option, as TLoRA's `--stats`)."""
    from lrsurgery.methods.base import registered

    return "stats" in registered()[method].__dataclass_fields__


def read_comparison(path: Path, quick: bool = False, seeds: list[int] | None = None) -> Comparison:
    """The comparison in the YAML file `path` (with its `quick` overrides when `quick`; `seeds` replaces
    the file's seeds), checked: CompareError naming the file and key for anything it cannot run."""
    from lrsurgery.methods import method_names

    raw = _read_raw(Path(path), [])
    missing = [k for k in ("name", "model", "data", "train", "score", "budget", "methods") if k not in raw]
    if missing:
        raise CompareError(f"{path} lacks {missing[0]!r}")
    settings = copy.deepcopy({k: v for k, v in raw.items() if k != "quick"})
    if quick:
        settings = _merged(settings, raw.get("quick") or {})
    for key in ("data", "train", "score", "budget", "methods", "calibrate"):
        if not isinstance(settings.get(key, {}), dict):
            raise CompareError(f"{path}: {key!r} must be a mapping")
    methods = {}
    for label, entry in settings["methods"].items():
        entry = entry or {}
        if not isinstance(entry, dict) or set(entry) - {"method", "init", "train"}:
            raise CompareError(f"{path}: methods.{label} takes only 'method', 'init' and 'train'")
        method = str(entry.get("method", label))
        if method not in method_names():
            raise CompareError(f"{path}: methods.{label}: unknown method {method!r}; use {', '.join(method_names())}")
        if not LABEL.fullmatch(str(label)):
            raise CompareError(
                f"{path}: methods.{label}: a label is letters, digits, '.', '-', '_' (it names a folder)"
            )
        methods[str(label)] = {"init": dict(entry.get("init") or {}), "train": dict(entry.get("train") or {})}
        if method != label:
            methods[str(label)]["method"] = method
    if not methods:
        raise CompareError(f"{path}: 'methods' is empty")
    budget = settings["budget"].get("rank")
    try:
        check_count("budget.rank", budget)
        chosen = [int(s) for s in (seeds if seeds is not None else settings.get("seeds", [0]))]
        for seed in chosen:
            check_count("a seed", seed, 0)
    except (TypeError, ValueError) as exc:
        raise CompareError(f"{path}: {exc}") from exc
    if not chosen or len(set(chosen)) != len(chosen):
        raise CompareError(f"{path}: the seeds must be distinct and at least one, got {chosen}")
    score = dict(settings["score"])
    if "task" not in score or "metric" not in score:
        raise CompareError(f"{path}: 'score' needs a task file ('task') and the metric to report ('metric')")
    unknown = sorted(set(score) - SCORE_KEYS)
    if unknown:
        raise CompareError(f"{path}: score.{unknown[0]} is not a setting; use {', '.join(sorted(SCORE_KEYS))}")
    if "device" in score:
        from lrsurgery.hf.load import compute_device

        try:
            compute_device(str(score["device"]))
        except UserError as exc:
            raise CompareError(f"{path}: score.device: {exc}") from exc
    here = Path(path).resolve().parent
    score["task"] = str((here / score["task"]).resolve())
    data = dict(settings["data"])
    for key in ("train", "test"):
        if key in data:
            data[key] = str((here / data[key]).resolve())
    if "assets" not in data and not {"train", "test"} <= set(data):
        raise CompareError(f"{path}: 'data' needs 'assets' (bbc-news, shakespeare) or both 'train' and 'test' files")
    return Comparison(
        name=str(settings["name"]),
        description=str(settings.get("description", "")),
        model=str(settings["model"]),
        data=data,
        calibrate=dict(settings.get("calibrate") or {}),
        train=dict(settings["train"]),
        score=score,
        budget=int(budget),
        methods=methods,
        seeds=chosen,
        source=Path(path).resolve(),
    )


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, section by section (a mapping's keys are merged, anything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_raw(path: Path, seen: list[Path]) -> dict[str, Any]:
    """The file's mapping, with the file it `extends` merged under it (paths made relative to `path`)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CompareError(f"{path} cannot be read as a YAML comparison file: {exc}") from exc
    if not isinstance(raw, dict):
        raise CompareError(f"{path} must hold a mapping (name, model, data, train, score, budget, methods)")
    unknown = sorted(set(raw) - SECTIONS)
    if unknown:
        raise CompareError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(SECTIONS))}")
    if "extends" not in raw:
        return raw
    parent = (path.resolve().parent / str(raw.pop("extends"))).resolve()
    if parent in seen or parent == path.resolve():
        raise CompareError(f"{path}: 'extends' makes a loop through {parent}")
    base = _read_raw(parent, [*seen, path.resolve()])
    moved = Path(os.path.relpath(parent.parent, path.resolve().parent))
    for section, key in (("score", "task"), ("data", "train"), ("data", "test")):
        if isinstance(base.get(section), dict) and key in base[section]:
            base[section][key] = str(moved / base[section][key])
    quick = _merged(base.pop("quick", None) or {}, raw.pop("quick", None) or {})
    return {**_merged(base, raw), **({"quick": quick} if quick else {})}
