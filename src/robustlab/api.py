"""The functional entry points: one batch (:func:`attack`), and a data set in batches (:func:`attack_batches`,
:func:`attack_dataset`, :func:`iter_attack`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robustlab.attacks.base import AttackResult
from robustlab.attacks.registry import get_attack
from robustlab.checks import check_positive_int
from robustlab.data.arrayfiles import _stored_member
from robustlab.data.loading import in_order, iter_batches
from robustlab.data.rowfile import NpzWriter
from robustlab.data.streams import TensorPairs
from robustlab.errors import InvalidInputError
from robustlab.oracles import LabelOracle
from robustlab.threat import ThreatModel
from robustlab.utils import model_device

__all__ = ["AttackBatch", "attack", "attack_batches", "attack_dataset", "iter_attack"]


def attack(
    model: nn.Module | LabelOracle,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    method: str = "pgd",
    *,
    targets: Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> AttackResult:
    """Run the registered attack ``method`` on the batch ``(x, y)`` inside ``threat``.

    Args:
        model: a ``torch.nn.Module`` returning logits (white-box), or a :class:`ScoreOracle` /
            :class:`LabelOracle` for black-box attacks.
        x, y: inputs inside the threat model's box, and their true labels.
        threat: e.g. ``ThreatModel("linf", 0.3)``.
        method: a registered name (``robustlab.list_attacks()``), e.g. "pgd", "apgd", "fw", "fgsm".
        targets: explicit target labels for a targeted attack.
        seed, generator: randomness; results are reproducible for a fixed seed.
        **options: the attack's options (its ``Config`` fields), e.g. ``steps=40, restarts=5``.

    Returns:
        An :class:`AttackResult` with ``x_adv``, the re-checked ``success`` mask, ``distance``, per-example
        ``queries``/``gradients`` and ``wall_time``.
    """
    return get_attack(method).cls(**options).run(model, x, y, threat, targets=targets, seed=seed, generator=generator)


@dataclass
class AttackBatch:
    """One attacked batch of :func:`iter_attack`: the examples' positions in the data, labels and the result (CPU)."""

    rows: np.ndarray
    labels: Tensor
    result: AttackResult


def iter_attack(
    model: nn.Module | LabelOracle,
    data: Any,
    threat: ThreatModel,
    method: str = "pgd",
    *,
    batch_size: int = 256,
    targets: Tensor | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    workers: int = 0,
    progress: bool = False,
    **options: Any,
) -> Iterator[AttackBatch]:
    """Attack ``data`` (any :class:`~robustlab.data.ImageData`) batch after batch, in order, yielding each result.

    Batch ``i`` holds examples ``i * batch_size`` onwards and uses seed ``seed + i``, so its outcome depends only on
    its position. ``targets`` (one per example) makes the attack targeted. ``workers`` processes read the data
    ahead (:func:`robustlab.data.iter_batches`). Nothing but the current batch is held.
    """
    from tqdm.auto import tqdm

    batch_size = check_positive_int("batch_size", batch_size)
    instance = get_attack(method).cls(**options)
    target_device = _device_for(model, data, device)
    if targets is not None and len(targets) != len(data):
        raise InvalidInputError(f"{len(targets)} targets given for {len(data)} examples")
    index_batches = in_order(len(data), batch_size)
    loaded = iter_batches(data, index_batches, workers=workers, pin_memory=target_device.type == "cuda")
    bar = tqdm(zip(index_batches, loaded), total=len(index_batches), desc=method, unit="batch", disable=not progress)
    for number, (rows, (x, y)) in enumerate(bar):
        start, stop = int(rows[0]), int(rows[-1]) + 1
        batch_targets = None if targets is None else targets[start:stop].to(target_device)
        result = instance.run(
            model, x.to(target_device, non_blocking=True), y.to(target_device, non_blocking=True), threat,
            targets=batch_targets, seed=seed + number,
        )  # fmt: skip
        yield AttackBatch(rows, y.cpu(), _to_cpu(result))


