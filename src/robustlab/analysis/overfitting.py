"""Robust overfitting (Rice, Wong & Kolter, "Overfitting in Adversarially Robust Deep Learning", ICML 2020).

- :func:`generalization_gap` — per epoch, from a training run's history: robust training accuracy (accuracy on the
  training attack's examples, what the loop records as ``train_accuracy`` for adversarial methods) minus validation
  PGD accuracy, and how far the last epoch's validation robust accuracy fell below its best (Rice et al.'s measure
  of robust overfitting).
- :func:`track_flips` — which examples flip between robust and broken across checkpoints: each checkpoint is
  attacked by the same seeded PGD, and an example's flips count how often its outcome changed. Examples that flip
  often, or are never robust, are the hard instances. :func:`flip_record` does the counting on given outcomes (the
  per-epoch robust masks the training loop records for its validation examples).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.errors import ConfigError
from robustlab.threat import ThreatModel
from robustlab.utils import model_mode

__all__ = ["FlipRecord", "flip_record", "generalization_gap", "track_flips"]


def generalization_gap(history: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Per-epoch robust train accuracy, validation PGD accuracy, their gap, and the robust-overfitting drop."""
    train = list(history.get("train_accuracy", []))
    val = list(history.get("val_pgd_accuracy", []))
    if not train or len(train) != len(val):
        raise ConfigError("the history needs per-epoch train_accuracy and val_pgd_accuracy (a robustlab training run)")
    gap = [t - v for t, v in zip(train, val, strict=True)]
    robust = [r for r in history.get("val_robust_accuracy", val) if not math.isnan(r)] or val
    best = max(range(len(robust)), key=lambda i: robust[i])
    return {
        "epochs": list(range(1, len(train) + 1)),
        "robust_train_accuracy": train,
        "val_pgd_accuracy": val,
        "gap": gap,
        "best_epoch": best + 1,
        "best_val_robust_accuracy": robust[best],
        "last_val_robust_accuracy": robust[-1],
        "robust_overfitting": robust[best] - robust[-1],
    }


@dataclass(frozen=True)
class FlipRecord:
    """``robust[k, i]``: example ``i`` withstood PGD at checkpoint ``k`` (and was classified correctly).

    ``flips[i]`` counts the changes of outcome between consecutive checkpoints; ``hard`` lists the examples that
    flipped most (most first), then those never robust.
    """

    robust: Tensor
    flips: Tensor
    hard: list[int]

    def summary(self) -> dict[str, Any]:
        return {
            "robust_accuracy_per_checkpoint": self.robust.float().mean(1).tolist(),
            "examples_flipping": int((self.flips > 0).sum()),
            "mean_flips": float(self.flips.float().mean()),
            "never_robust": int((~self.robust.any(0)).sum()),
            "always_robust": int(self.robust.all(0).sum()),
            "hard_examples": self.hard,
        }


def track_flips(
    models: Sequence[nn.Module], x: Tensor, y: Tensor, threat: ThreatModel, *, steps: int = 10, seed: int = 0,
    hard: int = 20,
) -> FlipRecord:  # fmt: skip
    """Attack every checkpoint in ``models`` with the same seeded PGD on ``(x, y)``; the flip record."""
    import robustlab

    if len(models) < 2:
        raise ConfigError("tracking flips needs at least two checkpoints")
    masks = []
    for model in models:
        with model_mode(model, "eval"):
            result = robustlab.attack(model, x, y, threat, method="pgd", steps=steps, seed=seed)
            with torch.no_grad():
                correct = model(x).argmax(1) == y
        masks.append(correct & ~result.success)
    return flip_record(torch.stack(masks), hard=hard)


def flip_record(robust: Tensor, *, hard: int = 20) -> FlipRecord:
    """The flips of outcomes ``robust[k, i]`` (example ``i`` robust at checkpoint ``k``; boolean, checkpoints in
    order) and the ``hard`` hardest examples: most flips first (fewer robust checkpoints break ties), then those
    never robust."""
    if robust.dim() != 2 or robust.dtype != torch.bool:
        raise ConfigError(f"robust outcomes must be a boolean (checkpoints, examples) tensor, got {robust.dtype} "
                          f"of shape {tuple(robust.shape)}")  # fmt: skip
    robust = robust.cpu()
    examples = robust.shape[1]
    flips = (robust[1:] != robust[:-1]).sum(0)
    order = sorted(range(examples), key=lambda i: (-int(flips[i]), int(robust[:, i].sum())))
    flipping = [i for i in order if flips[i] > 0]
    never = [i for i in range(examples) if not bool(robust[:, i].any()) and flips[i] == 0]
    return FlipRecord(robust, flips, (flipping + never)[:hard])
