"""Data sets: images in ``[0, 1]`` shaped ``(C, H, W)``, integer labels, a declared box; in memory or read lazily.

Every consumer (attacks over a data set, evaluation, certification, training) reads an :class:`ImageData` — a
map-style, sized ``torch.utils.data.Dataset`` of ``(image, label)`` — in batches by index (:func:`iter_batches`,
optionally from ``DataLoader`` worker processes). Two kinds satisfy it:

- read lazily by :func:`open_dataset`, so memory does not grow with the data: a folder of class folders of images
  (:class:`ImageFolder`, torchvision's layout), CIFAR-10/100's python batches or their ``.tar.gz``
  (:func:`open_cifar`), ``.npy``/``.npz`` arrays memory-mapped (:func:`open_npz`, :func:`open_npy`), any
  ``torch.utils.data.Dataset`` of ``(image, label)`` (:class:`DatasetImages`); resize, centre crop and channels are
  declared once (:class:`Preprocess`);
- held in memory: an :class:`ArrayDataset` (``x`` and ``y`` tensors), which :func:`load_dataset` returns. It comes
  from one of

- a built-in name (:func:`list_datasets`): ``digits``, ``mnist``, ``mnist-5k``, ``fashion-mnist``,
  ``cifar10`` and the 20-image samples ``mnist-sample``, ``fashion-mnist-sample``, ``cifar10-sample``,
  ``cifar100-sample``;
- an ``.npz`` file with arrays ``x`` and ``y`` (:func:`load_npz`);
- a directory holding MNIST-style IDX or CSV files, or CIFAR-10's python batches (torchvision's layout);
- any ``torch.utils.data.Dataset`` that yields ``(x, y)`` pairs (:func:`from_torch_dataset`);
- arrays or tensors in memory (:func:`from_arrays`).

The conversion rules are the same for every source (:mod:`robustlab.data.convert`): integer images are 0..255
and are divided by 255; floating images must already be in ``[0, 1]`` (normalization belongs inside the model,
see :class:`robustlab.models.Normalize`); flat rows need an explicit ``shape=(C, H, W)``.

Built-in data sets are looked for in this order (:mod:`robustlab.data.sources`): an explicit ``root`` the user
gave, the cache directory (``cache_dir``, else ``$ROBUSTLAB_CACHE``, else ``$XDG_CACHE_HOME/robustlab`` or
``~/.cache/robustlab``), an installed data package, and only then a download from the canonical source (checked
against its published MD5). When everything fails, :class:`~robustlab.errors.DataNotFoundError` says where to
put the files.

Splits are fixed and documented per data set, so the same name and split always give the same examples. A
validation split for model selection comes from the training split with :func:`train_val_split`, never from
the test split.

The package's parts: :mod:`~robustlab.data.opening`, :mod:`~robustlab.data.folders`, :mod:`~robustlab.data.cifar`,
:mod:`~robustlab.data.arrayfiles`, :mod:`~robustlab.data.streams` and :mod:`~robustlab.data.loading` (streamed data),
:mod:`~robustlab.data.rowfile` (results written as they are found), :mod:`~robustlab.data.dataset` (the data type,
splits, batches),
:mod:`~robustlab.data.convert` (arrays and torch data sets), :mod:`~robustlab.data.formats` (file readers),
:mod:`~robustlab.data.sources` (cache, downloads, lookup order), :mod:`~robustlab.data.builtin` (the registry of
built-in sets).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from robustlab.checks import check_positive_int
from robustlab.data.arrayfiles import ArrayImages, open_npy, open_npz
from robustlab.data.builtin import CIFAR10_CLASSES, DATASETS, DatasetInfo, list_datasets, unknown_source
from robustlab.data.cifar import open_cifar
from robustlab.data.convert import from_arrays, from_torch_dataset
from robustlab.data.dataset import ArrayDataset, ImageData, batches, train_val_split
from robustlab.data.folders import ImageFolder
from robustlab.data.formats import cifar_folder, load_npz, read_cifar_folder, read_idx, read_mnist_style_dir, save_npz
from robustlab.data.loading import in_order, iter_batches
from robustlab.data.opening import open_dataset
from robustlab.data.preprocess import Preprocess
from robustlab.data.rowfile import NpzWriter, RowFile
from robustlab.data.sources import SPLITS, DataRequest, default_cache_dir
from robustlab.data.streams import DatasetImages, Selection, StreamedImages, read_batch
from robustlab.errors import ConfigError, DataNotFoundError

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "ArrayImages",
    "DatasetImages",
    "DatasetInfo",
    "ImageData",
    "ImageFolder",
    "NpzWriter",
    "Preprocess",
    "RowFile",
    "Selection",
    "StreamedImages",
    "batches",
    "default_cache_dir",
    "from_arrays",
    "from_torch_dataset",
    "in_order",
    "iter_batches",
    "list_datasets",
    "load_dataset",
    "load_npz",
    "open_cifar",
    "open_dataset",
    "open_npy",
    "open_npz",
    "read_batch",
    "read_idx",
    "save_npz",
    "train_val_split",
]

PathLike = str | os.PathLike[str]


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
        limit = check_positive_int("limit", limit)
    if not isinstance(split, str):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    text = os.fspath(name_or_path)
    key = DATASETS.key(text)
    if key is not None and not isinstance(name_or_path, os.PathLike):
        info = DATASETS.get(key)
        split = _check_split(split, info.splits, info.name)
        if root is not None and not info.takes_root:
            raise ConfigError(f"{info.name} is built in and takes no root; root is for mnist, fashion-mnist, cifar10")
        if shape is not None:
            raise ConfigError("shape is only for .npz files holding flat rows")
        request = DataRequest(
            name=info.name,
            split=split,
            root=Path(root).expanduser() if root is not None else None,
            cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(),
            download=download,
            seed=int(seed),
        )
        return _load_builtin(info, request, limit)
    if root is not None:
        raise ConfigError("root is for the built-in names mnist, fashion-mnist and cifar10; give the path directly")
    return _load_path(text, split, limit=limit, shape=shape)


def _check_split(split: str, allowed: Sequence[str], name: str) -> str:
    if split in allowed:
        return split
    if split in ("val", "valid", "validation"):
        raise ConfigError(
            f"{name} has no validation split; hold one out of the training split with "
            "robustlab.data.train_val_split(load_dataset(name, 'train'), val_fraction) (never select on test)"
        )
    raise ConfigError(f"{name} has no split {split!r}; choose one of: {', '.join(allowed)}")


def _load_builtin(info: DatasetInfo, request: DataRequest, limit: int | None) -> ArrayDataset:
    """Run the built-in loader and convert its arrays."""
    if request.root is not None and not request.root.is_dir():
        raise DataNotFoundError(f"root {request.root} is not a folder")
    x, y, source = info.loader(request)
    return from_arrays(
        x,
        y,
        name=info.name,
        split=request.split,
        num_classes=info.num_classes,
        classes=info.classes,
        limit=limit,
        source=source,
    )


def _load_path(text: str, split: str, *, limit: int | None, shape: Sequence[int] | None) -> ArrayDataset:
    """An ``.npz`` file or a data folder; anything else is a missing path or an unknown name."""
    path = Path(text).expanduser()
    if path.suffix.lower() == ".npz" or path.is_file():
        if path.suffix.lower() != ".npz" and path.is_file():
            raise ConfigError(f"{path} is not an .npz file; robustlab reads data files as .npz with arrays x and y")
        return load_npz(path, split=split, shape=shape, limit=limit)
    if path.is_dir():
        return _load_folder(path, split, limit)
    raise unknown_source(text, "an .npz file or a data folder")


def _in_memory(data: StreamedImages) -> ArrayDataset:
    """A streamed data set read whole into an :class:`ArrayDataset`."""
    x, y = read_batch(data, range(len(data)))
    return ArrayDataset(
        x, y, data.name, data.num_classes, data.bounds, data.split, data.classes, getattr(data, "source", "")
    )


def _load_folder(path: Path, split: str, limit: int | None) -> ArrayDataset:
    """A folder of MNIST-style IDX or CSV files or of CIFAR-10's python batches; any other folder
    :func:`open_dataset` reads (class folders of images, ``.npy`` pairs, CIFAR-100), read whole into memory."""
    split = _check_split(split, SPLITS, str(path))
    found = read_mnist_style_dir(path, split)
    classes: tuple[str, ...] | None = None
    if found is None:
        folder = cifar_folder(path)
        if folder is None:  # any other folder open_dataset reads (image folders, .npy pairs), read whole
            return _in_memory(open_dataset(path, split, limit=limit))
        found, classes = read_cifar_folder(folder, split), CIFAR10_CLASSES
    x, y, source = found
    return from_arrays(x, y, name=path.name, split=split, classes=classes, limit=limit, source=source)
