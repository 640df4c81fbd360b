"""The functional entry points."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.attacks.base import AttackResult
from robustlab.attacks.registry import get_attack
from robustlab.checks import check_positive_int
from robustlab.oracles import LabelOracle
from robustlab.threat import ThreatModel

__all__ = ["attack", "attack_batches"]


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


def attack_batches(
    model: nn.Module | LabelOracle,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    method: str = "pgd",
    *,
    batch_size: int = 256,
    targets: Tensor | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    **options: Any,
) -> AttackResult:
    """:func:`attack` over a data set too large for one batch; returns one concatenated result on the CPU.

    Batch ``i`` uses seed ``seed + i``, so the outcome does not depend on how many batches ran before a resume.
    """
    from tqdm.auto import tqdm

    check_positive_int("batch_size", batch_size)
    instance = get_attack(method).cls(**options)
    target_device = torch.device(device) if device is not None else x.device
    results = []
    starts = range(0, int(x.shape[0]), batch_size)
    for number, start in enumerate(tqdm(starts, desc=method, unit="batch", disable=not progress, leave=False)):
        stop = start + batch_size
        batch_targets = None if targets is None else targets[start:stop].to(target_device)
        result = instance.run(
            model,
            x[start:stop].to(target_device),
            y[start:stop].to(target_device),
            threat,
            targets=batch_targets,
            seed=seed + number,
        )
        results.append(_to_cpu(result))
    return AttackResult.concat(results)


def _to_cpu(result: AttackResult) -> AttackResult:
    moved = {name: getattr(result, name).cpu() for name in ("x_adv", "success", "distance", "queries", "audits")}
    gradients = None if result.gradients is None else result.gradients.cpu()
    extras = {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in result.extras.items()}
    return dataclasses.replace(result, gradients=gradients, extras=extras, **moved)
