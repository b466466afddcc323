"""Gram matrices accumulated on their upper triangle, panel by panel."""

from __future__ import annotations

import torch


def _panel(d: int) -> int:
    """Column-panel width for `add_gram_upper`: up to 6 panels of at least 96 columns."""
    return -(-d // max(1, min(6, d // 96)))


def add_gram_upper(
    total: torch.Tensor | None, rows: torch.Tensor, right: torch.Tensor | None = None, beta: float = 1.0
) -> torch.Tensor:
    """beta·`total` + rowsᵀ·right (right defaults to rows: the Gram rowsᵀ·rows) for (t, d) matrices or
    (batch, t, d) stacks, computed on and above the diagonal only; what lies below it is not kept
    (`symmetrize_upper_` fills it in). With beta = 0, `total` is only written to (its contents, NaN
    included, are ignored).

    The d columns are cut into panels and each panel is one GEMM against the columns from its
    diagonal on: about 7/12 of the full product's flops, as BLAS `syrk` would do, which PyTorch does
    not expose.
    """
    right = rows if right is None else right
    d, step = rows.shape[-1], _panel(rows.shape[-1])
    if total is None:
        total, beta = rows.new_empty(*rows.shape[:-2], d, d), 0.0
    for start in range(0, d, step):
        panel = total[..., start : start + step, start:]
        left, ahead = rows[..., start : start + step], right[..., start:]
        if rows.ndim == 2:
            panel.addmm_(left.T, ahead, beta=beta)
        else:
            panel.baddbmm_(left.mT, ahead, beta=beta)
    return total


def symmetrize_upper_(total: torch.Tensor) -> torch.Tensor:
    """Make `total` (from `add_gram_upper`) the exactly symmetric matrix its upper triangle gives, in
    place, one panel at a time (no full-size temporaries)."""
    d, step = total.shape[-1], _panel(total.shape[-1])
    for start in range(0, d, step):
        stop = start + step
        diagonal = total[..., start:stop, start:stop]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).mT)
        total[..., stop:, start:stop] = total[..., start:stop, stop:].mT
    return total
