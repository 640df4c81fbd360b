"""What the training loop reads: any :class:`robustlab.data.ImageData`, by index, one batch at a time.

The training part, the validation part and every per-example state are positions in a data set; nothing here
needs the whole split in memory. A data set held in memory (:class:`~robustlab.data.ArrayDataset`) is indexed
directly; a streamed one (image folders, CIFAR archives, memory-mapped arrays, a user's ``Dataset``) is read batch
by batch, in the calling process or in ``DataLoader`` worker processes (:func:`robustlab.data.iter_batches`), with
pinned memory on CUDA. The batches, and the augmentation of every example (:mod:`robustlab.training.augment`), are
the same whatever the number of workers, so results do not depend on it and a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustlab.data import ImageData, Selection, iter_batches, read_batch, train_val_split
from robustlab.errors import InvalidInputError
from robustlab.threat import ThreatModel
from robustlab.training.augment import Augmentation, AugmentedData

__all__ = ["check_training_data", "first_examples", "split_training_data", "training_batches", "validation_batches"]

Batch = tuple[Tensor, Tensor]


def check_training_data(data: Any, threat: ThreatModel, what: str = "data") -> None:
    """``data`` must be an :class:`ImageData` whose first images lie in the threat model's box."""
    if not isinstance(data, ImageData):
        raise InvalidInputError(
            f"{what} must be a robustlab data set (robustlab.data.ImageData: an ArrayDataset, a stream from "
            f"robustlab.data.open_dataset, ...), got {type(data).__name__}; open a torch Dataset with "
            "robustlab.data.open_dataset(dataset)"
        )
    if len(data) == 0:
        raise InvalidInputError(f"{what} holds no examples")
    x, _ = read_batch(data, np.arange(min(len(data), 64)))
    threat.check_inputs(x, name="training data" if what == "data" else what)


def first_examples(data: Any, n: int) -> Any:
    """The first ``n`` examples of ``data`` (all of them when there are fewer), without copying a stream."""
    if n >= len(data):
        return data
    head = getattr(data, "head", None)
    return head(n) if callable(head) else Selection(data, np.arange(n))


def split_training_data(data: Any, val_data: Any | None, val_fraction: float, seed: int) -> tuple[Any, Any]:
    """(training part, validation part): ``val_data`` when given, else a seeded split held out of ``data``."""
    if val_data is not None:
        return data, val_data
    return train_val_split(data, val_fraction, seed=seed)


def training_batches(
    data: Any,
    order: Tensor,
    *,
    first_batch: int,
    batch_size: int,
    rank: int,
    world: int,
    augmentation: Augmentation,
    seed: int,
    epoch: int,
    workers: int,
    pin_memory: bool,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(images, labels, positions)`` of this process's share of each batch of one epoch, from ``first_batch``.

    Batch ``b`` is ``order[b * batch_size : (b + 1) * batch_size]``, of which process ``rank`` takes every
    ``world``-th example. Images come augmented with this epoch's draws (:class:`AugmentedData`).
    """
    steps = -(-len(order) // batch_size)
    shares = [order[b * batch_size : (b + 1) * batch_size][rank::world] for b in range(first_batch, steps)]
    source = AugmentedData(data, augmentation, seed=seed, epoch=epoch) if augmentation.active else data
    reader = iter_batches(source, [share.numpy() for share in shares], workers=workers, pin_memory=pin_memory)
    for share, (x, y) in zip(shares, _keeping_the_global_generator(reader)):
        yield x, y, share


def validation_batches(
    data: Any, batch_size: int, *, rank: int, world: int, workers: int
) -> Iterator[tuple[int, Batch]]:
    """``(start, (images, labels))`` of the batches of ``data`` in order that process ``rank`` validates on."""
    starts = [start for number, start in enumerate(range(0, len(data), batch_size)) if number % world == rank]
    ranges = [np.arange(start, min(start + batch_size, len(data))) for start in starts]
    yield from zip(starts, _keeping_the_global_generator(iter_batches(data, ranges, workers=workers)))


def _keeping_the_global_generator(batches: Iterator[Batch]) -> Iterator[Batch]:
    """``batches``, with torch's global random state as it was before the first one was read.

    A ``DataLoader`` with workers draws their base seed from the global generator when it starts; that draw would
    shift the random stream of the model's own layers (dropout) by the number of workers and differ between an
    interrupted and an uninterrupted run. The workers need no randomness of their own here.
    """
    with torch.random.fork_rng(devices=[]):
        first = next(batches, None)
    if first is None:
        return
    yield first
    yield from batches
