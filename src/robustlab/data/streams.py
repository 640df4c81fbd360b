"""Data sets read lazily, one image at a time: the base of every streamed source, selections, and user data sets.

A streamed source satisfies :class:`robustlab.data.ImageData` (map-style, sized, ``data[i] -> (image, label)`` with
a float32 ``(C, H, W)`` image in ``[0, 1]`` and an int64 label), so it goes to a ``torch.utils.data.DataLoader``
unchanged. It holds what locates its examples (file names, a memory-mapped array, labels) and decodes an image only
when it is asked for, so memory does not grow with the number of images. Sources:

- :class:`~robustlab.data.folders.ImageFolder`: class sub-folders of PNG/JPEG files (torchvision's layout);
- :class:`~robustlab.data.cifar.CifarArchive`: CIFAR-10/100's python batches, from their folder or the .tar.gz;
- :class:`~robustlab.data.arrayfiles.ArrayImages`: ``.npy``/``.npz`` arrays, memory-mapped;
- :class:`DatasetImages`: any map-style ``torch.utils.data.Dataset`` yielding ``(image, label)``.

:meth:`StreamedImages.read_batch` reads several examples at once (sources that can, e.g. arrays, do it in one
read); :func:`read_batch` does the same for any :class:`~robustlab.data.ImageData`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustlab.checks import check_positive_int
from robustlab.data.preprocess import Preprocess, array_batch_to_tensor
from robustlab.errors import ConfigError, InvalidInputError

__all__ = ["DatasetImages", "LabelledImages", "Selection", "StreamedImages", "read_batch"]

Indices = Sequence[int] | np.ndarray | Tensor


class StreamedImages(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """The base of the lazily read sources: metadata, index checks, batches, selections.

    Attributes (the :class:`~robustlab.data.ImageData` protocol): ``name``, ``num_classes``, ``bounds`` (the input
    box, ``(0.0, 1.0)``), ``split``, and ``image_shape``; also ``classes`` (names, when known) and ``source``
    (where the examples are read from). A subclass implements ``__len__``, ``image_shape``, ``_item`` and, when it
    can read several examples faster than one by one, ``_batch``.
    """

    def __init__(
        self,
        *,
        name: str,
        num_classes: int,
        split: str = "",
        classes: Sequence[str] | None = None,
        source: str = "",
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        self.name = name
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.split = split
        self.classes = tuple(classes) if classes is not None else None
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise InvalidInputError(f"{len(self.classes)} class names given for {self.num_classes} classes")
        self.source = source or name
        self.bounds = (float(bounds[0]), float(bounds[1]))

    # ---------------------------------------------------------------------------- what subclasses provide
    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every example (after preprocessing)."""
        raise NotImplementedError

    def _item(self, position: int) -> tuple[Tensor, int]:
        """The image (float32, ``image_shape``) and label of the example at ``position`` (already checked)."""
        raise NotImplementedError

    def _batch(self, positions: np.ndarray) -> tuple[Tensor, Tensor]:
        items = [self._item(int(p)) for p in positions]
        if not items:
            return torch.empty((0, *self.image_shape)), torch.empty(0, dtype=torch.int64)
        return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])

    def fingerprint(self) -> str:
        """A short text that changes when the examples may have changed (files, sizes, modification times)."""
        return f"{type(self).__name__} {self.source} {self.split} {len(self)} {self.image_shape}"

    # ------------------------------------------------------------------------------------ the public API
    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self._item(self._position(index))
        return image, torch.tensor(label, dtype=torch.int64)

    def read_batch(self, indices: Indices) -> tuple[Tensor, Tensor]:
        """Images ``(B, C, H, W)`` and labels ``(B,)`` of the examples at ``indices``, in that order."""
        return self._batch(self._positions(indices))

    def head(self, n: int) -> StreamedImages:
        """The first ``n`` examples (all of them when there are fewer)."""
        n = check_positive_int("n", n)
        return self if n >= len(self) else Selection(self, np.arange(n))

    def subset(self, indices: Indices, *, split: str | None = None) -> Selection:
        """The examples at ``indices`` (in that order), as a new data set reading from this one."""
        return Selection(self, self._positions(indices), split=split)

    def __repr__(self) -> str:
        split = f"/{self.split}" if self.split else ""
        return (
            f"{type(self).__name__}({self.name}{split}: {len(self)} x {self.image_shape}, {self.num_classes} classes, "
            f"from {self.source})"
        )

    # --------------------------------------------------------------------------------------------- checks
    def _position(self, index: Any) -> int:
        if isinstance(index, Tensor | np.ndarray) and getattr(index, "ndim", 1) == 0:
            index = index.item()
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"{type(self).__name__} indices are integers, got {type(index).__name__}")
        n = len(self)
        position = int(index) + n if index < 0 else int(index)
        if not 0 <= position < n:
            raise IndexError(f"index {int(index)} is out of range for {n} examples")
        return position

    def _positions(self, indices: Indices) -> np.ndarray:
        array = (indices.cpu().numpy() if isinstance(indices, Tensor) else np.asarray(indices)).reshape(-1)
        if array.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{type(self).__name__} indices are integers, got {array.dtype}")
        n = len(self)
        positions = np.where(array < 0, array + n, array).astype(np.int64)
        if positions.min() < 0 or positions.max() >= n:
            raise IndexError(f"indices out of range for {n} examples")
        return positions


