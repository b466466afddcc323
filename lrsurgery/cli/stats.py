"""`lrsurgery calibrate`, `merge-stats` and `inspect`: the commands that make and read stats artifacts."""

from __future__ import annotations

from pathlib import Path

import typer

from lrsurgery.cli.common import ConfigOption, app, timed, user_errors
from lrsurgery.hf.resolve import DEFAULT_MODEL


@app.command()
@user_errors
def calibrate(
    model: str = typer.Argument(DEFAULT_MODEL, help="Model: HF folder, cached hub id, .gguf file or named default."),
    data: str = typer.Option(..., "--data", help="Calibration data: local file or hub id (its `text` column)."),
    split: str = typer.Option("train", "--split", help="Dataset split."),
    text_column: str = typer.Option("text", "--text-column", help="Column with the text."),
    prompt_template: str = typer.Option(
        None, "--prompt-template", help="Prompt/response data: prompt in Python format syntax (as for train)."
    ),
    response_template: str = typer.Option(None, "--response-template", help="Response template (as for train)."),
    tokens: str = typer.Option(
        "all", "--tokens", help="Tokens whose activations count: all, or response (prompt/response data)."
    ),
    samples: int = typer.Option(32, "--samples", help="Calibration sequences."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per sequence."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per forward pass."),
    collect: str = typer.Option(
        "covariance", "--collect", help="Statistics to collect: covariance, sensitivity or both (comma-separated)."
    ),
    sensitivity_path: str = typer.Option(
        "sequential", "--sensitivity-path", help="sequential: one block resident at a time; whole: whole model."
    ),
    dtype: str = typer.Option("fp32", "--dtype", help="Accumulation dtype: fp32 or fp64."),
    device: str = typer.Option("cpu", "--device", help="Where each block runs: cpu or cuda."),
    offload: str = typer.Option(
        "cpu", "--offload", help="cpu: model in RAM; disk: each block read from the safetensors when it runs."
    ),
    targets: str = typer.Option(None, "--targets", help="Regex over module names (default: block linears)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted calibration."),
    out: Path = typer.Option(..., "-o", "--out", help="Output statistics folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing statistics folder."),
    config: Path = ConfigOption,
) -> None:
    """Collect input-activation covariances and/or sensitivities of every target linear, block by block."""
    from lrsurgery.calibration.runner import CalibrateConfig, run_calibrate
    from lrsurgery.data.examples import DataSpec

    wanted = tuple(c.strip() for c in collect.split(",") if c.strip())
    cfg = CalibrateConfig(
        samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        targets=targets,
        collect=wanted,
        sensitivity_path=sensitivity_path,
        offload=offload,
        tokens=tokens,
    )
    spec = DataSpec(
        path=data,
        split=split,
        text_column=text_column,
        prompt_template=prompt_template,
        response_template=response_template,
    )
    with timed(out):
        run_calibrate(model, spec, cfg, out, resume=resume, overwrite=overwrite)


@app.command("merge-stats")
@user_errors
def merge_stats_cmd(
    stats: list[Path] = typer.Argument(..., help="Two or more stats artifacts of the same model."),
    out: Path = typer.Option(..., "-o", "--out", help="Output statistics folder."),
    force: bool = typer.Option(False, "--force", help="Merge even if the model fingerprints differ."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing statistics folder."),
    config: Path = ConfigOption,
) -> None:
    """Add calibration statistics gathered on different data (sums and token counts add)."""
    from lrsurgery.io.stats_file import merge_stats

    with timed(out):
        merge_stats(stats, out, force=force, overwrite=overwrite)


@app.command()
@user_errors
def inspect(
    stats: Path = typer.Argument(..., help="A stats artifact (from `lrsurgery calibrate`)."),
    top: int = typer.Option(10, "--top", help="Modules shown in the sensitivity ranking (0: all)."),
    heatmap: Path = typer.Option(None, "--heatmap", help="Also write a PNG of sensitivity by block x module."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a heatmap PNG written by lrsurgery."),
    config: Path = ConfigOption,
) -> None:
    """Summarise a stats artifact: covariance trace, effective rank and condition; sensitivity ranking."""
    from lrsurgery.calibration.inspect import png_kind, save_heatmap, summarise
    from lrsurgery.errors import check_count
    from lrsurgery.io.artifacts import read_manifest
    from lrsurgery.io.outputs import check_output
    from lrsurgery.io.stats_file import load_sensitivity

    check_count("--top", top, 0)
    manifest = read_manifest(stats, "stats")
    if heatmap:
        check_output(heatmap, [stats], overwrite, "figure", png_kind, what="file")
    if "covariance" in manifest.config["collect"]:
        typer.echo("| covariance | shared by | dim | trace | effective rank | condition |")
        typer.echo("|---|---|---|---|---|---|")
        for row in summarise(stats):
            shared = ", ".join(n.rsplit(".", 1)[-1] for n in row["shared_by"])
            typer.echo(
                f"| {row['covariance']} | {shared} | {row['dim']} | {row['trace']:.4g} | "
                f"{row['effective_rank']:.1f} | {row['condition']:.3g} |"
            )
    if "sensitivity" in manifest.extra:
        ranking = sorted(load_sensitivity(stats).items(), key=lambda kv: -kv[1])
        total = sum(v for _, v in ranking) or float("nan")  # all zero: no shares to show
        typer.echo("\n| rank | module | sensitivity | share |\n|---|---|---|---|")
        for i, (name, value) in enumerate(ranking[: top or None], start=1):
            typer.echo(f"| {i} | {name} | {value:.4g} | {value / total:.1%} |")
    if heatmap:
        typer.echo(f"heatmap written to {save_heatmap(stats, heatmap, overwrite)}")
