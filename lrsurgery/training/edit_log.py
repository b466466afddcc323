"""The weight edits a run makes during training, kept on disk instead of in memory.

Each edit's fp32 factors are written to the run's work folder (`edits/NAME.K.B` and `.A`, raw bytes) and
mapped back lazily, so the edit log of a long run (SRLoRA adds rank 2r′ per module at every switch) holds
no RAM until the artifact is written at the end. A checkpoint records each layer's edit widths; `--resume`
maps the files back and replays them."""

from __future__ import annotations

from pathlib import Path

import torch

from lrsurgery.errors import ArtifactError
from lrsurgery.io.outputs import write_bytes_atomic
from lrsurgery.layers.adapted import AdaptedLinear

FOLDER = "edits"


class EditFiles:
    """The run's edit files under `work/edits/`, one pair per edit, named by module and position in its log."""

    def __init__(self, work: Path, layers: dict[str, AdaptedLinear], write: bool = True):
        """`write`: this process writes the files (the main one); the others keep their edits in memory and
        only read the files on `--resume`."""
        self.folder = Path(work) / FOLDER
        self.names = {id(layer): name for name, layer in layers.items()}
        self.write = write

    def spill(self, layer: AdaptedLinear) -> None:
        """Write the layer's newest edit to disk and replace it in the log by lazily mapped copies."""
        if not self.write:
            return
        self.folder.mkdir(exist_ok=True)
        name, k = self.names[id(layer)], len(layer.edits) - 1
        b, a = layer.edits[k]
        layer.edits[k] = (self._write(name, k, "B", b), self._write(name, k, "A", a))

    def replay(self, name: str, layer: AdaptedLinear, widths: list[int]) -> None:
        """Apply the edits a checkpoint recorded (their widths, in order) to the layer again, from their files."""
        d_out, d_in = layer.base.weight.shape
        for width in widths:
            k = len(layer.edits)
            b, a = self._read(name, k, "B", (d_out, width)), self._read(name, k, "A", (width, d_in))
            layer.add_edit(b, a)
            layer.edits[k] = (b, a)  # the files stay where they are: the log maps them again

    def _path(self, name: str, k: int, which: str) -> Path:
        return self.folder / f"{name}.{k}.{which}"

    def _write(self, name: str, k: int, which: str, tensor: torch.Tensor) -> torch.Tensor:
        write_bytes_atomic(self._path(name, k, which), tensor.contiguous().numpy().tobytes())
        return self._read(name, k, which, tuple(tensor.shape))

    def _read(self, name: str, k: int, which: str, shape: tuple[int, int]) -> torch.Tensor:
        path = self._path(name, k, which)
        size = shape[0] * shape[1]
        if not path.is_file() or path.stat().st_size != 4 * size:
            raise ArtifactError(
                f"{path} is missing or damaged, so the run in {self.folder.parent} cannot be resumed; "
                "start it again with --overwrite"
            )
        if size == 0:
            return torch.zeros(shape)
        return torch.from_file(str(path), shared=False, size=size, dtype=torch.float32).view(shape)
