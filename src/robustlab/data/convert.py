"""Arrays to an :class:`~robustlab.data.dataset.ArrayDataset`, by one set of conversion rules for every source.

Integer images are 0..255 and are divided by 255; floating images must already be in ``[0, 1]`` (normalization
belongs inside the model, see :class:`robustlab.models.Normalize`); ``(N, H, W)`` is one channel; a 4-d array is
channels-first when its second axis has 1 or 3 channels, else channels-last when its last axis has; flat ``(N, D)``
rows need an explicit ``shape=(C, H, W)`` and are reshaped in C, H, W order (the order of CIFAR's python batches).
Labels are integers ``0 <= y < num_classes``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustlab.checks import check_positive_int
from robustlab.data.dataset import ArrayDataset
from robustlab.data.preprocess import check_float_pixel_range
from robustlab.errors import ConfigError, InvalidInputError

__all__ = ["from_arrays", "from_torch_dataset"]


# ------------------------------------------------------------------------------------------- conversions
def _as_numpy(value: Any, what: str) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise InvalidInputError(f"{what} cannot be converted to an array: {exc}") from exc


def _check_shape_arg(shape: Sequence[int] | None) -> tuple[int, int, int] | None:
    if shape is None:
        return None
    dims = tuple(int(s) for s in shape)
    if len(dims) != 3 or min(dims) < 1:
        raise ConfigError(f"shape must be (C, H, W) with positive sizes, got {tuple(shape)!r}")
    return dims[0], dims[1], dims[2]


def _images_to_nchw(x: np.ndarray, shape: tuple[int, int, int] | None, source: str) -> np.ndarray:
    """Reshape an image array to ``(N, C, H, W)`` by the module's layout rules (no copy when possible)."""
    if x.ndim == 2:
        if shape is None:
            raise InvalidInputError(
                f"x in {source} is flat, shaped {x.shape}: give the image shape, e.g. shape=(1, 28, 28) for "
                "MNIST rows or shape=(3, 32, 32) for CIFAR rows (flat rows are read in C, H, W order)"
            )
        if int(np.prod(shape)) != x.shape[1]:
            raise InvalidInputError(
                f"x in {source} has {x.shape[1]} values per row, but shape={shape} needs {int(np.prod(shape))}"
            )
        return x.reshape((x.shape[0], *shape))
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] in (1, 3):
            pass
        elif x.shape[3] in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        else:
            raise InvalidInputError(
                f"x in {source} is shaped {x.shape}: cannot tell the channel axis. Give images as "
                "(N, C, H, W) or (N, H, W, C) with 1 or 3 channels, or (N, H, W) for grayscale"
            )
    else:
        raise InvalidInputError(
            f"x in {source} must be images shaped (N, C, H, W), (N, H, W, C) or (N, H, W), or flat (N, D) "
            f"rows with shape=(C, H, W); got {x.ndim} dimensions {x.shape}"
        )
    if shape is not None and tuple(x.shape[1:]) != shape:
        raise InvalidInputError(f"x in {source} has images shaped {tuple(x.shape[1:])}, but shape={shape}")
    return x