class LabelledImages(StreamedImages):
    """A streamed source that holds every label in memory (``_labels``, int64 ``(N,)``) and knows the shape all its
    images have (``_shape``); its subclass sets both in ``__init__`` and implements ``_item``."""

    _labels: Tensor
    _shape: tuple[int, int, int]

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def labels(self) -> Tensor:
        """Every label, int64 ``(N,)`` (held in memory)."""
        return self._labels


class Selection(StreamedImages):
    """Some examples of another data set, by index (a limit, a validation split): nothing is copied."""

    def __init__(self, parent: Any, positions: np.ndarray, *, split: str | None = None) -> None:
        super().__init__(
            name=parent.name,
            num_classes=parent.num_classes,
            split=parent.split if split is None else split,
            classes=getattr(parent, "classes", None),
            source=getattr(parent, "source", parent.name),
            bounds=parent.bounds,
        )
        self.parent = parent
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        shape: tuple[int, int, int] = self.parent.image_shape
        return shape

    def _item(self, position: int) -> tuple[Tensor, int]:
        image, label = self.parent[int(self.positions[position])]
        return image, int(label)

    def _batch(self, positions: np.ndarray) -> tuple[Tensor, Tensor]:
        return read_batch(self.parent, self.positions[positions])

    def fingerprint(self) -> str:
        parent = self.parent.fingerprint() if hasattr(self.parent, "fingerprint") else repr(self.parent)
        digest = hashlib.sha256(self.positions.tobytes()).hexdigest()[:16]
        return f"{parent} rows {len(self)} {digest}"


def read_batch(data: Any, indices: Indices) -> tuple[Tensor, Tensor]:
    """Images and labels of ``indices`` from any :class:`~robustlab.data.ImageData`, in one read where it can."""
    method = getattr(data, "read_batch", None)
    if callable(method):
        x, y = method(indices)
        return x, y
    index = indices.tolist() if isinstance(indices, Tensor | np.ndarray) else list(indices)
    items = [data[int(i)] for i in index]
    if not items:
        return torch.empty((0, *data.image_shape)), torch.empty(0, dtype=torch.int64)
    return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y, dtype=torch.int64) for _, y in items])


