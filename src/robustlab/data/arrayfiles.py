"""Image arrays read by rows: ``.npy`` files and ``.npz`` archives memory-mapped, or arrays already in memory.

An ``.npy`` file is memory-mapped (``np.load(mmap_mode="r")``); so is an array stored *uncompressed* in an ``.npz``
(``np.savez``): robustlab finds the member's bytes inside the zip file and maps them. A *compressed* member
(``np.savez_compressed``) cannot be mapped: it is decompressed into memory once, in its stored dtype (uint8 images
take a quarter of the float32 tensors they become). Either way an image is converted to float32 only when it is
read. Nothing is ever unpickled (``allow_pickle=False``; arrays of Python objects are refused).

Image files: ``x`` (images) with ``y`` (labels) in an ``.npz`` (or ``x_{split}``/``y_{split}``, Keras' layout), or
a pair of ``.npy`` files: ``x.npy``/``y.npy``, ``x_test.npy``/``y_test.npy``, ``test_images.npy``/
``test_labels.npy``, in a folder or named directly. Layouts follow :mod:`robustlab.data.convert`:
``(N, C, H, W)``, ``(N, H, W, C)``, ``(N, H, W)``, or flat rows with ``shape=(C, H, W)``.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from robustlab.data.convert import _check_shape_arg, _images_to_nchw, _labels_to_tensor
from robustlab.data.formats import PICKLE_REFUSAL, npz_keys, npz_member, npz_metadata, open_npz_archive
from robustlab.data.preprocess import Preprocess, array_batch_to_tensor
from robustlab.data.streams import LabelledImages
from robustlab.errors import DataNotFoundError, InvalidInputError

__all__ = ["ArrayImages", "find_npy_pair", "open_npy", "open_npz"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class MappedArray:
    """Where a memory-mapped array lives, so that any process (a DataLoader worker) can map it again."""

    path: str
    offset: int | None  # None: a whole .npy file; else the array's first byte inside an .npz
    dtype: str = ""
    shape: tuple[int, ...] = ()
    fortran_order: bool = False

    def open(self) -> np.ndarray:
        if self.offset is None:
            array: np.ndarray = np.load(self.path, mmap_mode="r", allow_pickle=False)
            return array
        return self.memmap("r")

    def memmap(self, mode: Literal["r", "c"]) -> np.ndarray:
        """The array mapped read-only (``"r"``) or copy-on-write (``"c"``); for an ``.npz`` member only."""
        order: Literal["F", "C"] = "F" if self.fortran_order else "C"
        mapped: np.ndarray = np.memmap(
            self.path, dtype=np.dtype(self.dtype), mode=mode, offset=self.offset or 0, shape=self.shape, order=order
        )
        return mapped


class ArrayImages(LabelledImages):
    """Images held in an array (memory-mapped or in memory) and their labels, converted one batch at a time.

    Args:
        images: the array (any layout of :mod:`robustlab.data.convert`), or a :class:`MappedArray` to map.
        labels: integer class indices, one per image (read into memory: 8 bytes an example).
        num_classes: defaults to ``max(labels) + 1``.
        shape: ``(C, H, W)`` for flat rows.
        limit: only the first ``limit`` examples.
        preprocess: resize / crop / channels (:class:`~robustlab.data.Preprocess`).
    """

    def __init__(
        self,
        images: np.ndarray | MappedArray,
        labels: np.ndarray,
        *,
        name: str,
        split: str = "",
        num_classes: int | None = None,
        shape: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        source: str = "",
        limit: int | None = None,
        preprocess: Preprocess | None = None,
    ) -> None:
        source = source or name
        self._mapping = images if isinstance(images, MappedArray) else None
        self._raw: np.ndarray | None = images if isinstance(images, np.ndarray) else None
        self._shape_arg = _check_shape_arg(shape)
        self._limit = limit
        self.preprocess = preprocess or Preprocess()
        self.stamp = ""  # sizes and modification times of the files read, for fingerprints
        x = self._array_of(source)
        label_array = np.asarray(labels)
        stored = self._raw.shape[0] if self._raw is not None and self._raw.ndim else 0
        if label_array.ndim == 0 or stored != label_array.shape[0]:
            raise InvalidInputError(
                f"{source} has {stored} images but {label_array.shape[0] if label_array.ndim else 0} labels"
            )
        self._labels = _labels_to_tensor(label_array[:limit] if limit is not None else label_array, source)
        if len(self._labels) == 0:
            raise InvalidInputError(f"{source} holds no examples")
        observed = int(self._labels.max()) + 1
        if num_classes is None:
            num_classes = len(classes) if classes is not None else observed
        elif observed > num_classes:
            raise InvalidInputError(f"labels in {source} go up to {observed - 1}, but num_classes={num_classes}")
        super().__init__(name=name, num_classes=int(num_classes), split=split, classes=classes, source=source)
        stored = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
        if self.preprocess == Preprocess():
            self._shape = stored
        else:
            height, width = self.preprocess.output_size(stored[1], stored[2])
            self._shape = (self.preprocess.channels or stored[0], height, width)

    def _array_of(self, source: str) -> np.ndarray:
        """The ``(N, C, H, W)`` view of the stored array (mapping it first in a fresh process)."""
        if self._raw is None:
            assert self._mapping is not None
            self._raw = self._mapping.open()
        x = _images_to_nchw(self._raw, self._shape_arg, source)
        return x[: self._limit] if self._limit is not None else x

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._mapping is not None:  # a worker maps the file again instead of receiving a copy of it
            state["_raw"] = None
            state.pop("_view", None)
        return state

    @property
    def _x(self) -> np.ndarray:
        view: np.ndarray | None = self.__dict__.get("_view")
        if view is None:
            view = self._array_of(self.source)
            self.__dict__["_view"] = view
        return view

    def _item(self, position: int) -> tuple[Tensor, int]:
        row = np.asarray(self._x[position])
        where = f"image {position} of {self.source}"
        if self.preprocess == Preprocess():
            image = array_batch_to_tensor(row[None], where)[0]
        elif row.dtype == np.uint8 and row.shape[0] in (1, 3):
            image = self.preprocess.uint8(row)
        else:
            image = self.preprocess.tensor(array_batch_to_tensor(row[None], where)[0])
        return image, int(self._labels[position])

    def _batch(self, positions: np.ndarray) -> tuple[Tensor, Tensor]:
        if self.preprocess != Preprocess() or len(positions) == 0:
            return super()._batch(positions)
        rows = np.asarray(self._x[positions])  # one fancy-indexed read of the mapped rows
        return array_batch_to_tensor(rows, f"images {positions.min()}..{positions.max()} of {self.source}"), (
            self._labels[torch.from_numpy(positions)]
        )

    def fingerprint(self) -> str:
        stamp = self.stamp
        if self._mapping is not None:
            stat = os.stat(self._mapping.path)
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        return f"{super().fingerprint()} {stamp} {self.preprocess.describe()}"


# ------------------------------------------------------------------------------------------------ .npz files
def _stored_member(path: Path, member: str) -> MappedArray | None:
    """The mapping of an uncompressed ``.npy`` member of a zip file, or None when it is compressed."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # compressed or encrypted
        return None
    with path.open("rb") as stream:
        stream.seek(info.header_offset)
        local = stream.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise InvalidInputError(f"{path}: the zip entry {member} is damaged")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        stream.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(stream)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = reader(stream)
        offset = stream.tell()
    if dtype.hasobject:
        raise InvalidInputError(f"{path}: array {member[:-4]!r} {PICKLE_REFUSAL}")
    if int(np.prod(shape)) == 0:
        return None  # nothing to map; read it (empty) normally
    return MappedArray(str(path), offset, dtype.str, tuple(int(s) for s in shape), bool(fortran_order))


