"""The functional entry points."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustlab.attacks.base import AttackResult
from robustlab.attacks.registry import get_attack
from robustlab.oracles import LabelOracle
from robustlab.threat import ThreatModel

__all__ = ["attack"]


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
    info = get_attack(method)
    return info.cls(**options).run(model, x, y, threat, targets=targets, seed=seed, generator=generator)
