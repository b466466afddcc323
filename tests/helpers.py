"""Small helpers shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

PROMPT = "Article: {text}\nTopic:"
RESPONSE = " {label}"
SAMPLE_TEXTS = [
    "Shares in the bank rose sharply after the results were announced.",
    "The striker scored twice in the second half to win the cup final.",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@torch.no_grad()
def outputs(model: torch.nn.Module, tokenizer, texts: list[str] = SAMPLE_TEXTS) -> torch.Tensor:
    """Logits (or last hidden states of a bare encoder) for a padded batch of texts."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    out = model(**enc)
    value = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return value * enc["attention_mask"][..., None] if value.ndim == 3 else value


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def cli(*args) -> tuple[int, str]:
    """Run the lrsurgery CLI in-process; return (exit code, output). A traceback is a bug: re-raised."""
    from lrsurgery.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def assert_same_tensors(file_a: Path, file_b: Path) -> None:
    """Two safetensors files hold the same names and bit-identical tensors."""
    from lrsurgery.artifacts import load_tensors

    a, b = load_tensors(file_a), load_tensors(file_b)
    assert a.keys() == b.keys(), (file_a, file_b)
    for key in a:
        assert torch.equal(a[key], b[key]), (file_a, key)
