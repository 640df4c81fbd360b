"""The examples an evaluation reads, by index, and where it keeps the adversarial examples it finds.

:class:`Examples` wraps what the user passed — ``(x, y)`` tensors, an :class:`~robustlab.data.ArrayDataset`, a
streamed source (image folder, CIFAR archive, memory-mapped array) or any map-style data set of ``(image, label)`` —
so every phase of the evaluation reads the same batches the same way, whether they come from memory or from disk
(through ``DataLoader`` workers when asked). That is why an evaluation of a folder of PNGs equals, bit for bit, the
evaluation of the same pixels held in a tensor.

The adversarial examples go to a store with one row per example: a tensor for data held in memory (the data is
there already), or a :class:`~robustlab.data.RowFile` on disk for streamed data, so memory does not grow with the
data set. Under torchrun every process writes the rows of the batches it attacked into the same file (they never
overlap), which must therefore be on storage all processes share.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustlab.data import ArrayDataset, RowFile, iter_batches
from robustlab.data.loading import in_order
from robustlab.data.streams import DatasetImages, Selection, TensorPairs, read_batch
from robustlab.errors import InvalidInputError
from robustlab.threat import ThreatModel
from robustlab.utils import process_group, rows_like

__all__ = ["Examples", "FileStore", "MemoryStore", "open_store"]


class Examples:
    """The evaluated examples: read in batches (by index), in memory or streamed."""

    def __init__(self, data: Any, threat: ThreatModel, limit: int | None, *, workers: int, device: torch.device):
        self.threat = threat
        self.workers = workers
        self.pin_memory = device.type == "cuda"
        if isinstance(data, ArrayDataset):
            data = (data.x, data.y)
        if isinstance(data, tuple):
            if len(data) != 2 or not all(isinstance(t, Tensor) for t in data):
                raise InvalidInputError("data must be an (x, y) pair of tensors or a data set of (image, label)")
            x, y = data
            if limit is not None:
                x, y = x[:limit], y[:limit]
            threat.check_inputs(x, name="evaluation data")
            self.data: Any = TensorPairs(x.cpu(), y.long().cpu(), bounds=(threat.lower, threat.upper))
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            if not hasattr(data, "image_shape"):
                data = DatasetImages(data, num_classes=getattr(data, "num_classes", None))
            self.data = Selection(data, np.arange(limit)) if limit is not None and limit < len(data) else data
        else:
            raise InvalidInputError(
                "data must be an ArrayDataset, a data set of (image, label) (robustlab.data.open_dataset) or an "
                f"(x, y) pair of tensors; got {type(data).__name__}"
            )

    @property
    def in_memory(self) -> bool:
        return isinstance(self.data, TensorPairs)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.image_shape)

    def batches(self, index_batches: Sequence[np.ndarray | Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
        """Images and labels of each index batch, in order (read ahead by the workers)."""
        workers = 0 if self.in_memory else self.workers
        for x, y in iter_batches(self.data, index_batches, workers=workers, pin_memory=self.pin_memory):
            yield x, y.long()

    def in_order(self, batch_size: int, count: int | None = None) -> Iterator[tuple[np.ndarray, Tensor, Tensor]]:
        """``(rows, images, labels)`` of the first ``count`` examples (all by default) in batches, in order."""
        index = in_order(len(self) if count is None else min(count, len(self)), batch_size)
        for rows, (x, y) in zip(index, self.batches(index)):
            yield rows, x, y

    def rows(self, index: np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
        """Images and labels of ``index``, read now."""
        x, y = read_batch(self.data, index)
        return x, y.long()

    def first(self, count: int) -> tuple[Tensor, Tensor]:
        """The first ``count`` examples (fewer when there are fewer)."""
        return self.rows(np.arange(min(count, len(self))))

    def checked(self, x: Tensor, rows: np.ndarray) -> Tensor:
        """``x`` after checking it lies in the threat model's box (streamed data is checked batch by batch)."""
        if not self.in_memory:
            self.threat.check_inputs(x, name=f"evaluation data (examples {int(rows[0])}..{int(rows[-1])})")
        return x


