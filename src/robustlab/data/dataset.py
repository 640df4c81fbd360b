"""The data type: :class:`ArrayDataset` (a whole split as tensors), its validation split and batches.

Images are float32 ``(N, C, H, W)`` inside a declared box (``[0, 1]``), labels int64 ``(N,)``. A validation split
for model selection comes from the training split with :func:`train_val_split`, never from the test split.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, overload, runtime_checkable

import torch
from torch import Tensor

from robustlab.checks import check_fraction, check_positive_int
from robustlab.errors import ConfigError, InvalidInputError

__all__ = ["ArrayDataset", "ImageData", "batches", "train_val_split"]


@runtime_checkable
class ImageData(Protocol):
    """What every consumer of data (attacks over a data set, evaluation, certification, training) may rely on: a
    map-style, sized data set of labelled images with its metadata.

    ``data[i]`` is ``(image, label)``: a float32 tensor ``(C, H, W)`` inside ``bounds`` and an int64 scalar tensor.
    :class:`ArrayDataset` (a split held in memory) is one; data read lazily from disk (image folders, archives,
    memory-mapped arrays) are others. Consumers iterate over batches (a ``torch.utils.data.DataLoader`` over the
    data set, or over a ``Subset`` of it) and never need the whole split in memory.
    """

    name: str
    num_classes: int
    bounds: tuple[float, float]
    split: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...


# --------------------------------------------------------------------------------------------- the data type
@dataclass(frozen=True, eq=False)
class ArrayDataset(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """A whole split in memory: ``x`` float32 ``(N, C, H, W)`` inside ``bounds``, ``y`` int64 ``(N,)``.

    It is a map-style ``torch.utils.data.Dataset`` (``len`` and ``dataset[i] -> (x_i, y_i)``), so it can be
    given to a ``DataLoader`` unchanged; :func:`batches` is the loader-free way to iterate. Treat the
    tensors as read-only: methods return new datasets and never modify them.

    Attributes:
        x: images, float32, ``(N, C, H, W)``, values inside ``bounds``.
        y: labels, int64, ``(N,)``, ``0 <= y < num_classes``.
        name: data set name (e.g. ``"mnist"``) or file stem.
        num_classes: number of classes of the task (not just those present in this split).
        bounds: the input box, ``(0.0, 1.0)``; use it for the threat model:
            ``ThreatModel("linf", 0.3, *dataset.bounds)``.
        split: ``"train"``, ``"test"``, ``"val"`` or ``""`` when the source has no split.
        classes: class names, when known.
        source: where the examples were read from (a path or a package), for reports.
    """

    x: Tensor
    y: Tensor
    name: str
    num_classes: int
    bounds: tuple[float, float] = (0.0, 1.0)
    split: str = ""
    classes: tuple[str, ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        x, y = self.x, self.y
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise InvalidInputError("ArrayDataset needs tensors x and y; use robustlab.data.from_arrays for arrays")
        if x.dtype != torch.float32 or x.dim() != 4:
            raise InvalidInputError(f"x must be float32 shaped (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if y.dtype != torch.int64 or y.dim() != 1:
            raise InvalidInputError(f"y must be int64 shaped (N,), got {y.dtype} {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise InvalidInputError(f"x has {x.shape[0]} examples but y has {y.shape[0]} labels")
        try:
            check_positive_int("num_classes", self.num_classes)
        except ConfigError as exc:  # a dataset that breaks its invariants is bad input, not a bad option
            raise InvalidInputError(str(exc)) from None
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise InvalidInputError(
                f"labels must be in 0..{self.num_classes - 1}, got values in [{int(y.min())}, {int(y.max())}]"
            )
        lower, upper = self.bounds
        if x.numel() and (float(x.min()) < lower or float(x.max()) > upper):
            raise InvalidInputError(
                f"x has values in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside bounds [{lower:g}, {upper:g}]"
            )
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise InvalidInputError(f"{len(self.classes)} class names given for {self.num_classes} classes")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]

    def read_batch(self, indices: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Images and labels of the examples at ``indices``, in that order (one indexing of each tensor)."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.x.device)
        return self.x[index], self.y[index]

    def __repr__(self) -> str:
        split = f"/{self.split}" if self.split else ""
        return (
            f"ArrayDataset({self.name}{split}: {len(self)} x {tuple(self.image_shape)}, "
            f"{self.num_classes} classes, bounds={self.bounds})"
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one example."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def class_counts(self) -> Tensor:
        """Number of examples of each class, shape ``(num_classes,)``."""
        return torch.bincount(self.y, minlength=self.num_classes)

    def subset(self, indices: Tensor | Sequence[int], *, split: str | None = None) -> ArrayDataset:
        """The examples at ``indices`` (in that order), as a new dataset."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return replace(self, x=self.x[index], y=self.y[index], split=self.split if split is None else split)

    def head(self, n: int) -> ArrayDataset:
        """The first ``n`` examples (all of them when there are fewer)."""
        return replace(self, x=self.x[:n], y=self.y[:n])

    def to(self, device: torch.device | str) -> ArrayDataset:
        """The same dataset with its tensors on ``device``."""
        return replace(self, x=self.x.to(device), y=self.y.to(device))


