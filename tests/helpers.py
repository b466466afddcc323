"""Small helpers shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
