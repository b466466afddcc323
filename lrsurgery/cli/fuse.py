"""`lrsurgery fuse`: merge an artifact into its base model, or export it as a PEFT adapter; push to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lrsurgery.cli.common import ConfigOption, ForceOption, OverwriteOption, app, out_option, timed, user_errors
from lrsurgery.cli.options import config_options, with_options
from lrsurgery.stages.fuse import FuseConfig


@app.command()
@user_errors
@with_options(fuse=config_options(FuseConfig))
def fuse(
    artifact: Path = typer.Argument(..., help="Init or train artifact folder."),
    out: Path = out_option("folder"),
    overwrite: bool = OverwriteOption,
    force: bool = ForceOption,
    config: Path = ConfigOption,
    *,
    fuse: dict[str, Any],
) -> None:
    """Merge edits and adapters into the weights (or export them as PEFT), optionally push to the Hub."""
    from lrsurgery.io.hub import push_folder
    from lrsurgery.stages.export_peft import run_export_peft
    from lrsurgery.stages.fuse import run_fuse

    cfg = FuseConfig(**fuse)  # every option checked before anything is read
    with timed(out):
        if cfg.format == "hf":
            run_fuse(artifact, out, overwrite, force, **fuse)
        else:
            report = run_export_peft(artifact, out, overwrite, force, **fuse)
            if cfg.max_rank is not None:
                worst = max(report["module_relative_error"].items(), key=lambda kv: kv[1])
                typer.echo(
                    f"rank ≤ {cfg.max_rank}: overall relative error {report['overall_relative_error']:.3e}, "
                    f"worst module {worst[0]} {worst[1]:.3e} (all in {out}/lrsurgery_export.json)"
                )
    if cfg.push_to_hub:
        files = push_folder(out, cfg.push_to_hub, private=cfg.private, revision=cfg.revision, dry_run=cfg.dry_run)
        verb = "would upload" if cfg.dry_run else "uploaded"
        listing = ":\n  " + "\n  ".join(files) if cfg.dry_run else ""
        typer.echo(f"{verb} {len(files)} files to {cfg.push_to_hub}{listing}")
