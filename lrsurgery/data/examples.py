"""Training data through `datasets`: local files or hub ids, turned into token examples.

Three kinds of example, chosen by the task and the options:
- language modelling (default for `causal`): the `text` column, tokenized, joined with EOS and cut into
  blocks of `seq_len` tokens; loss on every token;
- supervised fine-tuning (`causal` with a `prompt_template`): prompt and response are rendered from the
  row's fields with Python format syntax (`"Article: {text}\nTopic:"`); loss only on response tokens;
- classification: `text_column` → `label_column`; string labels are mapped to ids in sorted order."""

from __future__ import annotations

import contextlib
import os
import re
import string
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lrsurgery.config import option
from lrsurgery.errors import UserError, check_choice, check_count, first_line
from lrsurgery.io.artifacts import fingerprint_tensors

IGNORE = -100


MAX_FORMAT_WIDTH = 100_000  # the widest {field:>N} or {field:.N} a template may ask for


LOCAL_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}


class DataError(UserError, ValueError):
    """The data cannot be read or does not have what the task needs."""


@dataclass
class DataSpec:
    """Where the data is and how to turn rows into examples."""

    path: str = option(help="Data: a local json/jsonl/csv/tsv/parquet/txt file or folder, or a hub id.", flag="--data")
    split: str = option("train", "Dataset split.")
    task: str = option("causal", "causal (language modelling or prompt/response SFT) or classification.")
    seq_len: int = option(256, "Tokens per example (language-modelling blocks; the SFT/classification cap).")
    text_column: str = option("text", "Column with the text.")
    label_column: str = option("label", "Column with the class label (classification).")
    prompt_template: str | None = option(None, "SFT prompt in Python format syntax, e.g. 'Q: {question}\\nA:'.")
    response_template: str | None = option(None, "SFT response (the loss is computed on it alone), e.g. ' {answer}'.")
    limit: int | None = option(None, "Use only the first N rows.")

    def __post_init__(self) -> None:
        check_choice("--task", self.task, ("causal", "classification"))
        check_count("--seq-len", self.seq_len, 2)  # a causal example needs a token to predict
        check_count("--limit", self.limit)
        for flag, template in (
            ("--prompt-template", self.prompt_template),
            ("--response-template", self.response_template),
        ):
            if template is not None:
                template_fields(template, flag)


@dataclass
class Examples:
    """Tokenized examples plus what produced them."""

    rows: list[dict[str, list[int]]]
    fingerprint: str
    labels: list[str] | None = None

    def __len__(self) -> int:
        return len(self.rows)


