"""What a finished train run says about itself: its summary lines, and SRLoRA's active intervals as a figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lrsurgery.calibration.inspect import PNG_SOFTWARE, png_kind
from lrsurgery.errors import ArtifactError, UserError
from lrsurgery.io.artifacts import Manifest
from lrsurgery.io.outputs import output_file
from lrsurgery.methods.srlora import INTERVALS_FILE


def run_summary(run: Path, manifest: Manifest) -> list[str]:
    """Markdown lines: the method, steps and losses of a train run, and what its method recorded."""
    config = manifest.config
    losses = [json.loads(line)["loss"] for line in _lines(run / "metrics.jsonl")]
    lines = [
        f"method {config.get('method')}, {config.get('steps')} optimizer steps, "
        f"{manifest.extra.get('trainable_parameters')} trainable parameters",
    ]
    if losses:
        lines.append(f"loss: first step {losses[0]:.4f}, last step {losses[-1]:.4f}")
    if "eval" in manifest.extra:
        lines.append(f"held-out loss {manifest.extra['eval']['loss']:.4f}")
    srlora = manifest.extra.get("srlora")
    if srlora:
        steps = ", ".join(map(str, srlora["switch_steps"])) or "none"
        lines.append(
            f"srlora: switches at steps {steps} (every {srlora['interval']}, {srlora['recycled_per_switch']} pairs "
            f"each); directions used {srlora['directions_used']} of {srlora['r_target']}"
            + ("; reserve exhausted" if srlora["reserve_exhausted"] else "")
        )
    return lines


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


def read_intervals(run: Path) -> dict[str, Any]:
    """The run's SRLoRA record (srlora_intervals.json): steps, rank, r_target, and per module the rows
    [direction, slot, first step, last step]."""
    path = run / INTERVALS_FILE
    if not path.is_file():
        raise ArtifactError(f"{run} has no {INTERVALS_FILE}: only an srlora train run records active intervals")
    try:
        record = json.loads(path.read_text())
        modules = record["modules"]
        assert isinstance(modules, dict) and all(isinstance(rows, list) for rows in modules.values())
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise ArtifactError(f"{path} is damaged ({exc!r}); it is written by `lrsurgery train`") from exc
    return record


def save_intervals_plot(run: Path, png: Path, block: int | None = None, overwrite: bool = False) -> Path:
    """Draw the active intervals of every direction of one block's modules (the paper's Fig. 5): a panel per
    module, a row per direction in singular-value order, a bar per stretch of steps it was trained. `block`
    defaults to the middle block. Returns `png`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from exc
    record = read_intervals(run)
    by_block: dict[str, list[str]] = {}
    for name in record["modules"]:
        by_block.setdefault(_block_of(name), []).append(name)
    blocks = list(by_block)
    chosen = blocks[len(blocks) // 2] if block is None else str(block)
    if chosen not in by_block:
        raise UserError(f"--block {block}: the run has blocks {', '.join(blocks)}")
    names = by_block[chosen]
    fig, axes = plt.subplots(
        1, len(names), figsize=(2.2 * len(names) + 1, 0.12 * record["r_target"] + 2.2), sharey=True, squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=True):
        for direction, slot, start, end in record["modules"][name]:
            ax.barh(direction, end - start, left=start, height=0.8, color=f"C{slot % 10}")
        ax.set_title(name.rsplit(".", 1)[-1], fontsize=9)
        ax.set_xlim(0, record["steps"])
        ax.set_ylim(record["r_target"] - 0.5, -0.5)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("singular direction")
    fig.suptitle(f"SRLoRA active intervals, block {chosen} (colour: slot)")
    fig.tight_layout()
    with output_file(png, "figure", png_kind, [run], overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": PNG_SOFTWARE})
    plt.close(fig)
    return png


def _block_of(name: str) -> str:
    """The block index in a module name (`layers.3.self_attn.q_proj` → "3"), or "" for none."""
    return next((part for part in name.split(".") if part.isdigit()), "")
