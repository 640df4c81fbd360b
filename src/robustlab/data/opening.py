"""``open_dataset``: any data robustlab reads, as an :class:`~robustlab.data.ImageData` that reads lazily.

A path streams: nothing is held in memory but what locates the examples (and, for CIFAR's pickled batches and
compressed ``.npz`` members, the stored uint8 pixels). A built-in name gives the in-memory
:class:`~robustlab.data.ArrayDataset` of :func:`~robustlab.data.load_dataset` (the built-in sets are small), except
``cifar10`` found in a folder, which streams like any CIFAR path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustlab.checks import check_positive_int
from robustlab.data.arrayfiles import ArrayImages, find_npy_pair, open_npy, open_npz
from robustlab.data.builtin import DATASETS, MNIST_MD5, unknown_source
from robustlab.data.cifar import find_cifar, open_cifar
from robustlab.data.dataset import ArrayDataset
from robustlab.data.folders import ImageFolder, looks_like_image_folder
from robustlab.data.formats import cifar_folder, read_mnist_style_dir
from robustlab.data.preprocess import Preprocess
from robustlab.data.sources import SPLITS, default_cache_dir
from robustlab.data.streams import DatasetImages, StreamedImages, check_no_options
from robustlab.errors import ConfigError, DataNotFoundError

__all__ = ["open_dataset"]

PathLike = str | os.PathLike[str]


def open_dataset(
    source: Any,
    split: str = "test",
    *,
    limit: int | None = None,
    classes: Sequence[str] | None = None,
    preprocess: Preprocess | None = None,
    num_classes: int | None = None,
    shape: Sequence[int] | None = None,
    name: str | None = None,
    cache_dir: PathLike | None = None,
    root: PathLike | None = None,
    download: bool = True,
    seed: int = 0,
) -> Any:
    """Open a split of a data set for reading in batches; returns an :class:`~robustlab.data.ImageData`.

    Args:
        source: a path — a folder of class folders of images (:class:`~robustlab.data.ImageFolder`), CIFAR-10/100's
            python batches or their ``.tar.gz`` (:func:`~robustlab.data.open_cifar`), an ``.npz`` or a pair of
            ``.npy`` files (memory-mapped, :func:`~robustlab.data.open_npz`), or a folder of MNIST-style IDX files —;
            a built-in name (:func:`~robustlab.data.list_datasets`); or a ``torch.utils.data.Dataset`` yielding
            ``(image, label)`` (:class:`~robustlab.data.DatasetImages`).
        split: ``"train"`` or ``"test"``.
        limit: only the first ``limit`` examples (CIFAR reads only the batch files they lie in).
        classes: for image folders: the class folders to read, in label order.
        preprocess: resize, centre crop and channels (:class:`~robustlab.data.Preprocess`).
        num_classes, shape, name: for arrays and user data sets, as :func:`~robustlab.data.from_arrays` takes them.
        cache_dir, root, download, seed: for built-in names, as :func:`~robustlab.data.load_dataset` takes them.

    Example:
        >>> data = open_dataset("/data/imagenet", "test", preprocess=Preprocess(resize=256, crop=224))
        >>> x, y = data[0]        # one image, decoded now: float32 (3, 224, 224) in [0, 1]
    """
    if limit is not None:
        limit = check_positive_int("limit", limit)
    if not isinstance(split, str):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(source, str | os.PathLike):
        return _open_object(source, split, limit, classes, preprocess, num_classes, name)
    text = os.fspath(source)
    if DATASETS.key(text) is not None and not isinstance(source, os.PathLike):
        check_no_options(f"the built-in data set {text!r}", classes=classes, num_classes=num_classes)
        return _open_builtin(text, split, limit, preprocess, cache_dir, root, download, seed)
    if root is not None:
        raise ConfigError("root is for the built-in names mnist, fashion-mnist and cifar10; give the path directly")
    return _open_path(text, split, limit, classes, preprocess, num_classes, shape, name)


def _open_object(
    source: Any,
    split: str,
    limit: int | None,
    classes: Sequence[str] | None,
    preprocess: Preprocess | None,
    num_classes: int | None,
    name: str | None,
) -> Any:
    """An object: an ArrayDataset or a streamed source (limited), or a user data set to wrap."""
    if isinstance(source, ArrayDataset | StreamedImages) and preprocess is None:
        check_no_options("an opened data set", classes=classes, num_classes=num_classes)
        return source.head(limit) if limit is not None else source
    if isinstance(source, StreamedImages):
        raise ConfigError("give preprocess when the source is opened, not to an opened data set")
    if not isinstance(source, ArrayDataset):
        check_no_options("a torch data set (they have no class folders)", classes=classes)
    own_split = getattr(source, "split", None)
    wrapped = DatasetImages(
        source,
        name=name or getattr(source, "name", None),
        split=own_split if isinstance(own_split, str) else split,
        num_classes=num_classes or getattr(source, "num_classes", None),
        preprocess=preprocess,
    )
    return wrapped.head(limit) if limit is not None else wrapped


def _open_builtin(
    text: str,
    split: str,
    limit: int | None,
    preprocess: Preprocess | None,
    cache_dir: PathLike | None,
    root: PathLike | None,
    download: bool,
    seed: int,
) -> Any:
    """A built-in name: CIFAR-10 found in its folder streams; everything else is the in-memory ArrayDataset."""
    from robustlab.data import load_dataset

    info = DATASETS.get(DATASETS.key(text) or text)
    if info.name == "cifar10":
        folder = Path(root).expanduser() if root is not None else Path(cache_dir or default_cache_dir()) / "cifar10"
        found = cifar_folder(folder) if folder.is_dir() else None
        if found is not None:
            return open_cifar(found, split, limit=limit, preprocess=preprocess)
    data = load_dataset(text, split, limit=limit, cache_dir=cache_dir, seed=seed, root=root, download=download)
    if preprocess is None:
        return data
    return DatasetImages(data, name=data.name, split=data.split, num_classes=data.num_classes, preprocess=preprocess)


def _open_path(
    text: str,
    split: str,
    limit: int | None,
    classes: Sequence[str] | None,
    preprocess: Preprocess | None,
    num_classes: int | None,
    shape: Sequence[int] | None,
    name: str | None,
) -> StreamedImages:
    path = Path(text).expanduser()
    if split not in SPLITS:
        raise ConfigError(f"{path} has no split {split!r}; choose one of: {', '.join(SPLITS)}")
    arrays: dict[str, Any] = {
        "num_classes": num_classes, "shape": shape, "name": name, "limit": limit, "preprocess": preprocess,
    }  # fmt: skip
    if path.is_file():
        suffix = path.name.lower()
        if suffix.endswith(".npz"):
            check_no_options(f"{path} (an .npz file)", classes=classes)
            return open_npz(path, split=split, **arrays)
        if suffix.endswith(".npy"):
            check_no_options(f"{path} (an .npy file)", classes=classes)
            return open_npy(path, split=split, **arrays)
        if suffix.endswith((".tar.gz", ".tgz", ".tar")):
            check_no_options(f"{path} (a CIFAR archive)", classes=classes, num_classes=num_classes, shape=shape)
            return open_cifar(path, split, limit=limit, preprocess=preprocess)
        raise ConfigError(
            f"{path} is not a data file robustlab reads: give an .npz or .npy file, a CIFAR .tar.gz, or a folder"
        )
    if path.is_dir():
        return _open_folder(path, split, classes, **arrays)
    raise unknown_source(text, "a folder of images, a CIFAR archive, or an .npz/.npy file")


def _open_folder(
    path: Path,
    split: str,
    classes: Sequence[str] | None,
    *,
    num_classes: int | None,
    shape: Sequence[int] | None,
    name: str | None,
    limit: int | None,
    preprocess: Preprocess | None,
) -> StreamedImages:
    """A folder: CIFAR batches, an .npy pair, MNIST-style IDX files, or class folders of images (in that order)."""
    not_images = {"classes": classes}
    if find_cifar(path) is not None:
        check_no_options(f"{path} (CIFAR batches)", num_classes=num_classes, shape=shape, **not_images)
        return open_cifar(path, split, limit=limit, preprocess=preprocess)
    pair = find_npy_pair(path, split)
    if pair is not None:
        check_no_options(f"{path} (.npy files)", **not_images)
        return open_npy(pair[0], pair[1], split=split, num_classes=num_classes, shape=shape,
                        name=name or path.name, limit=limit, preprocess=preprocess)  # fmt: skip
    found = read_mnist_style_dir(path, split)
    if found is not None:
        check_no_options(f"{path} (IDX files)", **not_images)
        x, y, where = found
        return ArrayImages(x, y, name=name or path.name, split=split, num_classes=num_classes, shape=shape,
                           source=where, limit=limit, preprocess=preprocess)  # fmt: skip
    if looks_like_image_folder(path):
        check_no_options(f"{path} (an image folder)", num_classes=num_classes, shape=shape)
        return ImageFolder(path, split, classes=classes, limit=limit, preprocess=preprocess, name=name)
    raise DataNotFoundError(
        f"{path} holds no data robustlab recognizes for the {split} split: expected class sub-folders of images, "
        f"CIFAR-10/100's python batches, x_{split}.npy and y_{split}.npy (or x.npy and y.npy), or MNIST-style IDX "
        f"files ({', '.join(sorted(MNIST_MD5))})"
    )
