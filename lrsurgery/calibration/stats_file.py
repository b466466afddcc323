"""The stats artifact's files (written block by block by `lrsurgery calibrate`): writing, reading, merging.

Layout: `manifest.json` (`extra.modules[name]` = {covariance owner, file, tokens}; `extra.sensitivity`
= {file, samples, path}; `extra.sequence_sums` true when the blocks hold per-sequence sums),
`block_NNNN.safetensors` holding `cov.{owner}` = Σ xᵀx (d_in, d_in), `seqsum.{owner}` = each sequence's
Σ_t x_t (sequences, d_in) and `seq_tokens` = each sequence's token count (sequences,), and
`sensitivity.safetensors` holding `sens.{name}` (1,), `sens_rows.{name}` (d_out), `sens_cols.{name}` (d_in)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from lrsurgery.calibration.covariance import CalibrationError
from lrsurgery.errors import ArtifactError
from lrsurgery.io.artifacts import Manifest, load_tensors, read_manifest, save_tensors, write_manifest
from lrsurgery.io.outputs import check_output, output_folder
from lrsurgery.linalg.basics import all_finite


def write_block(
    work: Path,
    index: int,
    sums: dict[str, torch.Tensor],
    share: dict[str, str],
    tokens: int,
    sequences: tuple[dict[str, torch.Tensor], torch.Tensor],
) -> None:
    """Write block `index`'s covariance sums (`sums`: owner → (d_in, d_in) Σ xᵀx) and per-sequence sums
    (`sequences`: owner → (sequences, d_in) Σ_t x_t, and the (sequences,) token counts) atomically, then
    record each module (`share`: module → the owner whose input it shares) in the manifest: the resume point."""
    sequence_sums, sequence_tokens = sequences
    tensors = {f"cov.{name}": s for name, s in sums.items()}
    tensors.update({f"seqsum.{name}": s for name, s in sequence_sums.items()})
    tensors["seq_tokens"] = sequence_tokens
    save_tensors(work / f"block_{index:04d}.safetensors", tensors)
    manifest = read_manifest(work)
    for name, owner in share.items():
        file = f"block_{index:04d}.safetensors"
        manifest.extra["modules"][name] = {"covariance": owner, "file": file, "tokens": tokens}
    manifest.extra["completed"] = index + 1
    manifest.extra["tokens"] = tokens
    write_manifest(work, manifest)


def write_sensitivity(work: Path, tensors: dict[str, torch.Tensor], samples: int, path: str) -> None:
    """Write the sensitivity file (`sens.*`, `sens_rows.*`, `sens_cols.*`: means over `samples` samples,
    collected along `path`, sequential or whole) and record it in the manifest."""
    save_tensors(work / "sensitivity.safetensors", tensors)
    manifest = read_manifest(work)
    manifest.extra["sensitivity"] = {"file": "sensitivity.safetensors", "samples": samples, "path": path}
    manifest.extra.pop("sensitivity_next", None)
    write_manifest(work, manifest)


def negative_diagonal(sums: torch.Tensor) -> bool:
    """Whether the sum XᵀX `sums` has a negative diagonal entry (so it cannot be one: the file is damaged).
    Its finiteness is checked by each reader, which names the module."""
    diagonal = torch.diagonal(sums)
    return bool((diagonal[torch.isfinite(diagonal)] < 0).any())


def stats_fingerprint(manifest: Manifest) -> str:
    """A short digest naming a calibration: its model's and data's fingerprints and its settings."""
    record = [manifest.model.get("fingerprint"), manifest.data, manifest.config]
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_sensitivity(stats: Path) -> dict[str, float]:
    """S(W) per module from a stats artifact collected with sensitivity."""
    return {k[len("sens.") :]: float(v) for k, v in sensitivity_tensors(stats).items() if k.startswith("sens.")}


def sensitivity_tensors(stats: Path) -> dict[str, torch.Tensor]:
    """Every stored sensitivity tensor (scalars, row and column means) of a stats artifact."""
    manifest = read_manifest(stats, "stats")
    if "sensitivity" not in manifest.extra:
        raise ArtifactError(f"{stats} has no sensitivities (calibrate with --collect covariance,sensitivity)")
    path = Path(stats) / manifest.extra["sensitivity"]["file"]
    tensors = load_tensors(path)
    for name, value in tensors.items():  # means of |w · g|: finite and ≥ 0, or the file is damaged
        module = name.split(".", 1)[-1]
        if not all_finite(value):
            raise ArtifactError(f"{path} holds a non-finite sensitivity for {module}: it is damaged")
        if bool((value < 0).any()):
            raise ArtifactError(f"{path} holds a negative sensitivity for {module} (a mean of |w·g|): it is damaged")
    return tensors


class CovarianceReader:
    """Reads C = XᵀX / n of any module of a stats artifact, one stored tensor at a time."""

    def __init__(self, stats: Path):
        self.stats = Path(stats)
        self.modules = read_manifest(stats, "stats").extra["modules"]

    def get(self, module: str) -> torch.Tensor:
        """C for `module`, (d_in, d_in) in the stored dtype (a shared covariance is read from its owner)."""
        sums, tokens = self.sums(module)
        return sums / tokens

    def shape(self, module: str) -> tuple[int, ...]:
        """The stored shape of `module`'s covariance, read from the file's header only."""
        return tuple(self._open(module, lambda handle, owner: handle.get_slice(f"cov.{owner}").get_shape()))

    def owner(self, module: str) -> str:
        """The module whose covariance `module` shares (itself, or e.g. q_proj for k_proj and v_proj)."""
        return self._entry(module)["covariance"]

    def _entry(self, module: str) -> dict[str, Any]:
        info = self.modules.get(module)
        if info is None:
            raise ArtifactError(f"{self.stats} has no covariance for module {module}")
        valid = isinstance(info, dict) and isinstance(info.get("file"), str) and isinstance(info.get("covariance"), str)
        if not valid or not isinstance(info.get("tokens"), int) or info["tokens"] < 1:
            raise ArtifactError(f"{self.stats}/manifest.json is corrupt: the entry of {module} is malformed")
        return info

    def _open(self, module: str, read: Any) -> Any:
        """`read(handle, owner)` on the file holding `module`'s statistics (`owner`: the module they are
        stored under, see `owner`)."""
        from safetensors import safe_open

        info = self._entry(module)
        path = self.stats / info["file"]
        try:
            with safe_open(str(path), "pt") as handle:
                return read(handle, info["covariance"])
        except Exception as exc:  # missing, truncated or damaged file
            raise ArtifactError(f"{path} is missing, corrupt or lacks the covariance of {module}: {exc}") from exc

    def sums(self, module: str) -> tuple[torch.Tensor, int]:
        """XᵀX (d_in, d_in) for `module` in the stored dtype, and n, the number of tokens: C = XᵀX / n."""
        sums = self._open(module, lambda handle, owner: handle.get_tensor(f"cov.{owner}"))
        if sums.ndim != 2 or sums.shape[0] != sums.shape[1] or negative_diagonal(sums):
            raise ArtifactError(f"{self.stats} holds a covariance of {module} that is not a Gram matrix XᵀX: damaged")
        return sums, self.modules[module]["tokens"]

    @property
    def has_sequence_sums(self) -> bool:
        """Whether the artifact stores per-sequence sums (so a centred covariance can be formed)."""
        return bool(read_manifest(self.stats, "stats").extra.get("sequence_sums"))

    def centered_sums(self, module: str) -> tuple[torch.Tensor, int]:
        """Σ_s Σ_t (x_t − x̄_s)(x_t − x̄_s)ᵀ = XᵀX − Σ_s S_s S_sᵀ / n_s, (d_in, d_in) fp64, for `module`
        (each sequence centred on its own mean), and n, the number of tokens."""
        sums, tokens = self.sums(module)
        per_sequence, counts = self._open(
            module, lambda handle, owner: (handle.get_tensor(f"seqsum.{owner}"), handle.get_tensor("seq_tokens"))
        )
        d = sums.shape[0]
        if per_sequence.ndim != 2 or per_sequence.shape[1] != d or counts.shape != (per_sequence.shape[0],):
            raise ArtifactError(f"{self.stats} holds per-sequence sums of {module} of the wrong shape: damaged")
        if not all_finite(per_sequence) or int(counts.sum()) != tokens or bool((counts < 0).any()):
            raise ArtifactError(f"{self.stats} holds per-sequence sums of {module} that do not add up: damaged")
        used = counts > 0  # a sequence without a counted token adds nothing
        per_sequence = per_sequence[used].double()
        means = per_sequence / counts[used, None].double()
        # in place: at d_in 11,008 each (d_in, d_in) fp64 temporary would be another 0.97 GB
        return sums.double().addmm_(means.T, per_sequence, alpha=-1), tokens


def load_covariance(stats: Path, module: str) -> torch.Tensor:
    """C = XᵀX / n, (d_in, d_in), for `module` (a shared covariance is read from its owner)."""
    return CovarianceReader(stats).get(module)


def merge_stats(inputs: list[Path], out: Path, force: bool = False, overwrite: bool = False) -> Path:
    """Add the statistics of stats artifacts from one model into `out`.

    Covariance sums and token counts add; per-sequence sums are concatenated; sensitivities (means over
    samples) are averaged weighted by their sample counts. The result equals one calibration over the
    union of the sequences (up to summation order).
    """
    if len(inputs) < 2:
        raise CalibrationError("merging needs at least two stats artifacts")
    check_output(out, inputs, overwrite, "stats")
    manifests = [read_manifest(p, "stats") for p in inputs]
    first = manifests[0]
    seen: dict[str, Path] = {}
    for path, m in zip(inputs, manifests, strict=True):  # the same calibration twice would count its tokens twice
        key = stats_fingerprint(m)
        if key in seen:
            raise ArtifactError(f"{path} holds the same calibration as {seen[key]}: merging would count it twice")
        seen[key] = Path(path)
    for path, m in zip(inputs[1:], manifests[1:], strict=True):
        if m.model["fingerprint"] != first.model["fingerprint"] and not force:
            raise ArtifactError(
                f"{path} was calibrated on another model than {inputs[0]}; pass --force to merge anyway"
            )
        same = (m.extra["modules"].keys(), m.config["dtype"], m.config["collect"])
        if same != (first.extra["modules"].keys(), first.config["dtype"], first.config["collect"]):
            raise ArtifactError(f"{path} covers other modules, statistics or dtype than {inputs[0]}")
    extra = {**first.extra, "tokens": sum(m.extra["tokens"] for m in manifests)}
    extra["modules"] = {
        name: {**info, "tokens": sum(m.extra["modules"][name]["tokens"] for m in manifests)}
        for name, info in first.extra["modules"].items()
    }
    files = sorted(
        {info["file"] for info in first.extra["modules"].values() if isinstance(info, dict) and "file" in info}
    )
    with output_folder(out, "stats", inputs, overwrite) as work:
        tmp = work.folder
        # per-sequence sums are kept only if every input has them (older artifacts do not)
        extra["sequence_sums"] = all(m.extra.get("sequence_sums") for m in manifests)
        for name in files:  # the files the manifest names, in every input
            parts = [load_tensors(Path(p) / name) for p in inputs]
            parts = [
                {k: v for k, v in part.items() if extra["sequence_sums"] or not _per_sequence(k)} for part in parts
            ]
            _check_same_tensors(parts, [Path(p) / name for p in inputs])
            merged = {k: (torch.cat if _per_sequence(k) else sum)([part[k] for part in parts]) for k in parts[0]}
            save_tensors(tmp / name, merged)
        if "sensitivity" in first.extra:
            counts = [
                m.extra["sensitivity"].get("samples") if isinstance(m.extra["sensitivity"], dict) else None
                for m in manifests
            ]
            if not all(isinstance(n, int) and n > 0 for n in counts):
                raise ArtifactError(
                    f"the manifests of {', '.join(map(str, inputs))} do not all record their sensitivity samples"
                )
            parts = [sensitivity_tensors(p) for p in inputs]
            _check_same_tensors(parts, [Path(p) / "sensitivity.safetensors" for p in inputs])
            for part, path in zip(parts, inputs, strict=True):
                if any(bool((t < 0).any()) for t in part.values()):
                    raise ArtifactError(f"{path} holds negative sensitivities (a mean of |w·g| is ≥ 0): it is damaged")
            merged = {k: sum(part[k].double() * n for part, n in zip(parts, counts, strict=True)) for k in parts[0]}
            save_tensors(tmp / "sensitivity.safetensors", {k: (v / sum(counts)).float() for k, v in merged.items()})
            extra["sensitivity"] = {**first.extra["sensitivity"], "file": "sensitivity.safetensors"}
            extra["sensitivity"]["samples"] = sum(counts)
        manifest = Manifest(
            kind="stats",
            config={**first.config, "merged_from": [str(Path(p).resolve()) for p in inputs]},
            model=first.model,
            data={
                "fingerprint": [m.data["fingerprint"] for m in manifests],
                "samples": sum(m.data["samples"] for m in manifests),
            },
            extra=extra,
        )
        write_manifest(tmp, manifest)
    return Path(out)


def _per_sequence(key: str) -> bool:
    """Whether a block file's tensor `key` has one row per calibration sequence (merged by concatenation)."""
    return key.startswith("seqsum.") or key == "seq_tokens"


def _check_same_tensors(parts: list[dict[str, torch.Tensor]], files: list[Path]) -> None:
    """Refuse to add statistics files whose tensors differ in names or shapes (another architecture:
    --force skips only the model-fingerprint check); per-sequence tensors may differ in their row count."""

    def shapes(part: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape[1:] if _per_sequence(k) else v.shape) for k, v in part.items()}

    first = shapes(parts[0])
    for part, file in zip(parts, files, strict=True):
        if shapes(part) != first:
            raise ArtifactError(
                f"{file} holds other statistics or shapes than {files[0]}: one of them is damaged, or they were "
                "calibrated on different architectures; they cannot be merged"
            )
        bad = next((k for k, v in part.items() if not all_finite(v)), None)
        if bad:
            raise ArtifactError(f"{file} holds NaN or Inf values in {bad}: it is damaged")
        gram = next((k for k, v in part.items() if k.startswith("cov.") and negative_diagonal(v)), None)
        if gram:
            raise ArtifactError(f"{file} holds {gram} with a negative diagonal, not a Gram matrix XᵀX: it is damaged")