def attack_batches(
    model: nn.Module | LabelOracle,
    x: Tensor | Any,
    y: Tensor | None,
    threat: ThreatModel,
    method: str = "pgd",
    *,
    batch_size: int = 256,
    targets: Tensor | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    workers: int = 0,
    **options: Any,
) -> AttackResult:
    """:func:`attack` over a data set too large for one batch; returns one concatenated result on the CPU.

    ``(x, y)`` are tensors, or ``x`` is a data set (:class:`~robustlab.data.ImageData`) and ``y`` is None. Batch
    ``i`` uses seed ``seed + i``, so the outcome does not depend on how many batches ran before a resume. The result
    holds every adversarial example in memory; :func:`attack_dataset` writes them to a file instead.
    """
    return attack_dataset(
        model, _as_data(x, y), threat, method, batch_size=batch_size, targets=targets, seed=seed, device=device,
        workers=workers, progress=progress, **options,
    )  # fmt: skip


def attack_dataset(
    model: nn.Module | LabelOracle,
    data: Any,
    threat: ThreatModel,
    method: str = "pgd",
    *,
    save_adv: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    targets: Tensor | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    workers: int = 0,
    progress: bool = False,
    **options: Any,
) -> AttackResult:
    """Attack every example of ``data`` in batches (as :func:`iter_attack`); with ``save_adv``, write the
    adversarial examples to that ``.npz`` as each batch finishes instead of keeping them.

    The file holds ``x`` (the adversarial examples, float32 ``(N, C, H, W)``), ``y`` (the true labels) and
    ``success``; it is written under a temporary name and appears only when complete. Its members are stored
    uncompressed, so :func:`robustlab.data.open_dataset` reads it back memory-mapped, and the returned result's
    ``x_adv`` is a copy-on-write memory map of it (pages are read when touched). Without ``save_adv`` the result
    holds ``x_adv`` in memory, as :func:`attack_batches` does.
    """
    data = _as_data(data, None)
    batches = iter_attack(
        model, data, threat, method, batch_size=batch_size, targets=targets, seed=seed, device=device,
        workers=workers, progress=progress, **options,
    )  # fmt: skip
    if save_adv is None:
        results = [batch.result for batch in batches]
        if not results:
            raise InvalidInputError("no examples to attack")
        return AttackResult.concat(results)
    return _write_adversarial(batches, data, save_adv)


def _write_adversarial(batches: Iterator[AttackBatch], data: Any, save_adv: str | os.PathLike[str]) -> AttackResult:
    """Write each batch's adversarial examples to ``save_adv`` as it comes; the result maps them from the file."""
    results, labels = [], []
    dtype = data.x.cpu()[:0].numpy().dtype if isinstance(data, TensorPairs) else np.float32
    with NpzWriter(save_adv, "x", (len(data), *data.image_shape), dtype) as writer:
        for batch in batches:
            writer.add(batch.result.x_adv)
            results.append(dataclasses.replace(batch.result, x_adv=batch.result.x_adv[:0]))
            labels.append(batch.labels)
        if not results:
            raise InvalidInputError("no examples to attack")
        merged = AttackResult.concat(results)
        path = writer.finish(y=torch.cat(labels).numpy(), success=merged.success.numpy())
    mapped = _stored_member(path, "x.npy")
    assert mapped is not None  # written uncompressed and non-empty just above
    x_adv = torch.from_numpy(mapped.memmap("c"))
    return dataclasses.replace(merged, x_adv=x_adv)


def _as_data(x: Tensor | Any, y: Tensor | None) -> Any:
    if isinstance(x, Tensor):
        if y is None:
            raise InvalidInputError("labels y are needed with tensors x (or pass a data set as x and y=None)")
        return TensorPairs(x, y)
    if y is not None:
        raise InvalidInputError("y must be None when x is a data set (its labels come from the data set)")
    if not (hasattr(x, "__getitem__") and hasattr(x, "__len__")):
        raise InvalidInputError(f"x must be a tensor or a map-style data set, got {type(x).__name__}")
    return x


def _device_for(model: Any, data: Any, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(data, TensorPairs):
        return data.x.device
    found = model_device(model) if isinstance(model, nn.Module) else None
    return found if found is not None else torch.device("cpu")


def _to_cpu(result: AttackResult) -> AttackResult:
    moved = {name: getattr(result, name).cpu() for name in ("x_adv", "success", "distance", "queries", "audits")}
    gradients = None if result.gradients is None else result.gradients.cpu()
    extras = {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in result.extras.items()}
    return dataclasses.replace(result, gradients=gradients, extras=extras, **moved)