def _tensor(array: np.ndarray) -> Tensor:
    """A tensor sharing ``array``'s memory, or a copy when the array is read-only (e.g. a view of a file)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _images_to_tensor(x: np.ndarray, source: str) -> Tensor:
    """uint8/integer 0..255 -> /255; floating must be in [0, 1]; result float32."""
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise InvalidInputError(f"x in {source} must hold integer (0..255) or floating ([0, 1]) pixels, got {x.dtype}")
    if x.size == 0:
        raise InvalidInputError(f"x in {source} holds no examples")
    if np.issubdtype(x.dtype, np.integer):
        low, high = int(x.min()), int(x.max())
        if low < 0 or high > 255:
            raise InvalidInputError(
                f"x in {source} is an integer array with values in [{low}, {high}]; integer images must be 0..255"
            )
        return _tensor(np.ascontiguousarray(x, dtype=np.uint8)).to(torch.float32).div_(255.0)
    if not np.isfinite(x).all():
        raise InvalidInputError(f"x in {source} contains NaN or Inf values")
    lo, hi = float(x.min()), float(x.max())
    check_float_pixel_range(lo, hi, f"x in {source} is a floating array with values")
    out = _tensor(np.ascontiguousarray(x, dtype=np.float32))
    return out.clamp(0.0, 1.0) if lo < 0 or hi > 1 else out  # never in place: `out` may share memory


def _labels_to_tensor(y: np.ndarray, source: str) -> Tensor:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = " (one-hot labels? pass y.argmax(1))" if y.ndim == 2 else ""
        raise InvalidInputError(f"y in {source} must be a vector of class indices, got shape {y.shape}{hint}")
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise InvalidInputError(f"labels in {source} must be integers, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating) and not (np.isfinite(y).all() and np.array_equal(y, np.round(y))):
        raise InvalidInputError(f"labels in {source} must be integers (class indices), got fractional values")
    if y.size and y.min() < 0:
        raise InvalidInputError(f"labels in {source} must be class indices >= 0, got {y.min()}")
    return _tensor(np.ascontiguousarray(y, dtype=np.int64))


def from_arrays(
    x: np.ndarray | Tensor | Any,
    y: np.ndarray | Tensor | Any,
    *,
    name: str = "arrays",
    split: str = "",
    num_classes: int | None = None,
    shape: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    limit: int | None = None,
    source: str = "",
) -> ArrayDataset:
    """An :class:`ArrayDataset` from image and label arrays, by the module's conversion rules.

    Args:
        x: images: integer 0..255 or floating in ``[0, 1]``; ``(N, C, H, W)``, ``(N, H, W, C)``,
            ``(N, H, W)``, or flat ``(N, D)`` together with ``shape``.
        y: integer class indices ``(N,)`` (floats holding whole numbers are accepted).
        num_classes: defaults to ``max(y) + 1`` (give it when a split may miss the last classes).
        shape: ``(C, H, W)`` of one image; required for flat rows, checked otherwise.
        limit: keep only the first ``limit`` examples.
    """
    source = source or name
    x_np, y_np = _as_numpy(x, "x"), _as_numpy(y, "y")
    if x_np.ndim == 0 or y_np.ndim == 0:
        raise InvalidInputError(f"x and y in {source} must be arrays over examples, got scalars")
    if x_np.shape[0] != y_np.shape[0]:
        raise InvalidInputError(f"x in {source} has {x_np.shape[0]} examples but y has {y_np.shape[0]} labels")
    if limit is not None:
        limit = check_positive_int("limit", limit)
        x_np, y_np = x_np[:limit], y_np[:limit]
    images = _images_to_tensor(_images_to_nchw(x_np, _check_shape_arg(shape), source), source)
    labels = _labels_to_tensor(y_np, source)
    observed = int(labels.max()) + 1 if labels.numel() else 1
    if num_classes is None:
        num_classes = len(classes) if classes is not None else observed
    elif observed > num_classes:
        raise InvalidInputError(f"labels in {source} go up to {observed - 1}, but num_classes={num_classes}")
    return ArrayDataset(
        x=images,
        y=labels,
        name=name,
        num_classes=int(num_classes),
        split=split,
        classes=tuple(classes) if classes is not None else None,
        source=source,
    )


def _item_image(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)  # numpy arrays and PIL images (H, W) or (H, W, C)


def from_torch_dataset(
    dataset: Any,
    *,
    name: str | None = None,
    split: str = "",
    num_classes: int | None = None,
    shape: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    limit: int | None = None,
) -> ArrayDataset:
    """Materialize a ``torch.utils.data.Dataset`` that yields ``(x, y)`` pairs as an :class:`ArrayDataset`.

    ``x`` may be a tensor (e.g. after ``transforms.ToTensor()``), a numpy array or a PIL image (torchvision
    data sets without transforms); ``y`` an int or a 0-d tensor. Do not apply ``transforms.Normalize``: inputs
    must stay in ``[0, 1]`` and normalization belongs inside the model. Class names are taken from a ``classes``
    attribute when the data set has one (torchvision's do).
    """
    label = name or type(dataset).__name__
    if classes is None and isinstance(getattr(dataset, "classes", None), list | tuple):
        classes = [str(c) for c in dataset.classes]
        if num_classes is not None and len(classes) != num_classes:
            classes = None
    if isinstance(dataset, ArrayDataset):
        picked = dataset.head(check_positive_int("limit", limit)) if limit is not None else dataset
        return replace(picked, name=name or dataset.name, split=split or dataset.split)
    x: Any
    y: Any
    if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) >= 2:
        x, y = dataset.tensors[0], dataset.tensors[1]
    else:
        x, y = _collect_pairs(dataset, label, limit)
        limit = None  # already applied while collecting
    return from_arrays(
        x,
        y,
        name=label,
        split=split,
        num_classes=num_classes,
        shape=shape,
        classes=classes,
        limit=limit,
        source=label,
    )


def _collect_pairs(dataset: Any, label: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` (all, when None) ``(x, y)`` items of ``dataset``, stacked into image and label arrays."""
    try:
        total = len(dataset)
    except TypeError:
        total = None
    count = total if limit is None else min(check_positive_int("limit", limit), total if total is not None else limit)
    # Map-style data sets are indexed (as a DataLoader does); iterable-style ones are iterated.
    items: Iterator[Any] = (
        (dataset[i] for i in range(count)) if total is not None and count is not None else iter(dataset)
    )
    xs: list[np.ndarray] = []
    ys: list[Any] = []
    for i, item in enumerate(items):
        if count is not None and i >= count:
            break
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise InvalidInputError(
                f"{label} must yield (x, y) pairs; item {i} is a {type(item).__name__}"
                + (f" of length {len(item)}" if isinstance(item, tuple | list) else "")
            )
        image = _item_image(item[0])
        if xs and image.shape != xs[0].shape:
            raise InvalidInputError(
                f"{label} yields images of different shapes ({xs[0].shape} at item 0, {image.shape} at "
                f"item {i}); resize them to one shape first"
            )
        xs.append(image)
        target = item[1]
        ys.append(target.item() if isinstance(target, Tensor) and target.numel() == 1 else target)
    if not xs:
        raise InvalidInputError(f"{label} holds no examples")
    return np.stack(xs), np.asarray(ys)
