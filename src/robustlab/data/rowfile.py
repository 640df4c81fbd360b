"""Results that grow with the data, written to disk as they are found: a row file and a streamed ``.npz``.

- :class:`RowFile`: a float32 ``.npy`` array ``(N, C, H, W)`` read and written by rows, in place. The evaluation
  keeps its adversarial examples in one (a row per example), so its memory does not grow with the data set. It is
  accessed with ordinary positioned reads and writes rather than through a memory map, whose touched pages would
  count towards the process's resident memory; the file itself is a standard ``.npy`` that
  ``np.load(path, mmap_mode="r")`` maps.
- :class:`NpzWriter`: an ``.npz`` whose first array is written batch after batch (e.g. the adversarial examples of
  ``robustlab attack --save-adv``), then small arrays at the end. It is written under a temporary name and renamed
  when complete, so an interrupted run leaves no half-written file. Members are stored uncompressed, so the big
  array can be memory-mapped when read back (:func:`robustlab.data.open_npz`).
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from robustlab.errors import InvalidInputError

__all__ = ["NpzWriter", "RowFile"]

PathLike = str | os.PathLike[str]


def _npy_header(shape: tuple[int, ...], dtype: np.dtype[Any]) -> bytes:
    """The bytes of a version 1.0 (or 2.0 for a long header) ``.npy`` header."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


class RowFile:
    """A float32 ``.npy`` file of ``rows`` arrays shaped ``row_shape``, read and written by row index."""

    def __init__(self, path: Path, stream: io.FileIO, rows: int, row_shape: tuple[int, ...], offset: int) -> None:
        self.path, self._stream, self.rows, self.row_shape, self._offset = path, stream, rows, row_shape, offset
        self._row_bytes = int(np.prod(row_shape)) * 4

    @classmethod
    def create(cls, path: PathLike, rows: int, row_shape: Sequence[int]) -> RowFile:
        """A new file of zeros (sparse on disk until written), replacing any file at ``path``."""
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        shape = (int(rows), *(int(s) for s in row_shape))
        header = _npy_header(shape, np.dtype("<f4"))
        stream = io.FileIO(file, "w+")
        stream.write(header)
        stream.truncate(len(header) + int(np.prod(shape)) * 4)
        return cls(file, stream, shape[0], shape[1:], len(header))

    @classmethod
    def open(cls, path: PathLike, rows: int, row_shape: Sequence[int]) -> RowFile | None:
        """The existing file at ``path`` if it holds float32 ``(rows, *row_shape)``; None otherwise."""
        file = Path(path)
        expected = (int(rows), *(int(s) for s in row_shape))
        try:
            stream = io.FileIO(file, "r+")
        except OSError:
            return None
        try:
            version = np.lib.format.read_magic(stream)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = reader(stream)
            offset = stream.tell()
            size = os.fstat(stream.fileno()).st_size
        except (ValueError, OSError):
            stream.close()
            return None
        if tuple(shape) != expected or fortran_order or dtype != np.dtype("<f4") or size < offset + np.prod(shape) * 4:
            stream.close()
            return None
        return cls(file, stream, expected[0], expected[1:], offset)

    def write(self, rows: Tensor | np.ndarray, images: Tensor) -> None:
        """Write ``images[i]`` to row ``rows[i]``."""
        index = np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows, dtype=np.int64).reshape(-1)
        values = np.ascontiguousarray(images.detach().cpu().to(torch.float32).numpy(), dtype="<f4")
        if values.shape != (len(index), *self.row_shape):
            raise InvalidInputError(f"rows of {self.path} are {self.row_shape}, got {values.shape[1:]}")
        for row, value in zip(index.tolist(), values):
            self._stream.seek(self._offset + row * self._row_bytes)
            self._stream.write(value.tobytes())

    def read(self, rows: Tensor | np.ndarray) -> Tensor:
        """The rows ``rows`` as a float32 tensor ``(len(rows), *row_shape)``."""
        index = np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(index), *self.row_shape), dtype="<f4")
        for i, row in enumerate(index.tolist()):
            self._stream.seek(self._offset + row * self._row_bytes)
            view = memoryview(out[i]).cast("B")
            if self._stream.readinto(view) != self._row_bytes:
                raise InvalidInputError(f"{self.path} is shorter than its header says (row {row})")
        return torch.from_numpy(out)

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()

    def mapped(self) -> Tensor:
        """The whole array as a tensor over a copy-on-write memory map of the file (pages are read when touched)."""
        self.flush()
        return torch.from_numpy(np.load(self.path, mmap_mode="c", allow_pickle=False))


class NpzWriter:
    """An ``.npz`` written as the work goes: first the big array batch by batch, then small arrays; renamed into
    place by :meth:`finish`, removed by :meth:`abort`. Use as a context manager (an exception aborts)."""

    def __init__(self, path: PathLike, name: str, shape: Sequence[int], dtype: Any = np.float32) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._shape = tuple(int(s) for s in shape)
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".part")
        os.close(handle)
        self._temporary = Path(temporary)
        self._zip = zipfile.ZipFile(self._temporary, "w", zipfile.ZIP_STORED, allowZip64=True)
        header = _npy_header(self._shape, self._dtype)
        info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = len(header) + int(np.prod(self._shape)) * self._dtype.itemsize
        self._member: IO[bytes] | None = self._zip.open(info, "w", force_zip64=info.file_size >= zipfile.ZIP64_LIMIT)
        self._member.write(header)
        self._written = 0

    def add(self, batch: Tensor | np.ndarray) -> None:
        """Append rows to the big array."""
        values = batch.detach().cpu().numpy() if isinstance(batch, Tensor) else np.asarray(batch)
        values = np.ascontiguousarray(values, dtype=self._dtype)
        if values.shape[1:] != self._shape[1:] or self._written + len(values) > self._shape[0] or self._member is None:
            raise InvalidInputError(f"{self.path}: rows shaped {values.shape} do not fit the array {self._shape}")
        self._member.write(values.tobytes())
        self._written += len(values)

    def finish(self, **small: np.ndarray) -> Path:
        """Close the big array (all its rows must be written), add ``small`` arrays, and rename into place."""
        if self._member is None:
            raise InvalidInputError(f"{self.path} is already finished")
        if self._written != self._shape[0]:
            raise InvalidInputError(f"{self.path}: {self._written} of {self._shape[0]} rows written")
        self._member.close()
        self._member = None
        for key, value in small.items():
            with self._zip.open(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as member:
                np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
        self._zip.close()
        os.replace(self._temporary, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        try:
            if self._member is not None:
                self._member.close()
            self._zip.close()
        except (OSError, ValueError, RuntimeError):
            pass  # the file is removed below whatever state it is in
        self._member = None
        self._temporary.unlink(missing_ok=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if self._temporary.exists():  # not finished: finish() renamed it
            self.abort()
