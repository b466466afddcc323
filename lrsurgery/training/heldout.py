"""Held-out loss of a model on tokenized examples: what `train --eval-data` logs and records.

Causal examples: the mean next-token loss over every labelled token of the set (token-weighted, so it
does not depend on how examples are batched); classification: the mean cross-entropy per example."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrsurgery.data.examples import IGNORE, Examples, collate
from lrsurgery.linalg.basics import at_least_fp32


@torch.no_grad()
def heldout_loss(model: nn.Module, examples: Examples, pad_id: int, task: str, batch_size: int = 8) -> dict:
    """{"loss": mean loss, "count": tokens (causal) or examples (classification)} over `examples`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples.rows), batch_size):
        batch = collate(examples.rows[start : start + batch_size], pad_id, task)
        labels = batch.pop("labels").to(device)
        logits = at_least_fp32(model(**{k: v.to(device) for k, v in batch.items()}).logits)
        if task == "classification":
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            count += labels.numel()
        else:
            target = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
            total += float(F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="sum"))
            count += int((target != IGNORE).sum())
    model.train(was_training)
    return {"loss": total / max(1, count), "count": count}
