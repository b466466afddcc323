"""`lrsurgery eval`: score models and artifacts on lm-evaluation-harness task files."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from lrsurgery.cli.common import ConfigOption, app, owns_process, user_errors


@app.command("eval")
@user_errors
def eval_(
    models: list[str] = typer.Argument(
        ..., help="Model folders/names or init/train artifacts (several: side by side)."
    ),
    task: list[Path] = typer.Option(..., "--task", help="Task YAML file, lm-evaluation-harness format (repeatable)."),
    limit: int = typer.Option(None, "--limit", help="Score only the first N documents of each task."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences (contexts, prompts) per forward pass."),
    num_fewshot: int = typer.Option(
        None, "--num-fewshot", help="Few-shot examples per prompt (overrides the task's num_fewshot)."
    ),
    allow_code_execution: bool = typer.Option(
        False, "--allow-code-execution", help="Run model-written programs (pass@1 tasks such as HumanEval)."
    ),
    dtype: str = typer.Option("fp32", "--dtype", help="Dtype the models run in: fp32, bf16, fp16 or fp64."),
    device: str = typer.Option("cpu", "--device", help="Where the models run: cpu, cuda or cuda:N."),
    out: Path = typer.Option(None, "-o", "--out", help="Write the results JSON here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing results file written by eval."),
    config: Path = ConfigOption,
) -> None:
    """Score models on tasks and print a Markdown table."""
    from lrsurgery.evaluation import markdown_table, run_eval
    from lrsurgery.evaluation.runner import results_file, write_report
    from lrsurgery.io.memory import keep_freed_memory

    if owns_process():  # process-wide: not under a Python caller whose later work must return its memory
        keep_freed_memory()  # each batch reuses the last one's buffers instead of faulting in fresh pages
    with results_file(out, [*task, *models], overwrite) if out else contextlib.nullcontext() as path:
        report = run_eval(
            models,
            task,
            limit=limit,
            batch_size=batch_size,
            num_fewshot=num_fewshot,
            allow_code_execution=allow_code_execution,
            dtype=dtype,
            device=device,
        )
        typer.echo(markdown_table(report))
        if path is not None:
            write_report(report, path)