def open_npz(
    path: PathLike,
    *,
    split: str | None = None,
    shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    name: str | None = None,
    limit: int | None = None,
    preprocess: Preprocess | None = None,
) -> ArrayImages:
    """An ``.npz`` of images ``x`` and labels ``y`` (or ``x_{split}``/``y_{split}``), images memory-mapped when stored
    uncompressed. Optional members ``shape``, ``num_classes`` and ``classes`` as :func:`robustlab.data.load_npz`
    reads them; arguments override them."""
    file, archive = open_npz_archive(path)
    with archive:
        x_key, y_key = npz_keys(archive, split, file)
        labels = npz_member(archive, y_key, file)
        shape, num_classes, classes = npz_metadata(archive, file, shape, num_classes)
        try:
            mapped = _stored_member(file, x_key + ".npy")
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise InvalidInputError(f"{file}: array {x_key!r} is damaged ({exc})") from exc
        images: np.ndarray | MappedArray = mapped if mapped is not None else npz_member(archive, x_key, file)
    return ArrayImages(
        images, labels, name=name or file.stem, split=split or "", num_classes=num_classes, shape=shape,
        classes=classes, source=str(file), limit=limit, preprocess=preprocess,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ .npy files
_IMAGE_WORD = re.compile(r"(?<![A-Za-z0-9])(x|X|images)(?![A-Za-z0-9])")


def find_npy_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The images and labels ``.npy`` files of ``split`` in ``folder``: ``x_{split}``/``y_{split}``,
    ``{split}_images``/``{split}_labels``, or ``x``/``y``; None when absent."""
    for images, labels in (
        (f"x_{split}.npy", f"y_{split}.npy"),
        (f"{split}_images.npy", f"{split}_labels.npy"),
        ("x.npy", "y.npy"),
    ):
        if (folder / images).is_file() and (folder / labels).is_file():
            return folder / images, folder / labels
    return None


def _labels_file(images: Path) -> Path:
    """``y.npy`` next to ``x.npy``, ``y_test.npy`` next to ``x_test.npy``, ``test_labels.npy`` next to
    ``test_images.npy``."""
    stem = _IMAGE_WORD.sub(lambda m: "labels" if m.group(1) == "images" else "y", images.stem, count=1)
    if stem == images.stem:
        raise InvalidInputError(
            f"{images}: cannot tell where its labels are; name the pair x.npy and y.npy (or x_test.npy and "
            "y_test.npy, test_images.npy and test_labels.npy), or save both in one .npz with arrays x and y"
        )
    return images.with_name(stem + images.suffix)


def _load_npy(path: Path, *, mmap: bool) -> np.ndarray:
    try:
        array: np.ndarray = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        if any(text in str(exc) for text in ("allow_pickle", "Object arrays", "Python objects")):
            raise InvalidInputError(f"{path} {PICKLE_REFUSAL}") from exc
        raise InvalidInputError(f"{path} is not a readable .npy file: {exc}") from exc
    except OSError as exc:
        raise InvalidInputError(f"{path} is not a readable .npy file: {exc}") from exc
    return array


def open_npy(
    images: PathLike,
    labels: PathLike | None = None,
    *,
    split: str = "",
    shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    name: str | None = None,
    limit: int | None = None,
    preprocess: Preprocess | None = None,
) -> ArrayImages:
    """Images in an ``.npy`` file (memory-mapped) and labels in another (by default the file named like it, see
    :func:`find_npy_pair`)."""
    image_file = Path(images).expanduser()
    if not image_file.is_file():
        raise DataNotFoundError(f"no such .npy file: {image_file}")
    label_file = Path(labels).expanduser() if labels is not None else _labels_file(image_file)
    if not label_file.is_file():
        raise DataNotFoundError(f"no labels for {image_file}: {label_file} does not exist")
    mapped = _load_npy(image_file, mmap=True)
    empty = int(np.prod(mapped.shape)) == 0
    spec: np.ndarray | MappedArray = mapped if empty else MappedArray(str(image_file), None)
    if isinstance(spec, MappedArray):
        del mapped  # mapped again lazily (and in each worker process)
    return ArrayImages(
        spec, _load_npy(label_file, mmap=False), name=name or image_file.parent.name or image_file.stem,
        split=split, num_classes=num_classes, shape=shape, source=str(image_file), limit=limit, preprocess=preprocess,
    )  # fmt: skip
