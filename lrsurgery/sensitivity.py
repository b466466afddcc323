"""Module sensitivity S(W) = mean over weights of |w · ∂L/∂w| (TLoRA Eq. 5, Alg. 1 line 8).

Choice (the paper says "averaged over calibration samples"): the gradient is taken per sample
(one sequence, its mean token loss), |W ⊙ ∇W| is reduced at once to its total, row sums and column
sums, and those are averaged over samples. Stored per module: the scalar S, the per-output-row
means (d_out) and the per-input-column means (d_in). Full weight gradients are never kept: a
post-accumulate-grad hook reduces each gradient as soon as it exists and frees it.

Two paths give the same numbers:
- `whole_model`: forward + backward through the whole model, one sample at a time;
- `sequential`: forward block by block keeping block inputs on CPU, the loss from the last block's
  output, then backward block by block in reverse, recomputing each block from its stored input and
  passing the input gradient down, so only one block's weights and gradients are resident at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lrsurgery.models import backbone, block_list


class SensitivityCollector:
    """Post-accumulate-grad hooks reducing |W ⊙ ∇W| of each target weight, per sample."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self.rows = {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in modules.items()}
        self.cols = {n: torch.zeros(m.weight.shape[1], dtype=torch.float64) for n, m in modules.items()}
        self.samples = 0
        self._handles = []
        for name, module in modules.items():
            module.weight.requires_grad_(True)
            self._handles.append(module.weight.register_post_accumulate_grad_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(weight: torch.Tensor) -> None:
            score = (weight.detach() * weight.grad).abs().double()
            self.rows[name] += score.sum(dim=1).cpu()
            self.cols[name] += score.sum(dim=0).cpu()
            weight.grad = None  # never keep the full gradient

        return hook

    def close(self) -> dict[str, torch.Tensor]:
        """Stored tensors: sens.{name} (scalar S), sens_rows.{name} (d_out), sens_cols.{name} (d_in)."""
        for handle in self._handles:
            handle.remove()
        out = {}
        for name, module in self.modules.items():
            module.weight.requires_grad_(False)
            d_out, d_in = module.weight.shape
            n = max(1, self.samples)
            out[f"sens.{name}"] = (self.rows[name].sum() / (d_out * d_in * n)).float().reshape(1)
            out[f"sens_rows.{name}"] = (self.rows[name] / (d_in * n)).float()
            out[f"sens_cols.{name}"] = (self.cols[name] / (d_out * n)).float()
        return out


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def whole_model(model: nn.Module, samples: list[dict[str, torch.Tensor]], targets: list[str]) -> dict:
    """Sensitivities from full forward + backward passes, one sample at a time."""
    _freeze(model)
    root = backbone(model)
    collector = SensitivityCollector({n: root.get_submodule(n) for n in targets})
    for sample in samples:
        model(**sample, use_cache=False).loss.backward()
        collector.samples += 1
    return collector.close()


class _Replay(nn.Module):
    """Stands in for the block list's only entry: returns a stored hidden state, ignoring its input."""

    def __init__(self, hidden: torch.Tensor, like: Any):
        super().__init__()
        self.hidden = hidden
        self.like = like

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.hidden,) if isinstance(self.like, (tuple, list)) else self.hidden


def sequential(
    model: nn.Module,
    samples: list[dict[str, torch.Tensor]],
    targets: list[str],
    captured: list[tuple],
    device: torch.device | str = "cpu",
) -> dict:
    """Sensitivities with one block's weights and gradients resident at a time (see module doc).

    `captured[i]` is (hidden, kwargs, args) reaching the first block for sample i.
    """
    _freeze(model)
    prefix, blocks = block_list(model)
    root = backbone(model)
    parent = root.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else root
    attr = prefix.rpartition(".")[2]
    results: dict[str, torch.Tensor] = {}
    collectors = []
    for index in range(len(blocks)):
        names = {n: root.get_submodule(n) for n in targets if n.startswith(f"{prefix}.{index}.")}
        collectors.append(SensitivityCollector(names))
    for sample, (hidden, kwargs, args) in zip(samples, captured, strict=True):
        inputs = [hidden]
        with torch.no_grad():  # forward, keeping every block's input on CPU
            for block in blocks:
                result = block.to(device)(inputs[-1].to(device), *args, **kwargs)
                block.to("cpu")
                out = result[0] if isinstance(result, (tuple, list)) else result
                inputs.append(out.cpu())
        last = inputs[-1].clone().requires_grad_(True)
        original = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList([_Replay(last, result)]))
        try:  # the model's own head and loss on top of the last block's output
            model(**sample, use_cache=False).loss.backward()
        finally:
            setattr(parent, attr, original)
        grad = last.grad
        for index in reversed(range(len(blocks))):
            block = blocks[index].to(device)
            x = inputs[index].to(device).requires_grad_(True)
            result = block(x, *args, **kwargs)
            out = result[0] if isinstance(result, (tuple, list)) else result
            out.backward(grad.to(device))
            grad = x.grad.cpu()
            block.to("cpu")
        for collector in collectors:
            collector.samples += 1
    for collector in collectors:
        results.update(collector.close())
    return results
