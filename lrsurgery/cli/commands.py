"""The commands of the model stages: init, train, fuse, eval and assets (the statistics commands are in
cli/stats.py, the shared pieces in cli/common.py).

Every command takes `--config FILE` (YAML or TOML); its keys are option names (dashes or
underscores) and act as defaults that flags on the command line override."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer

from lrsurgery.cli.common import ConfigOption, app, fail, timed, user_errors
from lrsurgery.data.assets import DATASETS
from lrsurgery.hf.resolve import DEFAULT_MODEL
from lrsurgery.methods import method_names


@app.command()
@user_errors
def init(
    model: str = typer.Argument(DEFAULT_MODEL, help="Model: HF folder, cached hub id, .gguf file or named default."),
    method: str = typer.Option("lora", "--method", help=f"Initialisation method: {', '.join(method_names())}."),
    rank: int = typer.Option(8, "--rank", "-r", help="Adapter rank per module."),
    alpha: float = typer.Option(None, "--alpha", help="LoRA alpha; the scale is alpha/rank (default: alpha = rank)."),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout on the adapter input during training."),
    targets: str = typer.Option(
        None, "--targets", help="Regex over module names to adapt (default: every nn.Linear in the blocks)."
    ),
    svd: str = typer.Option(None, "--svd", help="SVD for SVD-based methods: exact (default) or randomized."),
    r_share: int = typer.Option(None, "--r-share", help="dual: rank of the shared (PiSSA) module."),
    r_expert: int = typer.Option(None, "--r-expert", help="dual: rank of the gated expert module."),
    expert_dropout: float = typer.Option(None, "--expert-dropout", help="dual: expert-module dropout (default 0.05)."),
    ablation: str = typer.Option(
        None, "--ablation", help="dual: all (default), e-only, shared-only or expert-only (paper Table 4)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for random initialisations."),
    device: str = typer.Option(
        "cpu", "--device", help="Where the SVDs and TLoRA's W·C products run: cpu, cuda or cuda:N."
    ),
    stats: Path = typer.Option(None, "--stats", help="tlora: statistics folder from `lrsurgery calibrate`."),
    variant: str = typer.Option(None, "--variant", help="tlora: wc (A from SVD of W·C, default) or theory (Eq. 3)."),
    a_init: str = typer.Option(None, "--a-init", help="tlora: frozen A from wc (default), w (SVD of W) or random."),
    no_rank_adapt: bool = typer.Option(False, "--no-rank-adapt", help="tlora: every module gets --rank."),
    no_alpha_adapt: bool = typer.Option(False, "--no-alpha-adapt", help="tlora: every module gets --alpha."),
    min_rank: int = typer.Option(None, "--min-rank", help="tlora: smallest rank a module gets (0 may drop it)."),
    damping: float = typer.Option(None, "--damping", help="tlora theory: C eigenvalues + damping x their mean."),
    force: bool = typer.Option(False, "--force", help="Use statistics calibrated on another model."),
    out: Path = typer.Option(..., "-o", "--out", help="Output init artifact folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    config: Path = ConfigOption,
) -> None:
    """Cut adapters out of a model's weights and write an init artifact."""
    from lrsurgery.stages.init import run_init

    given = {
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "svd": svd,
        "stats": str(stats.resolve()) if stats else None,
        "variant": variant,
        "a_init": a_init,
        "rank_adapt": False if no_rank_adapt else None,
        "alpha_adapt": False if no_alpha_adapt else None,
        "min_rank": min_rank,
        "damping": damping,
    }
    given.update(r_share=r_share, r_expert=r_expert, expert_dropout=expert_dropout, ablation=ablation)
    if method == "dual":  # its ranks and dropout are --r-share, --r-expert, --expert-dropout
        if rank != 8 or dropout != 0.0:
            fail("--method dual takes --r-share, --r-expert and --expert-dropout, not --rank or --dropout")
        del given["rank"], given["dropout"]
    options = {k: v for k, v in given.items() if v is not None or k == "alpha"}
    with timed(out):
        run_init(
            model, method, out, options, targets=targets, seed=seed, overwrite=overwrite, force=force, device=device
        )


