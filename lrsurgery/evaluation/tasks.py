"""Task files: lm-evaluation-harness YAML → `Task`, its documents, templates and few-shot contexts.

Field names and their meaning follow lm-eval's `TaskConfig`; lrsurgery's own additions
(`max_length`, `doc_to_text_pair`, `timeout`) are extra fields. A template that names a column
returns that column; any other string is a Jinja template rendered with StrictUndefined and
`keep_trailing_newline`, as lm-eval renders it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from random import Random
from typing import Any

import yaml
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lrsurgery.data.examples import offline
from lrsurgery.evaluation.schema import DEFAULT_METRICS, OUTPUT_TYPES, UNSUPPORTED, TaskError, validate_task

FEWSHOT_SEED = 1234  # lm-eval's default --fewshot_random_seed


class FunctionRef(str):
    """The value of an lm-eval `!function module.name` tag (a Python hook we do not import)."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))


@dataclass
class Task:
    task: str
    dataset_path: str
    output_type: str = "generate_until"
    dataset_name: str | None = None
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    training_split: str | None = None
    validation_split: str | None = None
    test_split: str | None = None
    fewshot_split: str | None = None
    fewshot_config: dict[str, Any] = field(default_factory=dict)
    doc_to_text: Any = ""
    doc_to_target: Any = None
    doc_to_choice: Any = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int | None = None
    metric_list: list[dict[str, Any]] = field(default_factory=list)
    generation_kwargs: dict[str, Any] | None = None
    filter_list: list[dict[str, Any]] | None = None
    repeats: int = 1
    # lrsurgery additions
    max_length: int | None = None  # rolling/scoring window in tokens (lm-eval: the model's max_length)
    doc_to_text_pair: Any = None  # second segment for sentence-pair classification (GLUE MRPC, RTE, ...)
    timeout: float = 3.0  # seconds per program for pass@1

    @classmethod
    def from_yaml(cls, path: Path, num_fewshot: int | None = None) -> Task:
        """Read a task file (following lm-eval `include:`); `num_fewshot` overrides the file's."""
        raw = _read_yaml(Path(path))
        _reject_functions(raw, str(path))
        for name in UNSUPPORTED:
            if raw.get(name) is not None:
                raise TaskError(f"{path}: field '{name}' is not supported by lrsurgery eval")
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        for required in ("task", "dataset_path"):
            if required not in raw:
                raise TaskError(f"{path} has no '{required}' field")
        if raw.get("output_type", "generate_until") not in OUTPUT_TYPES:
            raise TaskError(f"{path}: output_type {raw['output_type']!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if num_fewshot is not None:
            raw["num_fewshot"] = num_fewshot
        task = cls(**raw)
        task._validate(str(path))
        return task

    def _validate(self, where: str) -> None:
        """Refuse fields of the wrong type or range (naming the file); fill in lm-eval's defaults."""
        validate_task(self, where)
        if self.output_type == "generate_until":  # lm-eval's defaults (TaskConfig.__post_init__)
            kwargs = dict(self.generation_kwargs or {"do_sample": False, "temperature": 0.0})
            kwargs.setdefault("until", [self.fewshot_delimiter])
            self.generation_kwargs = kwargs

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The metric entries to compute: metric_list, or the output type's defaults."""
        return self.metric_list or [{"metric": m} for m in DEFAULT_METRICS[self.output_type]]

    @property
    def config_hash(self) -> str:
        """sha256 (16 hex digits) of the effective configuration, after includes and overrides."""
        text = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def eval_split(self) -> str:
        split = self.test_split or self.validation_split
        if not split:
            raise TaskError(f"task {self.task} names no test_split or validation_split")
        return split

    def load_split(self, split: str) -> list[dict[str, Any]]:
        """All rows of `split` as dicts, in file order."""
        import datasets

        from lrsurgery.progress import quiet_libraries

        quiet_libraries()
        kwargs = expand_environment(self.dataset_kwargs or {})
        files = (kwargs.get("data_files") or {}) if isinstance(kwargs.get("data_files"), dict) else {}
        paths = [Path(p) for p in ([files[split]] if isinstance(files.get(split), str) else files.get(split) or [])]
        if paths and all(p.is_file() and p.stat().st_size < 64 and not p.read_text().strip() for p in paths):
            raise TaskError(f"task {self.task}: split {split!r} is empty ({', '.join(map(str, paths))})")
        try:
            with offline(datasets):  # task data is read from files or the local cache, never downloaded
                dataset = datasets.load_dataset(self.dataset_path, self.dataset_name, split=split, **kwargs)
        except Exception as exc:  # datasets raises many types for unreadable data or wrong dataset_kwargs
            reason = f"{exc}: {exc.__cause__}" if exc.__cause__ else str(exc)
            raise TaskError(f"task {self.task}: cannot load split {split!r}: {reason}".splitlines()[0]) from exc
        rows = [dict(r) for r in dataset]
        if not rows:
            raise TaskError(f"task {self.task}: split {split!r} is empty")
        return rows

    def docs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The documents to score: the test split (else validation), the first `limit` of them."""
        rows = self.load_split(self.eval_split)
        return rows[:limit] if limit else rows

    def fewshot_source(self) -> str | None:
        """lm-eval's choice: fewshot_split, else training, else validation, else test split."""
        return (
            (self.fewshot_config or {}).get("split")
            or self.fewshot_split
            or self.training_split
            or (self.validation_split or self.test_split)
        )

    # -- templates ---------------------------------------------------------------------------

    def text(self, doc: dict[str, Any]) -> str:
        value = render(self.doc_to_text, doc)
        if not isinstance(value, str):
            raise TaskError(f"task {self.task}: doc_to_text gave {type(value).__name__}, expected text")
        return value

    def choices(self, doc: dict[str, Any]) -> list[str]:
        """doc_to_choice as a list of strings (a column, a list, a dict's values or a template)."""
        spec = self.doc_to_choice
        if isinstance(spec, dict):
            value: Any = list(spec.values())
        elif isinstance(spec, str) and spec not in doc:
            text = render(spec, doc)
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError) as exc:
                raise TaskError(f"task {self.task}: doc_to_choice gave {text!r}, not a list") from exc
        else:
            value = render(spec, doc)
        if not isinstance(value, (list, tuple)) or len(value) < 2:
            raise TaskError(f"task {self.task}: doc_to_choice must give at least two choices, got {value!r}")
        return [str(v) for v in value]

    def target(self, doc: dict[str, Any]) -> Any:
        """doc_to_target as lm-eval returns it: an int, a string, or a list (several targets)."""
        spec = self.doc_to_target
        if spec is None:
            raise TaskError(f"task {self.task} has no doc_to_target")
        if isinstance(spec, (int, list)) or spec in doc:
            return render(spec, doc)
        text = render(spec, doc)
        if text.isdigit() and self.doc_to_choice is not None:
            return int(text)
        if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
        return text

    def gold_indices(self, doc: dict[str, Any], choices: list[str]) -> list[int]:
        """The index (or indices, for several targets) of the right choice."""
        gold = self.target(doc)
        out = []
        for g in gold if isinstance(gold, list) else [gold]:
            if isinstance(g, str) and g in choices:
                out.append(choices.index(g))
            elif isinstance(g, int) and not isinstance(g, bool) and 0 <= g < len(choices):
                out.append(g)
            else:
                raise TaskError(f"task {self.task}: target {g!r} is neither a choice index nor one of {choices}")
        return out

    def target_text(self, doc: dict[str, Any]) -> str:
        """The answer as text, the way a few-shot example shows it."""
        gold = self.target(doc)
        if isinstance(gold, list):
            gold = gold[0]
        if isinstance(gold, int) and self.doc_to_choice is not None:
            return self.choices(doc)[gold]
        return str(gold)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The task file's mapping, with its `include:` chain merged in (a file's own keys win)."""
    if path.resolve() in seen:
        raise TaskError(f"{seen[0]}: `include:` loops back to {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path} is not a text file (a task file is YAML)") from exc
    except OSError as exc:
        raise TaskError(f"cannot read task file {path}: {exc.strerror or exc}") from exc
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise TaskError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(raw, dict):
        raise TaskError(f"{path} is not a task file (a YAML mapping)")
    if "include" in raw:
        include = raw.pop("include")
        if not isinstance(include, str):
            raise TaskError(f"{path}: `include:` must name one file, got {include!r}")
        base = _read_yaml(path.parent / include, (*seen, path.resolve()))
        raw = {**base, **raw}
    return raw


def _reject_functions(value: Any, where: str) -> None:
    if isinstance(value, FunctionRef):
        raise TaskError(f"{where}: '!function {value}' needs lm-eval's Python hooks, which lrsurgery does not run")
    if isinstance(value, dict):
        for v in value.values():
            _reject_functions(v, where)
    if isinstance(value, list):
        for v in value:
            _reject_functions(v, where)


def expand_environment(value: Any) -> Any:
    """Expand ${VAR} in strings (data file paths) from the environment; TaskError for a variable not set."""
    if isinstance(value, str):
        names = [braced or bare for braced, bare in re.findall(r"\$\{(\w+)\}|\$(\w+)", value)]
        unset = [name for name in names if name not in os.environ]
        if unset:
            raise TaskError(f"{value!r} uses ${{{unset[0]}}}, which is not set in the environment: export it first")
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: expand_environment(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_environment(v) for v in value]
    return value


_TEMPLATES: dict[str, Any] = {}
SEQUENCE_LIMIT = 1_000_000  # longest string or list a template may build by repetition


class TemplateSandbox(ImmutableSandboxedEnvironment):
    """Jinja for task files that may come from anyone: no attribute that reaches Python internals, no
    mutation, `range` capped (Jinja's sandbox), and no `*` or `**` that builds a huge value."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise SecurityError(f"exponent {right} is too large")
        if operator == "*":
            sizes = [len(v) for v in (left, right) if isinstance(v, (str, list, tuple))]
            counts = [v for v in (left, right) if isinstance(v, int)]
            if sizes and counts and sizes[0] * counts[0] > SEQUENCE_LIMIT:
                raise SecurityError(f"a repetition of {sizes[0] * counts[0]} items is too long")
        return super().call_binop(context, operator, left, right)


def render(template: Any, doc: dict[str, Any]) -> Any:
    """lm-eval semantics: a column name returns the column; a list or int is returned as is; else Jinja."""
    import jinja2

    if template is None or isinstance(template, (list, int)):
        return template
    if template in doc:
        return doc[template]
    if not isinstance(template, str):
        raise TaskError(f"template {template!r} must be text, a list or a number")
    if template not in _TEMPLATES:
        env = TemplateSandbox(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
        try:
            _TEMPLATES[template] = env.from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise TaskError(f"template {template!r} is not valid Jinja: {exc.message} (line {exc.lineno})") from exc
    try:
        return _TEMPLATES[template].render(**doc)
    except jinja2.UndefinedError as exc:
        raise TaskError(f"template {template!r} names a field the data lacks: {exc}") from exc
    except SecurityError as exc:
        raise TaskError(f"template {template!r} is refused by the template sandbox: {exc}") from exc
    except Exception as exc:  # the template's own expressions (a filter on the wrong type, a division by 0, ...)
        raise TaskError(f"template {template!r} fails on a document: {type(exc).__name__}: {exc}") from exc


class FewshotSampler:
    """lm-eval's ContextSampler: one Random(seed) per task, drawn from in document order.

    When the few-shot pool is the evaluated split, n+1 examples are drawn and the document itself
    is removed; `first_n` takes the pool's first n instead.
    """

    def __init__(self, pool: list[dict[str, Any]], seed: int = FEWSHOT_SEED, first_n: bool = False) -> None:
        self.pool, self.rnd, self.first_n = pool, Random(seed), first_n

    def sample(self, n: int, exclude: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        if n == 0:
            return []
        if self.first_n:
            pool = [d for d in self.pool if d != exclude] if exclude is not None else self.pool
            chosen = pool[:n]
        elif exclude is None:
            chosen = self.rnd.sample(self.pool, n) if n <= len(self.pool) else []
        else:
            drawn = self.rnd.sample(self.pool, n + 1) if n + 1 <= len(self.pool) else []
            chosen = [d for d in drawn if d != exclude][:n]
            if len(chosen) < n:
                chosen = self.rnd.sample([d for d in self.pool if d != exclude], n)
        if len(chosen) < n:
            raise TaskError(f"num_fewshot={n} but the few-shot split has only {len(self.pool)} documents")
        return chosen


def contexts(task: Task, docs: list[dict[str, Any]], seed: int = FEWSHOT_SEED) -> list[str]:
    """The prompt for each document: description + k examples (text, target delimiter, answer,
    few-shot delimiter) + the document's own text, as lm-eval's `fewshot_context` builds it."""
    shots = task.num_fewshot or 0
    sampler = None
    if shots:
        source = task.fewshot_source()
        if source is None:
            raise TaskError(f"task {task.task}: num_fewshot={shots} but no split to draw examples from")
        first_n = (task.fewshot_config or {}).get("sampler") == "first_n"
        sampler = FewshotSampler(task.load_split(source), seed, first_n)
    explicit = (task.fewshot_config or {}).get("split") or task.fewshot_split
    same_split = explicit is not None and explicit == task.test_split
    out = []
    for doc in docs:
        parts = [str(render(task.description, doc)) if task.description else ""]
        if sampler is not None:
            for example in sampler.sample(shots, exclude=doc if same_split else None):
                parts.append(task.text(example) + task.target_delimiter + task.target_text(example))
                parts.append(task.fewshot_delimiter)
        parts.append(task.text(doc))
        out.append("".join(parts))
    return out
