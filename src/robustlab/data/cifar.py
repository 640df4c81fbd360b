"""CIFAR-10 and CIFAR-100 from their python archives, read as far as a request needs.

The archives are the ones published at https://www.cs.toronto.edu/~kriz/cifar.html (and read by torchvision):

- ``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5`` (training,
  10,000 images each), ``test_batch`` and ``batches.meta`` (``label_names``);
- ``cifar-100-python.tar.gz`` holds ``cifar-100-python/`` with ``train`` (50,000), ``test`` (10,000) and ``meta``
  (``fine_label_names``); labels are the 100 fine classes (``fine_labels``).

Each batch is a pickled dict with ``b'data'``, uint8 ``(N, 3072)`` rows in C, H, W order, and the labels. The
pickles are read by an unpickler that rebuilds numpy arrays and plain containers only. :func:`open_cifar` takes the
extracted folder (or a folder holding it) or the ``.tar.gz`` itself, without extracting anything to disk. With a
``limit`` it reads only the batch files the first ``limit`` examples lie in; the batches it reads stay in memory as
uint8 (30 MB per 10,000 images, a quarter of the float32 tensors they become) and each image is converted when it
is read.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robustlab.data.arrayfiles import ArrayImages
from robustlab.data.formats import load_data_pickle
from robustlab.data.preprocess import Preprocess
from robustlab.errors import DataNotFoundError, InvalidInputError

__all__ = ["CIFAR_LAYOUTS", "CifarLayout", "find_cifar", "open_cifar"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class CifarLayout:
    """One of the two archives: its folder, batch files per split, label key and class names."""

    name: str
    folder: str
    files: dict[str, tuple[str, ...]]
    label_key: str
    meta_file: str
    names_key: str
    num_classes: int


CIFAR_LAYOUTS = (
    CifarLayout(
        "cifar10",
        "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        "labels",
        "batches.meta",
        "label_names",
        10,
    ),
    CifarLayout(
        "cifar100", "cifar-100-python", {"train": ("train",), "test": ("test",)}, "fine_labels", "meta",
        "fine_label_names", 100,
    ),
)  # fmt: skip


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".tar.gz", ".tgz", ".tar"))


def find_cifar(path: Path) -> tuple[CifarLayout, Path] | None:
    """The layout and the folder of CIFAR batches at ``path`` (the folder itself or its ``cifar-*`` sub-folder), or
    the layout and the archive when ``path`` is a ``.tar.gz``; None when neither."""
    if _is_archive(path):
        names = _archive_names(path)
        for layout in CIFAR_LAYOUTS:
            if any(name.split("/")[-1] == layout.files["test"][0] and layout.folder in name for name in names):
                return layout, path
        return None
    if not path.is_dir():
        return None
    for layout in CIFAR_LAYOUTS:
        for folder in (path, path / layout.folder):
            if all((folder / f).is_file() for f in (*layout.files["test"], layout.files["train"][0])):
                return layout, folder
    return None


def _archive_names(path: Path) -> list[str]:
    try:
        with tarfile.open(path, "r:*") as tar:
            return tar.getnames()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise InvalidInputError(f"{path} is not a readable .tar.gz archive: {exc}") from exc


class _Reader:
    """Reads the batch files of a folder or an archive by name, with errors that name the file."""

    def __init__(self, layout: CifarLayout, where: Path) -> None:
        self.layout, self.where = layout, where
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if _is_archive(where):
            try:
                self.tar = tarfile.open(where, "r:*")  # noqa: SIM115 (closed by close(), after every batch is read)
                prefix = layout.folder + "/"
                self.members = {
                    m.name.split("/")[-1]: m for m in self.tar.getmembers() if m.isfile() and prefix in m.name + "/"
                }
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                self.close()
                raise InvalidInputError(f"{where} is not a readable .tar.gz archive: {exc}") from exc

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None

    def name_of(self, file: str) -> str:
        return f"{self.where}:{self.layout.folder}/{file}" if self.tar is not None else str(self.where / file)

    def exists(self, file: str) -> bool:
        return file in self.members if self.tar is not None else (self.where / file).is_file()

    def load(self, file: str) -> Any:
        where = self.name_of(file)
        if not self.exists(file):
            raise DataNotFoundError(f"CIFAR batch file missing: {where}")
        if self.tar is None:
            with (self.where / file).open("rb") as stream:
                return load_data_pickle(stream, where)
        try:
            extracted = self.tar.extractfile(self.members[file])
            raw = extracted.read() if extracted is not None else b""
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise InvalidInputError(f"{self.where} is damaged: {file} cannot be read ({exc})") from exc
        return load_data_pickle(io.BytesIO(raw), where)

    def stamp(self, files: list[str]) -> str:
        paths = [self.where] if self.tar is not None else [self.where / f for f in files]
        return " ".join(f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)


def _batch_arrays(batch: Any, layout: CifarLayout, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 rows and labels of one unpickled batch, checked."""
    if not isinstance(batch, dict):
        raise InvalidInputError(f"{where} is not a {layout.name} batch (expected a dict)")
    entries = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in batch.items()}
    if "data" not in entries or layout.label_key not in entries:
        raise InvalidInputError(f"{where} is not a {layout.name} batch (no 'data' and '{layout.label_key}')")
    data, labels = np.asarray(entries["data"]), np.asarray(entries[layout.label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise InvalidInputError(f"{where}: 'data' must be uint8 rows of 3072 values, got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(f"{where}: expected {data.shape[0]} integer labels, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise InvalidInputError(
            f"{where}: labels must be in 0..{layout.num_classes - 1}, got values in [{labels.min()}, {labels.max()}]"
        )
    return data, labels.astype(np.int64)


def _class_names(reader: _Reader, layout: CifarLayout) -> list[str] | None:
    if not reader.exists(layout.meta_file):
        return None
    meta = reader.load(layout.meta_file)
    names = meta.get(layout.names_key.encode(), meta.get(layout.names_key)) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != layout.num_classes:
        return None
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def open_cifar(
    path: PathLike, split: str = "test", *, limit: int | None = None, preprocess: Preprocess | None = None
) -> ArrayImages:
    """CIFAR-10 or CIFAR-100 (found by :func:`find_cifar`) as a data set of its ``split``, reading only the batch
    files the first ``limit`` examples need."""
    location = Path(path).expanduser()
    found = find_cifar(location)
    if found is None:
        raise DataNotFoundError(
            f"{location} holds no CIFAR-10/100 python batches (cifar-10-batches-py, cifar-100-python)"
        )
    layout, where = found
    if split not in layout.files:
        raise InvalidInputError(f"{layout.name} has no split {split!r}; choose one of: {', '.join(layout.files)}")
    reader = _Reader(layout, where)
    try:
        rows: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        used: list[str] = []
        for file in layout.files[split]:
            if limit is not None and sum(int(y.shape[0]) for y in labels) >= limit:
                break
            data, y = _batch_arrays(reader.load(file), layout, reader.name_of(file))
            rows.append(data)
            labels.append(y)
            used.append(file)
        classes = _class_names(reader, layout)
        stamp = reader.stamp(used)
    finally:
        reader.close()
    images = np.concatenate(rows) if len(rows) > 1 else rows[0]
    dataset = ArrayImages(
        images, np.concatenate(labels), name=layout.name, split=split, num_classes=layout.num_classes,
        shape=(3, 32, 32), classes=classes, source=str(where), limit=limit, preprocess=preprocess,
    )  # fmt: skip
    dataset.stamp = stamp
    return dataset
