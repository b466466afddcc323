"""Loading a resolved model folder: the model class for a task, the tokenizer, an empty (meta-device)
model, the compute device, and the record of the model an artifact's manifest keeps."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsurgery.errors import first_line
from lrsurgery.hf.resolve import ModelError, model_config, model_fingerprint, resolve_model


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    folder: Path
    source: str

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on (its first parameter's)."""
        return next(self.model.parameters()).device

    def inputs(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """`tensors` on the model's device, as keyword arguments for its forward or `generate`."""
        device = self.device
        return {name: tensor.to(device) for name, tensor in tensors.items()}


TASKS = ("causal", "classification", "base")


def model_class(task: str) -> Any:
    """The transformers Auto class a model for `task` is loaded as: AutoModelForCausalLM ('causal'),
    AutoModelForSequenceClassification ('classification'), AutoModel ('base', the bare backbone)."""
    import transformers

    names = {"causal": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification"}
    return getattr(transformers, names.get(task, "AutoModel"))


def load_model(
    spec: str | os.PathLike,
    task: str = "causal",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a model and its tokenizer for `task` ('causal', 'classification' or 'base').

    'classification' adds a fresh sequence-classification head with `num_labels` outputs; 'base'
    loads the bare backbone (AutoModel), the class encoder-only checkpoints are usually saved as.
    """
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; use causal, classification or base")
    if task == "classification" and not num_labels:
        raise ModelError("a classification model needs num_labels")
    folder = resolve_model(spec)
    labels = {"num_labels": num_labels} if task == "classification" else {}
    try:
        model = model_class(task).from_pretrained(folder, dtype=dtype, **labels)
    except (ValueError, RuntimeError, OSError) as exc:  # mis-shaped or unreadable weights, bad config
        raise ModelError(f"cannot load {spec} for task {task!r}: {first_line(exc)}") from exc
    tokenizer = load_tokenizer(folder)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, folder=folder, source=str(spec))


def load_tokenizer(folder: Path) -> Any:
    """The model folder's tokenizer, with EOS as the padding token when it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError, TypeError) as exc:
        raise ModelError(f"cannot load the tokenizer of {folder}: {first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_task(folder: Path) -> str:
    """'causal' for a checkpoint saved as a causal LM, else 'base' (the bare backbone)."""
    import json

    architectures = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    return "causal" if any(a.endswith("ForCausalLM") for a in architectures) else "base"


def empty_model(folder: Path, buffers: bool = True) -> nn.Module:
    """The checkpoint's model (the class `default_task` says it was saved as) with its parameters on the
    meta device: its config, module tree and names without reading or allocating a single weight.
    With `buffers`, buffers (rotary tables and the like) are real, so the blocks run once their weights
    are filled in; without, everything is on the meta device (names and shapes only, built faster:
    transformers skips initialising weights there)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False) if buffers else torch.device("meta"):
        model = model_class(default_task(folder)).from_config(config)
    return model.eval()


def compute_device(spec: str) -> torch.device:
    """The torch device named by a `--device` value (cpu, cuda, cuda:N), checked to exist here."""
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ModelError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {spec}: no CUDA device is available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ModelError(f"--device {spec!r} is not supported; use cpu, cuda or cuda:N")
    return device


def model_record(loaded: LoadedModel) -> dict[str, Any]:
    """What a manifest says about the model an artifact was made from."""
    config = loaded.model.config
    source = Path(loaded.source)
    return {  # local paths absolute, so the artifact finds its base model from any working folder
        "source": str(source.resolve()) if source.exists() else loaded.source,
        "folder": str(Path(loaded.folder).resolve()),
        "fingerprint": model_fingerprint(loaded.folder),
        "config": model_config(loaded.folder),
        "model_type": getattr(config, "model_type", None),
        "architectures": getattr(config, "architectures", None),
    }
