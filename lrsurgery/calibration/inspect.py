"""Summaries of a stats artifact: covariance spectra, the sensitivity grid and its heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lrsurgery.calibration.covariance import CalibrationError
from lrsurgery.calibration.stats_file import CovarianceReader, load_sensitivity
from lrsurgery.errors import ArtifactError
from lrsurgery.io.outputs import output_file
from lrsurgery.linalg.basics import all_finite


def summarise(stats: Path) -> list[dict[str, Any]]:
    """Per stored covariance: trace, effective rank (exp of the eigenvalue entropy) and condition number."""
    reader = CovarianceReader(stats)
    owners = {name: reader.owner(name) for name in reader.modules}
    rows = []
    for name in sorted(set(owners.values()), key=list(owners).index):
        covariance = reader.get(name).double()
        if not all_finite(covariance):
            raise ArtifactError(f"{stats} holds NaN or Inf in the covariance of {name}: it is damaged")
        eig = torch.linalg.eigvalsh(covariance).clamp_min(0)
        p = eig / eig.sum()
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
        shared = sorted(n for n, owner in owners.items() if owner == name)
        rows.append(
            {
                "covariance": name,
                "shared_by": shared,
                "dim": eig.numel(),
                "trace": float(eig.sum()),
                "effective_rank": float(torch.tensor(entropy).exp()),
                "condition": float(eig.max() / eig.min()) if eig.min() > 0 else float("inf"),
            }
        )
    return rows


def sensitivity_grid(stats: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """S(W) arranged as (block index, module type): the block labels, the type labels and the grid.

    A module `…{prefix}.{i}.{rest}` goes to row i and column `rest`; cells without a module are NaN.
    """
    values = load_sensitivity(stats)
    cells: dict[tuple[int, str], float] = {}
    for name, value in values.items():
        parts = name.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is None:
            continue
        cells[(int(parts[index]), ".".join(parts[index + 1 :]))] = value
    blocks = sorted({b for b, _ in cells})
    kinds = sorted({k for _, k in cells})
    grid = torch.full((len(blocks), len(kinds)), float("nan"))
    for (b, k), value in cells.items():
        grid[blocks.index(b), kinds.index(k)] = value
    return [str(b) for b in blocks], kinds, grid


PNG_SOFTWARE = "lrsurgery"  # the PNG's Software text: marks a figure lrsurgery may overwrite


def png_kind(path: Path) -> str | None:
    """ "figure" when `path` is a PNG whose Software text chunk says lrsurgery wrote it, else None."""
    try:
        data = path.read_bytes()[:4096]
    except OSError:
        return None
    ours = data.startswith(b"\x89PNG") and b"tEXtSoftware\x00" + PNG_SOFTWARE.encode() in data
    return "figure" if ours else None


def save_heatmap(stats: Path, png: Path, overwrite: bool = False) -> Path:
    """Write a PNG heatmap of sensitivity by block × module type (needs matplotlib); return `png`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise CalibrationError("--heatmap needs matplotlib: pip install matplotlib") from exc
    blocks, kinds, grid = sensitivity_grid(stats)
    fig, ax = plt.subplots(figsize=(2.0 + 0.9 * len(kinds), 2.5 + 0.22 * len(blocks)))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(blocks)), blocks)
    ax.set_xlabel("module")
    ax.set_ylabel("block")
    ax.set_title("sensitivity mean |w · ∂L/∂w|")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with output_file(png, "figure", png_kind, [stats], overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": PNG_SOFTWARE})
    plt.close(fig)
    return png
