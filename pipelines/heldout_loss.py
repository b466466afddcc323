"""Held-out loss of trained artifacts: mean cross-entropy per response token over a JSONL file, with the
same prompt/response templates and sequence cap as the training run (read from its manifest).

  python pipelines/heldout_loss.py DATA.jsonl RUN [RUN ...]     # prints one JSON line per run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lrsurgery.data import DataSpec, build_examples, collate
from lrsurgery.surgery import load_adapted


@torch.no_grad()
def heldout_loss(run: Path, data: str, batch_size: int = 8) -> dict:
    """{"run", "loss", "tokens"}: token-weighted mean loss of `run` on `data` (eval mode, no dropout)."""
    loaded, manifest = load_adapted(run)
    trained = manifest.config["data"]
    spec = DataSpec(
        path=data,
        prompt_template=trained["prompt_template"],
        response_template=trained["response_template"],
        seq_len=trained["seq_len"],
    )
    rows = build_examples(spec, loaded.tokenizer).rows
    model = loaded.model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i : i + batch_size], loaded.tokenizer.pad_token_id, "causal")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
        total += float(loss)
        tokens += int((labels != -100).sum())
    return {"run": str(run), "loss": total / tokens, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    for run in args.runs:
        print(json.dumps(heldout_loss(run, args.data, args.batch_size)))


if __name__ == "__main__":
    main()