def load_rows(path: str, split: str = "train"):
    """Load a `datasets.Dataset` from a local file/folder or a hub id (offline cache allowed)."""
    import datasets

    from lrsurgery.progress import quiet_libraries

    quiet_libraries()
    if not path:
        raise DataError("--data is empty: give a data file, folder or a dataset id in the local cache")
    local = Path(path).expanduser()
    if local.exists() and not os.access(local, os.R_OK):
        raise DataError(f"cannot read data {local}: permission denied")
    if local.is_file() and local.stat().st_size == 0:
        raise DataError(f"data file {local} is empty")
    looks_local = path.startswith((".", "/", "~")) or local.suffix.lower() in LOCAL_BUILDERS
    if not local.exists() and (looks_local or (local.parent != Path(".") and local.parent.is_dir())):
        raise DataError(f"data file {local} does not exist")
    try:
        if local.is_file():
            builder = LOCAL_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise DataError(f"{local}: unsupported file type {local.suffix!r}; use {', '.join(LOCAL_BUILDERS)}")
            kwargs = {"delimiter": "\t"} if local.suffix.lower() == ".tsv" else {}
            with offline(datasets):
                dataset = datasets.load_dataset(builder, data_files={split: str(local)}, split=split, **kwargs)
        else:  # a local folder, or a dataset id in the local cache
            with offline(datasets):
                dataset = datasets.load_dataset(str(local) if local.is_dir() else path, split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable or malformed files
        if not local.exists():
            raise DataError(
                f"data {path!r} is not a local file or folder, nor a dataset in the local Hugging Face cache "
                f"(lrsurgery never downloads): {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        cause = f" ({type(exc.__cause__).__name__}: {first_line(exc.__cause__)})" if exc.__cause__ else ""
        raise DataError(
            f"cannot load data {path!r} (split {split!r}): {type(exc).__name__}: {first_line(exc)}{cause}"
        ) from exc
    if len(dataset) == 0:
        raise DataError(f"data {path!r} (split {split!r}) is empty")
    return dataset


@contextlib.contextmanager
def offline(datasets: Any) -> Iterator[None]:
    """`datasets` without the network for the duration (lrsurgery reads only what is cached), whatever
    HF_HUB_OFFLINE says; its setting is restored after."""
    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def template_fields(template: str, flag: str = "template") -> list[str]:
    """The columns a Python format template names; DataError for a template that does not parse, a field
    that is not a plain column name ({row.attr} and {row[0]} reach into Python objects), or a width or
    precision too large to be meant."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(f"{flag} {template!r} is not a valid Python format string: {exc}") from exc
    fields = []
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            raise DataError(f"{flag} {template!r}: {{{field}}} must name a column, such as {{text}} or {{text:.400}}")
        if any(int(number) > MAX_FORMAT_WIDTH for number in re.findall(r"\d+", spec or "")):
            raise DataError(
                f"{flag} {template!r}: the format {spec!r} asks for more than {MAX_FORMAT_WIDTH} characters"
            )
        fields.append(field)
    return fields


def render_template(template: str, row: dict[str, Any], flag: str) -> str:
    """`template` filled from `row`; DataError naming the template when a field or format spec fails."""
    try:
        return template.format(**row)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{flag} {template!r} cannot be filled from the row {str(row)[:120]}: {exc!r}") from exc


def require_columns(columns: list[str], needed: list[str], path: str, why: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"data {path!r} has no column(s) {', '.join(map(repr, missing))} needed by {why}; "
            f"it has: {', '.join(columns)}"
        )


def build_examples(spec: DataSpec, tokenizer: Any, labels: list[str] | None = None) -> Examples:
    """Tokenize the data for `spec.task`; `labels` fixes the label order for classification."""
    dataset = load_rows(spec.path, spec.split)
    if spec.limit:
        dataset = dataset.select(range(min(spec.limit, len(dataset))))
    try:
        rows, labels = _examples(dataset, spec, tokenizer, labels)
    except UnicodeDecodeError as exc:  # the file's bytes are decoded only as its rows are read
        raise DataError(f"data {spec.path!r} holds text that is not UTF-8 ({exc.reason}); convert it to UTF-8") from exc
    if not rows:
        raise DataError(f"data {spec.path!r} gave no training examples (texts empty or too short)")
    tensors = [torch.tensor(r["input_ids"] + [-1] + r["labels"]) for r in rows]
    config = {k: v for k, v in asdict(spec).items() if k != "path"}
    digest = fingerprint_tensors(tensors + [torch.tensor(list(str(config).encode()))])
    return Examples(rows=rows, fingerprint=digest, labels=labels)


def _examples(dataset: Any, spec: DataSpec, tokenizer: Any, labels: list[str] | None) -> tuple[list, list | None]:
    """The token rows of `dataset` for `spec.task` (and the label order, for classification)."""
    columns = list(dataset.column_names)
    if spec.task == "classification":
        require_columns(columns, [spec.text_column, spec.label_column], spec.path, "classification")
        rows, labels = _classification(dataset, spec, tokenizer, labels)
    elif spec.task == "causal" and spec.prompt_template:
        fields = template_fields(spec.prompt_template) + template_fields(spec.response_template or "")
        require_columns(columns, fields, spec.path, "the prompt/response templates")
        if not spec.response_template:
            raise DataError("--prompt-template needs --response-template (the part the loss is computed on)")
        rows = _sft(dataset, spec, tokenizer)
    elif spec.task == "causal":
        require_columns(columns, [spec.text_column], spec.path, "language modelling")
        rows = _language_modelling(dataset, spec, tokenizer)
    else:
        raise DataError(f"unknown task {spec.task!r}; use causal or classification")
    return rows, labels


def _language_modelling(dataset, spec: DataSpec, tokenizer) -> list[dict[str, list[int]]]:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in dataset[spec.text_column]:
        if text:
            stream.extend(tokenizer(str(text), add_special_tokens=False)["input_ids"])
            if eos is not None:
                stream.append(eos)
    n = len(stream) // spec.seq_len
    blocks = [stream[i * spec.seq_len : (i + 1) * spec.seq_len] for i in range(n)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def _sft(dataset, spec: DataSpec, tokenizer) -> list[dict[str, list[int]]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = []
    for row in dataset:
        prompt = tokenizer(render_template(spec.prompt_template, row, "--prompt-template"), add_special_tokens=True)
        response = tokenizer(
            render_template(spec.response_template, row, "--response-template"), add_special_tokens=False
        )
        prompt, response = prompt["input_ids"], response["input_ids"] + eos
        response = response[: spec.seq_len - 1]
        prompt = prompt[: spec.seq_len - len(response)]
        rows.append({"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response})
    return rows


def _classification(dataset, spec: DataSpec, tokenizer, labels: list[str] | None):
    raw = dataset[spec.label_column]
    if any(v is None for v in raw):
        raise DataError(f"column {spec.label_column!r} has empty labels")
    values = [str(v) for v in raw]
    labels = labels or label_order(values)
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise DataError(f"labels {unknown} are not among the model's labels {labels}")
    if len(labels) < 2:
        raise DataError(f"classification needs at least two labels; column {spec.label_column!r} has {labels}")
    rows = []
    for text, value in zip(dataset[spec.text_column], values, strict=True):
        ids = tokenizer(str(text), truncation=True, max_length=spec.seq_len)["input_ids"]
        rows.append({"input_ids": ids, "labels": [index[value]]})
    return rows, labels


def label_order(values: list[Any]) -> list[str]:
    """Distinct labels as strings: numerically sorted when all are integers, else alphabetically."""
    distinct = sorted({str(v) for v in values})
    if all(v.lstrip("-").isdigit() for v in distinct):
        distinct.sort(key=int)
    return distinct


def read_labels(spec: DataSpec) -> list[str]:
    """The label names of classification data, in the order their ids are assigned."""
    dataset = load_rows(spec.path, spec.split)
    require_columns(list(dataset.column_names), [spec.text_column, spec.label_column], spec.path, "classification")
    return label_order(dataset[spec.label_column])


def collate(rows: list[dict[str, list[int]]], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; returns input_ids, attention_mask and labels tensors."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    if task == "classification":
        labels = torch.tensor([r["labels"][0] for r in rows])
    else:
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