@app.command()
@user_errors
def train(
    init_dir: Path = typer.Argument(..., help="Init artifact folder (from `lrsurgery init`)."),
    data: str = typer.Option(..., "--data", help="Training data: local json/jsonl/csv/parquet/txt file or hub id."),
    split: str = typer.Option("train", "--split", help="Dataset split to train on."),
    task: str = typer.Option("causal", "--task", help="causal (LM or SFT) or classification."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per example (LM blocks; SFT/classification cap)."),
    text_column: str = typer.Option("text", "--text-column", help="Column with the text."),
    label_column: str = typer.Option("label", "--label-column", help="Column with the class label."),
    prompt_template: str = typer.Option(
        None, "--prompt-template", help="SFT prompt, Python format fields, e.g. 'Q: {question}\\nA:'."
    ),
    response_template: str = typer.Option(
        None, "--response-template", help="SFT response (loss is computed only on it), e.g. ' {answer}'."
    ),
    limit: int = typer.Option(None, "--limit", help="Use only the first N rows."),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps (or give --epochs)."),
    epochs: float = typer.Option(None, "--epochs", help="Passes over the data (or give --max-steps)."),
    lr: float = typer.Option(2e-4, "--lr", help="Peak learning rate."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    batch_size: int = typer.Option(4, "--batch-size", help="Examples per micro-batch per process."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    warmup_ratio: float = typer.Option(0.03, "--warmup-ratio", help="Fraction of steps of linear warmup."),
    schedule: str = typer.Option("cosine", "--schedule", help="Learning-rate schedule: cosine, linear or constant."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping norm."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16 (autocast)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Trade compute for memory."),
    seed: int = typer.Option(0, "--seed", help="Seed for data order, dropout and a new task head."),
    save_every: int = typer.Option(50, "--save-every", help="Checkpoint every N steps (for --resume)."),
    eval_data: str = typer.Option(
        None, "--eval-data", help="Held-out data (same columns and templates): its loss is logged and recorded."
    ),
    eval_split: str = typer.Option("train", "--eval-split", help="Split of --eval-data."),
    eval_every: int = typer.Option(0, "--eval-every", help="Held-out loss every N steps (0: after the last step)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    k_final: int = typer.Option(None, "--k-final", help="dual: experts kept per module at the end (default 0.75·r)."),
    t1: float = typer.Option(None, "--t1", help="dual: fraction of the run before screening starts (default 0.15)."),
    t2: float = typer.Option(None, "--t2", help="dual: fraction at which k reaches k_final, scores freeze (0.5)."),
    delta_t: int = typer.Option(None, "--delta-t", help="dual: steps between screenings (default 10)."),
    beta1: float = typer.Option(None, "--beta1", help="dual: sensitivity EMA factor (default 0.85)."),
    beta2: float = typer.Option(None, "--beta2", help="dual: uncertainty EMA factor (default 0.85)."),
    orth_weight: float = typer.Option(None, "--orth-weight", help="dual: orthogonality loss weight γ (default 0.1)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output train artifact folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    force: bool = typer.Option(False, "--force", help="Use the artifact even if the model fingerprint differs."),
    config: Path = ConfigOption,
) -> None:
    """Fine-tune an init artifact's adapters and write a train artifact."""
    from lrsurgery.data.examples import DataSpec
    from lrsurgery.training.schedule import TrainConfig
    from lrsurgery.training.trainer import run_train

    spec = DataSpec(
        path=data,
        split=split,
        task=task,
        seq_len=seq_len,
        text_column=text_column,
        label_column=label_column,
        prompt_template=prompt_template,
        response_template=response_template,
        limit=limit,
    )
    cfg = TrainConfig(
        max_steps=max_steps,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        grad_accum=grad_accum,
        warmup_ratio=warmup_ratio,
        schedule=schedule,
        max_grad_norm=max_grad_norm,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        seed=seed,
        save_every=save_every,
        eval_every=eval_every,
    )
    held_out = replace(spec, path=eval_data, split=eval_split, limit=None) if eval_data else None
    given = {"k_final": k_final, "t1": t1, "t2": t2, "delta_t": delta_t, "beta1": beta1, "beta2": beta2}
    method_options = {k: v for k, v in {**given, "orth_weight": orth_weight}.items() if v is not None}
    with timed(out):
        run_train(
            init_dir,
            spec,
            cfg,
            out,
            resume=resume,
            overwrite=overwrite,
            force=force,
            eval_data=held_out,
            method_options=method_options,
        )


@app.command()
@user_errors
def fuse(
    artifact: Path = typer.Argument(..., help="Init or train artifact folder."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder."),
    fmt: str = typer.Option(
        "hf", "--format", help="hf: merged transformers model; peft: LoRA adapter for the unmodified base."
    ),
    dtype: str = typer.Option("fp32", "--dtype", help="Dtype of the written tensors: fp32, bf16 or fp16."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest safetensors shard (hf), e.g. 500MB, 5GB."),
    max_rank: int = typer.Option(
        None, "--max-rank", help="peft: compress each module's change to rank ≤ K by SVD; reports the error."
    ),
    model: str = typer.Option(None, "--model", help="Base model to read (default: the one the artifact names)."),
    push_to_hub: str = typer.Option(None, "--push-to-hub", help="Upload the output to this Hub repo, USER/NAME."),
    private: bool = typer.Option(False, "--private", help="Create the Hub repo as private."),
    revision: str = typer.Option(None, "--revision", help="Hub branch to upload to (created if missing)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --push-to-hub: list what would be uploaded."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    force: bool = typer.Option(False, "--force", help="Use the artifact even if the model fingerprint differs."),
    config: Path = ConfigOption,
) -> None:
    """Merge edits and adapters into the weights (or export them as PEFT), optionally push to the Hub."""
    from lrsurgery.io.hub import check_repo_id, push_folder

    if fmt not in ("hf", "peft"):
        fail(f"--format must be hf or peft, got {fmt!r}")
    if max_rank is not None and fmt != "peft":
        fail("--max-rank applies to --format peft")
    if not push_to_hub and (private or revision or dry_run):
        fail("--private, --revision and --dry-run apply to --push-to-hub USER/NAME")
    if push_to_hub:
        check_repo_id(push_to_hub)
    with timed(out):
        if fmt == "hf":
            from lrsurgery.stages.fuse import run_fuse

            run_fuse(artifact, out, dtype=dtype, shard_size=shard_size, overwrite=overwrite, force=force, model=model)
        else:
            from lrsurgery.stages.export_peft import run_export_peft

            report = run_export_peft(
                artifact, out, max_rank=max_rank, dtype=dtype, overwrite=overwrite, force=force, model=model
            )
            if max_rank is not None:
                worst = max(report["module_relative_error"].items(), key=lambda kv: kv[1])
                typer.echo(
                    f"rank ≤ {max_rank}: overall relative error {report['overall_relative_error']:.3e}, "
                    f"worst module {worst[0]} {worst[1]:.3e} (all in {out}/lrsurgery_export.json)"
                )
    if push_to_hub:
        files = push_folder(out, push_to_hub, private=private, revision=revision, dry_run=dry_run)
        verb = "would upload" if dry_run else "uploaded"
        typer.echo(f"{verb} {len(files)} files to {push_to_hub}" + (":\n  " + "\n  ".join(files) if dry_run else ""))


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
    out: Path = typer.Option(None, "-o", "--out", help="Write the results JSON here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing results file written by eval."),
    config: Path = ConfigOption,
) -> None:
    """Score models on tasks and print a Markdown table."""
    from lrsurgery.evaluation import markdown_table, run_eval
    from lrsurgery.evaluation.runner import check_report_path, write_report

    inputs = [*task, *models]
    if out:
        check_report_path(out, inputs, overwrite)  # before any model is scored
    report = run_eval(
        models,
        task,
        limit=limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        allow_code_execution=allow_code_execution,
        dtype=dtype,
    )
    typer.echo(markdown_table(report))
    if out:
        write_report(report, out, inputs, overwrite)


@app.command()
@user_errors
def assets(
    name: str = typer.Argument(..., help=f"Offline data set to prepare: {', '.join(DATASETS)}."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for train.jsonl and test.jsonl."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a data folder written by `assets`."),
    config: Path = ConfigOption,
) -> None:
    """Write an offline data package as JSONL files usable with --data."""
    from lrsurgery.data.assets import run_assets

    typer.echo(json.dumps(run_assets(name, out, overwrite)))
