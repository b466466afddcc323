"""Model cards and pushing a fused or exported folder to the Hugging Face Hub.

The token comes from huggingface_hub's usual places (HF_TOKEN, `hf auth login`); it is never printed
or written into any file. Any failure to push leaves the local folder exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lrsurgery.errors import UserError
from lrsurgery.io.artifacts import Manifest
from lrsurgery.io.outputs import write_text_atomic


class PushError(UserError, RuntimeError):
    """The folder could not be pushed (offline, unauthorised, or the Hub refused)."""


def _eval_results(artifact: Path) -> list[str]:
    """Markdown rows from any `lrsurgery eval -o` results JSON stored in the artifact folder."""
    rows = []
    for path in sorted(artifact.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if not isinstance(report, dict) or "results" not in report:
            continue
        for model, tasks in report["results"].items():
            for task, metrics in tasks.items():
                for metric, value in metrics.items():
                    if isinstance(value, float) and not metric.endswith("_stderr"):
                        rows.append(f"| {task} | {metric} | {value:.4f} | {Path(model).name} |")
    return rows


def model_card(manifest: Manifest, artifact: Path, fmt: str) -> str:
    """A README.md: method, ranks, base model, data fingerprints and eval results found with the artifact."""
    modules: dict[str, Any] = manifest.extra.get("modules", {})
    ranks = sorted({info["rank"] for info in modules.values()})
    method = manifest.config.get("method", "unknown")
    base = manifest.model.get("source", "unknown")
    data = manifest.data or {}
    stats = manifest.config.get("stats_fingerprint") or "none"
    hub_id = "/" in str(base) and not str(base).startswith(("/", ".", "~"))
    lines = [
        "---",
        *([f"base_model: {base}"] if hub_id else []),
        "library_name: " + ("peft" if fmt == "peft" else "transformers"),
        "tags:",
        "- lrsurgery",
        f"- {method}",
        "---",
        "",
        f"# {method} fine-tune of {Path(str(base)).name}",
        "",
        f"Made with lrsurgery {manifest.lrsurgery_version}: `{method}` adapters on {len(modules)} modules, "
        f"rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}–{ranks[-1]}'}, "
        + ("merged into the weights." if fmt == "hf" else "exported as a PEFT LoRA adapter."),
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| base weights fingerprint | `{manifest.model.get('fingerprint', '')[:16]}` |",
        f"| method | `{method}` |",
        f"| options | `{json.dumps(manifest.config.get('options', {}), sort_keys=True)}` |",
        f"| calibration statistics fingerprint | `{stats}` |",
        f"| training data | `{data.get('path', 'none')}` ({data.get('examples', 0)} examples) |",
        f"| training data fingerprint | `{str(data.get('fingerprint', 'none'))[:16]}` |",
        f"| training steps | {manifest.config.get('steps', 0)} |",
    ]
    results = _eval_results(artifact)
    if results:
        lines += ["", "## Evaluation", "", "| task | metric | value | model |", "|---|---|---|---|", *results]
    return "\n".join(lines) + "\n"


def write_model_card(folder: Path, manifest: Manifest, artifact: Path, fmt: str) -> None:
    write_text_atomic(folder / "README.md", model_card(manifest, artifact, fmt))


def check_repo_id(repo_id: str) -> None:
    """Refuse a Hub repository name that the Hub would refuse (before any work is done)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"--push-to-hub {repo_id!r} is not a valid repository name (USER/NAME): {exc}") from exc
    if "/" not in repo_id:
        raise PushError(f"--push-to-hub {repo_id!r}: give the repository as USER/NAME (or ORG/NAME)")


def push_folder(
    folder: Path, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False
) -> list[str]:
    """Create `repo_id` (if needed) and upload `folder`; return the uploaded file names.

    With `dry_run`, only list what would be uploaded.
    """
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if dry_run:
        return files
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            revision=revision,
            commit_message="Upload model made with lrsurgery",
        )
    except OfflineModeIsEnabled as exc:
        raise PushError(
            f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE); the output in {folder} is intact"
        ) from exc
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        why = "not authorised (log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else str(exc)
        raise PushError(f"cannot push to {repo_id}: {why}; the output in {folder} is intact") from exc
    except Exception as exc:  # no connection, DNS, TLS...: the HTTP stack raises many types
        raise PushError(
            f"cannot push to {repo_id}: {type(exc).__name__}: {exc}; the output in {folder} is intact"
        ) from exc
    return files
