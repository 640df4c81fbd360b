"""Batches of a data set by index, in the calling process or from ``DataLoader`` worker processes.

Every consumer of data (attacks over a data set, the evaluation's cascade, certification, denoiser training) says
which examples go in each batch — a range for a pass in order, the examples an attack still has to break, a seeded
permutation — and :func:`iter_batches` reads them. With ``workers=0`` the batches are read in the calling process;
with ``workers > 0`` a ``torch.utils.data.DataLoader`` decodes them in that many processes while the caller computes,
and pins them in page-locked memory when they go to a CUDA device. The batches, their order and their contents are
the same either way, so results do not depend on the number of workers.

An error a worker meets in the data (an unreadable file, a label out of range) comes back as the same one-line
robustlab error the calling process would raise, not as a worker's traceback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustlab.checks import check_positive_int
from robustlab.data.streams import read_batch
from robustlab.errors import RobustlabError

__all__ = ["in_order", "iter_batches", "read_rows", "release_freed_memory"]

Batch = tuple[Tensor, Tensor]


def in_order(count: int, batch_size: int) -> list[np.ndarray]:
    """Indices ``0 .. count - 1`` in batches of ``batch_size`` (the last one may be smaller)."""
    batch_size = check_positive_int("batch_size", batch_size)
    return [np.arange(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def read_rows(data: Any, indices: Sequence[int] | np.ndarray | Tensor) -> Batch:
    """Images and labels of ``indices`` (on the CPU), read in the calling process."""
    return read_batch(data, indices)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on other C libraries and systems."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


def release_freed_memory() -> None:
    """Give the pages of freed heap memory back to the system (glibc; a no-op elsewhere).

    Why: batch-sized buffers (a few MB: decoded images, their float copies) are freed and allocated again around
    small objects that stay, and glibc's raised mmap threshold serves them from the heap, whose holes it keeps. Over
    a stream of 20,000 CIFAR-size images that grew the resident memory by about one float32 copy of the data set,
    the very thing streaming avoids. ``malloc_trim(0)`` after each batch returns the holes (a heap walk, well under
    a millisecond against the batch's work).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass(frozen=True)
class _Failure:
    """A robustlab error raised in a worker, sent back to be raised again as itself."""

    kind: type[RobustlabError]
    message: str


class _BatchReader(torch.utils.data.Dataset[Any]):
    """What the workers index: a whole batch per request (``__getitems__``), failures as values."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        try:
            return [read_batch(self.data, np.asarray(indices, dtype=np.int64))]
        except RobustlabError as exc:
            return [_Failure(type(exc), str(exc))]
        finally:
            release_freed_memory()  # a worker decodes batch after batch too


def _first(items: list[Any]) -> Any:
    return items[0]


def iter_batches(
    data: Any,
    batches: Iterable[Sequence[int] | np.ndarray | Tensor],
    *,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Yield ``(images, labels)`` for each index batch of ``batches``, in order, on the CPU.

    Args:
        data: any :class:`~robustlab.data.ImageData` (or map-style data set of ``(image, label)`` tensors).
        batches: the indices of each batch.
        workers: processes decoding batches ahead of the caller (0: read in the calling process).
        pin_memory: put the batches in page-locked memory (for a fast, asynchronous copy to a CUDA device).
    """
    workers = check_positive_int("workers", workers, minimum=0)
    index_lists = [np.asarray(b.cpu() if isinstance(b, Tensor) else b, dtype=np.int64) for b in batches]
    if workers == 0:
        for index in index_lists:
            x, y = read_batch(data, index)
            pin = pin_memory and x.device.type == "cpu"  # tensors already on a GPU stay as they are
            yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)
            release_freed_memory()  # the caller is done with the batch: memory must not grow with the stream
        return
    loader = torch.utils.data.DataLoader(
        _BatchReader(data),
        batch_sampler=[index.tolist() for index in index_lists],
        num_workers=workers,
        collate_fn=_first,
        pin_memory=pin_memory,
    )
    for item in loader:
        if isinstance(item, _Failure):
            raise item.kind(item.message)
        yield item
        release_freed_memory()