# ------------------------------------------------------------------------------------------- user data sets
class DatasetImages(StreamedImages):
    """Any map-style ``torch.utils.data.Dataset`` yielding ``(image, label)``, converted one item at a time.

    An image may be a tensor or array (integer 0..255, or floating in ``[0, 1]``; ``(C, H, W)`` with 1 or 3
    channels, ``(H, W, C)``, or ``(H, W)``) or a PIL image (e.g. a torchvision data set without transforms); a label
    an int or a 0-d tensor. The class count comes from ``num_classes``, else a ``classes`` attribute, else the
    largest of a ``targets`` attribute (torchvision's data sets have both); otherwise it must be given. Do not put
    ``transforms.Normalize`` in the data set: inputs stay in ``[0, 1]`` and normalization belongs in the model.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        name: str | None = None,
        split: str = "",
        num_classes: int | None = None,
        classes: Sequence[str] | None = None,
        preprocess: Preprocess | None = None,
    ) -> None:
        label = name or type(dataset).__name__
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise InvalidInputError(
                f"{label} is not a map-style data set (it needs __len__ and __getitem__); read an iterable one into "
                "memory with robustlab.data.from_torch_dataset"
            )
        if classes is None and isinstance(getattr(dataset, "classes", None), list | tuple):
            classes = [str(c) for c in dataset.classes]
        if num_classes is None:
            num_classes = len(classes) if classes is not None else _classes_from_targets(dataset)
        if num_classes is None:
            raise InvalidInputError(
                f"{label} does not say how many classes it has (no 'classes' or 'targets' attribute): give num_classes"
            )
        if classes is not None and len(classes) != num_classes:
            classes = None
        self.dataset = dataset
        self.preprocess = preprocess or Preprocess()
        self._count = len(dataset)
        if self._count == 0:
            raise InvalidInputError(f"{label} holds no examples")
        super().__init__(name=label, num_classes=int(num_classes), split=split, classes=classes, source=label)
        first, _ = self._convert(0, dataset[0])
        self._shape = (int(first.shape[0]), int(first.shape[1]), int(first.shape[2]))

    def __len__(self) -> int:
        return self._count

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape

    def _item(self, position: int) -> tuple[Tensor, int]:
        image, label = self._convert(position, self.dataset[position])
        if tuple(image.shape) != self._shape:
            raise InvalidInputError(
                f"item {position} of {self.name} is an image shaped {tuple(image.shape)}, but item 0 is {self._shape}; "
                "declare a resize (Preprocess(resize=...), --resize) to give every image one size"
            )
        return image, label

    def _convert(self, position: int, item: Any) -> tuple[Tensor, int]:
        where = f"item {position} of {self.name}"
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise InvalidInputError(f"{self.name} must yield (image, label) pairs; {where} is a {type(item).__name__}")
        return _image_tensor(item[0], where, self.preprocess), _label(item[1], where, self.num_classes)


def _classes_from_targets(dataset: Any) -> int | None:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    try:
        values = np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets).reshape(-1)
        return int(values.max()) + 1 if values.size else None
    except (TypeError, ValueError):
        return None


def _image_tensor(value: Any, where: str, preprocess: Preprocess) -> Tensor:
    """One image of a user data set: PIL through Pillow, arrays and tensors by the package's layout rules."""
    if hasattr(value, "convert") and hasattr(value, "mode"):  # a PIL image
        return preprocess.pil(value, default_channels=3 if value.mode not in ("L", "1", "I", "I;16", "F") else 1)
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[0] not in (1, 3) and array.shape[2] in (1, 3):
        array = array.transpose(2, 0, 1)
    elif array.ndim != 3 or array.shape[0] not in (1, 3):
        raise InvalidInputError(
            f"{where} is an image shaped {array.shape}; give (C, H, W) or (H, W, C) with 1 or 3 channels, or (H, W)"
        )
    if array.dtype == np.uint8:
        return preprocess.uint8(array)
    image = array_batch_to_tensor(array[None], where)[0]
    return preprocess.tensor(image) if preprocess != Preprocess() else image


def _label(value: Any, where: str, num_classes: int) -> int:
    if isinstance(value, Tensor | np.ndarray):
        count = value.size if isinstance(value, np.ndarray) else value.numel()
        if count != 1:
            raise InvalidInputError(f"the label of {where} must be one class index, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | np.integer | float | np.floating):
        raise InvalidInputError(f"the label of {where} must be an integer class index, got {type(value).__name__}")
    if isinstance(value, float | np.floating) and not float(value).is_integer():
        raise InvalidInputError(f"the label of {where} must be an integer class index, got {value}")
    label = int(value)
    if not 0 <= label < num_classes:
        raise InvalidInputError(f"the label {label} of {where} is outside 0..{num_classes - 1}")
    return label


def check_no_options(kind: str, **given: Any) -> None:
    """Refuse options a source does not take (e.g. ``classes`` for an array file), naming them."""
    extra = [name for name, value in given.items() if value is not None]
    if extra:
        raise ConfigError(f"{', '.join(extra)} cannot be used with {kind}")


class TensorPairs(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """Images and labels already in tensors (any dtype and device, any box), as a data set read by index.

    What the functions taking ``(x, y)`` use internally, so that tensors and data sets go through the same batches.
    ``x`` and ``y`` are used as given (not copied); checks are the consumer's (attacks check the box).
    """

    def __init__(
        self, x: Tensor, y: Tensor, *, name: str = "tensors", bounds: tuple[float, float] = (0.0, 1.0)
    ) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() < 1 or y.dim() != 1:
            raise InvalidInputError("data must be an (x, y) pair of tensors: inputs (N, ...) and labels (N,)")
        if x.shape[0] != y.shape[0]:
            raise InvalidInputError(f"x has {x.shape[0]} examples but y has {y.shape[0]} labels")
        self.x, self.y = x, y
        self.name, self.split, self.bounds = name, "", bounds
        self.num_classes = int(y.max()) + 1 if y.numel() else 1
        self.classes = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    def read_batch(self, indices: Indices) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices), dtype=torch.long)
        if index.numel() and bool((index[1:] - index[:-1] == 1).all()):  # a run: a view, as slicing gives
            start = int(index[0])
            return self.x[start : start + len(index)], self.y[start : start + len(index)]
        return self.x[index.to(self.x.device)], self.y[index.to(self.y.device)]