# ---------------------------------------------------------------------------------------------- the stores
class MemoryStore:
    """Adversarial examples in a tensor (for data held in memory); saved in the evaluation's state file."""

    in_file = False

    def __init__(self, like: Tensor) -> None:
        self.images = torch.zeros_like(like)

    def write(self, rows: Tensor, images: Tensor) -> None:
        self.images[rows] = images.to(self.images.dtype)

    def read(self, rows: Tensor | np.ndarray) -> Tensor:
        return self.images[torch.as_tensor(rows, dtype=torch.long)]

    def payload(self, broken: Tensor) -> dict[str, Any]:
        return {"x_adv_rows": self.images[broken].clone()}

    def restore(self, saved: dict[str, Any], broken: Tensor) -> bool:
        rows = saved.get("x_adv_rows")
        if not isinstance(rows, Tensor) or rows.shape != (int(broken.sum()), *self.images.shape[1:]):
            return False
        self.images[broken] = rows.to(self.images.dtype)
        return True

    def final(self, broken: Tensor, clean: Tensor) -> Tensor:
        """Every example's adversarial example: the stored one where ``broken``, the clean input elsewhere."""
        return torch.where(rows_like(broken, clean), self.images, clean)

    def write_final(self, rows: np.ndarray, images: Tensor) -> None:
        """Nothing to do: :meth:`final` composes the answer from memory."""

    def close(self) -> None:
        pass


class FileStore:
    """Adversarial examples in a float32 ``.npy`` row file (for streamed data); the file outlives the evaluation."""

    in_file = True

    def __init__(self, rows: RowFile, *, existed: bool, keep: Any = None) -> None:
        self.file = rows
        self.existed = existed  # the file was there before (with the right shape): a resume may use its rows
        self._keep = keep  # a temporary folder, removed when the store (and the result holding it) goes

    @property
    def path(self) -> Path:
        return self.file.path

    def write(self, rows: Tensor, images: Tensor) -> None:
        self.file.write(rows, images)

    def read(self, rows: Tensor | np.ndarray) -> Tensor:
        return self.file.read(rows)

    def payload(self, broken: Tensor) -> dict[str, Any]:
        self.file.flush()
        return {"adversarial_file": str(self.path.resolve())}

    def restore(self, saved: dict[str, Any], broken: Tensor) -> bool:
        return saved.get("adversarial_file") == str(self.path.resolve()) and self.existed

    def final(self, broken: Tensor, clean: Tensor | None) -> Tensor:
        """The whole file, memory-mapped (copy-on-write): :meth:`write_final` has put every final row there."""
        return self.file.mapped()

    def write_final(self, rows: np.ndarray, images: Tensor) -> None:
        self.file.write(rows, images)

    def close(self) -> None:
        self.file.close()


def open_store(examples: Examples, path: str | Path | None, *, like: Tensor | None = None) -> MemoryStore | FileStore:
    """The store for ``examples``: a tensor shaped ``like`` for data in memory (unless a ``path`` is given), else the
    row file at ``path`` (kept when it already has the right shape, for a resume) or in a temporary folder.

    Under torchrun, process 0 creates the file (and picks the temporary folder) and the others open it after."""
    if path is None and examples.in_memory:
        assert like is not None
        return MemoryStore(like)
    world, rank = process_group()
    keep = None
    if path is None:
        holder: list[Any] = [None]
        if rank == 0:
            keep = tempfile.TemporaryDirectory(prefix="robustlab-evaluation-")
            holder[0] = str(Path(keep.name) / "adversarial.npy")
        if world > 1:
            torch.distributed.broadcast_object_list(holder, src=0)
        path = holder[0]
    file = Path(str(path))
    shape = examples.image_shape
    existed: list[Any] = [False]
    if rank == 0:
        existing = RowFile.open(file, len(examples), shape)
        existed[0] = existing is not None
        (existing or RowFile.create(file, len(examples), shape)).close()
    if world > 1:
        torch.distributed.broadcast_object_list(existed, src=0)  # also: the file exists before the others open it
    opened = RowFile.open(file, len(examples), shape)
    if opened is None:
        raise InvalidInputError(f"{file} cannot be opened as the evaluation's file of adversarial examples")
    return FileStore(opened, existed=bool(existed[0]), keep=keep)
