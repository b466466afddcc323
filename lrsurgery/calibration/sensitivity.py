"""Module sensitivity S(W) = mean over weights of |w · ∂L/∂w| (TLoRA Eq. 5, Alg. 1 line 8).

Choice (the paper says "averaged over calibration samples"): the gradient is taken per sample (one
sequence, L = its mean token loss over the tokens with a label), |W ⊙ ∇W| is reduced at once to its
row sums and column sums, and those are averaged over samples. Stored per module: the scalar S, the
per-output-row means (d_out) and the per-input-column means (d_in).

Per-sample gradients of a whole micro-batch come from one backward pass: the batch loss is the *sum*
of the per-sample mean losses, and for a linear layer with input x_b (T, d_in) and output gradient
g_b (T, d_out) the weight gradient of sample b alone is G_b = g_bᵀ x_b. A forward hook keeps x, a
hook on the output receives g, and |W ⊙ G_b| is reduced to row and column sums straight away (in
chunks of samples): full weight gradients are never accumulated or kept, and the weights themselves
never require gradients.

Two drivers give the same numbers: `whole_model` (forward + backward through the whole model) and
the block-by-block one in calibration/runner.py (forward block by block keeping block inputs on CPU, backward
block by block in reverse, recomputing each block from its stored input and passing the input
gradient down, so one block's weights are resident at a time). Both use `SensitivityCollector`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrsurgery.data.examples import IGNORE
from lrsurgery.hf.tree import backbone

CHUNK_ELEMENTS = 1 << 25  # per-sample gradients materialised at once: samples x d_out x d_in


class SensitivityCollector:
    """Hooks on target linears accumulating per-sample |W ⊙ ∇W| row and column sums (fp64)."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self.rows = {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in modules.items()}
        self.cols = {n: torch.zeros(m.weight.shape[1], dtype=torch.float64) for n, m in modules.items()}
        self.samples = 0
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Linear, args, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            x = args[0].detach()
            output.register_hook(lambda g: self._reduce(name, module.weight.detach(), x, g))

        return hook

    def _reduce(self, name: str, weight: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> None:
        x = x.reshape(x.shape[0], -1, x.shape[-1]).float()
        g = g.reshape(g.shape[0], -1, g.shape[-1]).float()
        step = max(1, CHUNK_ELEMENTS // weight.numel())
        rows = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        cols = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
        for start in range(0, x.shape[0], step):
            per_sample = torch.bmm(g[start : start + step].transpose(1, 2), x[start : start + step])  # (b, out, in)
            score = (per_sample * weight.float()).abs_()
            rows += score.sum(dim=(0, 2), dtype=torch.float64)
            cols += score.sum(dim=(0, 1), dtype=torch.float64)
        self.rows[name] += rows.cpu()
        self.cols[name] += cols.cpu()

    def close(self) -> dict[str, torch.Tensor]:
        """Stored tensors: sens.{name} (scalar S, shape (1,)), sens_rows.{name} (d_out), sens_cols.{name} (d_in)."""
        for handle in self._handles:
            handle.remove()
        out = {}
        n = max(1, self.samples)
        for name, module in self.modules.items():
            d_out, d_in = module.weight.shape
            out[f"sens.{name}"] = (self.rows[name].sum() / (d_out * d_in * n)).float().reshape(1)
            out[f"sens_rows.{name}"] = (self.rows[name] / (d_in * n)).float()
            out[f"sens_cols.{name}"] = (self.cols[name] / (d_out * n)).float()
        return out


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T): each position's next-token target, IGNORE past the end (labels shifted, as transformers does)."""
    return F.pad(labels, (0, 1), value=IGNORE)[:, 1:]


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ over samples of each sample's mean next-token loss, and the number of samples with a label.

    `logits` (B, T, V), `labels` (B, T) aligned with the inputs (shifted here, as transformers does).
    """
    target = next_token_targets(labels).to(logits.device)
    losses = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
    counts = (target != IGNORE).sum(dim=1)
    return (losses.sum(dim=1) / counts.clamp_min(1)).sum(), int((counts > 0).sum())


def whole_model(model: nn.Module, batches: list[dict[str, torch.Tensor]], targets: list[str]) -> dict:
    """Sensitivities from forward + backward passes through the whole model, one micro-batch at a time."""
    for p in model.parameters():
        p.requires_grad_(False)
    root = backbone(model)
    collector = SensitivityCollector({n: root.get_submodule(n) for n in targets})
    # the weights never require gradients: make the embedding output the leaf the backward starts from
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
    try:
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            loss, counted = per_sample_loss(logits, batch["labels"])
            loss.backward()
            collector.samples += counted
    finally:
        handle.remove()
    return collector.close()