# ------------------------------------------------------------------------------------ splits and batches
@overload
def train_val_split(
    dataset: ArrayDataset, val_fraction: float = 0.1, seed: int = 0
) -> tuple[ArrayDataset, ArrayDataset]: ...


@overload
def train_val_split(dataset: ImageData, val_fraction: float = 0.1, seed: int = 0) -> tuple[ImageData, ImageData]: ...


def train_val_split(dataset: Any, val_fraction: float = 0.1, seed: int = 0) -> tuple[Any, Any]:
    """Split ``dataset`` (a training split) into disjoint training and validation parts, shuffled by ``seed``.

    ``round(val_fraction * N)`` examples (at least one, and leaving at least one) go to validation; both parts
    keep the original order of their examples. The same seed always gives the same split. Select models and
    hyper-parameters on the validation part, never on the test split. An :class:`ArrayDataset` is split into two
    :class:`ArrayDataset`; any other :class:`ImageData` (a streamed source) into two selections that read from it.
    """
    val_fraction = check_fraction("val_fraction", val_fraction)
    n = len(dataset)
    if n < 2:
        raise InvalidInputError(f"cannot split {n} example(s) into a training and a validation part")
    if dataset.split == "test":
        warnings.warn(
            "train_val_split on a test split: select models on a part of the training split instead",
            stacklevel=2,
        )
    n_val = min(max(round(val_fraction * n), 1), n - 1)
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator)
    val_index, _ = torch.sort(order[:n_val])
    train_index, _ = torch.sort(order[n_val:])
    if isinstance(dataset, ArrayDataset) or hasattr(dataset, "subset"):
        return dataset.subset(train_index, split="train"), dataset.subset(val_index, split="val")
    from robustlab.data.streams import Selection

    return Selection(dataset, train_index.numpy(), split="train"), Selection(dataset, val_index.numpy(), split="val")


def batches(
    dataset: ArrayDataset | tuple[Tensor, Tensor],
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    device: torch.device | str | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` batches of at most ``batch_size`` examples, without a ``DataLoader``.

    In order by default; ``shuffle=True`` draws a new permutation from ``generator`` (a CPU generator; the
    global one when None) on every call. ``device`` moves each batch there.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    x, y = (dataset.x, dataset.y) if isinstance(dataset, ArrayDataset) else dataset
    if x.shape[0] != y.shape[0]:
        raise InvalidInputError(f"x has {x.shape[0]} examples but y has {y.shape[0]} labels")
    n = int(x.shape[0])
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        else:
            index = order[start : start + batch_size].to(x.device)
            xb, yb = x[index], y[index]
        if device is not None:
            xb, yb = xb.to(device), yb.to(device)
        yield xb, yb
