"""What :func:`robustlab.evaluate` returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from robustlab.data.streams import TensorPairs, read_batch
from robustlab.evaluation.diagnostics import Diagnostic
from robustlab.evaluation.state import StepReport
from robustlab.threat import ThreatModel

__all__ = ["EvaluationResult"]


@dataclass
class EvaluationResult:
    """The outcome of :func:`evaluate`. Per-example tensors are on the CPU, in data order.

    Attributes:
        clean_correct: the clean prediction is right.
        broken: the prediction changed under attack (re-verified at the end).
        robust: correct and not broken (robust accuracy is its mean).
        clean_pred and adv_pred: predictions on the clean inputs and on ``x_adv``; labels: the true labels.
        broken_by: index of the cascade step that broke each example (-1: none).
        distance: distance of ``x_adv`` to the clean input in the threat model's norm.
        steps: per-attack reports in cascade order; diagnostics: every check's verdict.
        eps_curve: (eps values, robust accuracy) from the quick suite, when requested.
        adbd: average decision-boundary distance from RayS over correctly classified examples (full suite).
        examples: the evaluated data set (read by index: :meth:`clean_images`).
        adversarial: per example, the first adversarial example found, or the clean input where none was: a tensor
            for data held in memory, else a copy-on-write memory map of ``adversarial_file`` (rows are read from
            disk when touched).
        adversarial_file: the ``.npy`` file holding ``adversarial`` for streamed data (None for data in memory).
        minimum_norm: the smallest perturbations a minimum-norm attack found, when asked
            (:class:`~robustlab.evaluation.minimum_norm.MinimumNormSummary`: curve and median distance).
    """

    threat: ThreatModel
    suite: str
    clean_pred: Tensor
    adv_pred: Tensor
    labels: Tensor
    clean_correct: Tensor
    broken: Tensor
    robust: Tensor
    broken_by: Tensor
    distance: Tensor
    steps: list[StepReport]
    diagnostics: list[Diagnostic]
    eps_curve: tuple[list[float], list[float]] | None
    adbd: float | None
    wall_time: float
    examples: Any = None
    adversarial: Tensor | None = None
    adversarial_file: Path | None = None
    store: Any = field(default=None, repr=False)  # keeps a temporary file of adversarial examples alive
    minimum_norm: Any = None
    tried_hard: dict[str, float] = field(default_factory=dict)

    @property
    def headline(self) -> str:
        """How much to trust the number: the masks found and what was done about them, and the fraction of the
        robust examples each kind of attack (gradient, score-based, hard-label) attacked."""
        masks = [d for d in self.diagnostics if d.fired]
        found = (
            "masks found: " + "; ".join(f"{d.name} ({d.cost_line()}) -> {d.action or 'nothing to do'}" for d in masks)
            if masks
            else "no mask found"
        )
        robust = int(self.robust.sum())
        kinds = ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in self.tried_hard.items())
        return (
            f"Robust accuracy {100 * self.robust_accuracy:.2f}%; {found}. Of the {robust} robust examples, the share "
            f"each kind of attack tried: {kinds or 'none ran'}."
        )

    @property
    def x(self) -> Tensor:
        """The clean inputs. For streamed data this reads every example into memory: prefer :meth:`clean_images`."""
        if isinstance(self.examples, TensorPairs):
            return self.examples.x
        return self.clean_images(np.arange(len(self.examples)))

    @property
    def x_adv(self) -> Tensor:
        """Per example, the adversarial example found (the clean input where none was); see ``adversarial``."""
        assert self.adversarial is not None
        return self.adversarial

    def clean_images(self, index: Tensor | np.ndarray | list[int]) -> Tensor:
        """The clean inputs of the examples at ``index`` (read now)."""
        x, _ = read_batch(self.examples, index)
        return x

    def adversarial_images(self, index: Tensor | np.ndarray | list[int]) -> Tensor:
        """The adversarial examples (or clean inputs, where none was found) at ``index``."""
        assert self.adversarial is not None
        rows = index.cpu().numpy() if isinstance(index, Tensor) else np.asarray(index, dtype=np.int64)
        return self.adversarial[rows].clone()

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_correct.float().mean())

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean())

    @property
    def stability(self) -> float:
        """Fraction of examples whose prediction the attacks could not change."""
        return float((~self.broken).float().mean())

    def summary(self) -> dict[str, Any]:
        broken = self.broken & self.clean_correct
        return {
            "suite": self.suite,
            "norm": self.threat.norm.value,
            "eps": self.threat.eps,
            "examples": int(self.labels.shape[0]),
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "perturbation_stability": self.stability,
            "attack_success_rate": float(broken.sum()) / max(int(self.clean_correct.sum()), 1),
            "mean_distance_broken": float(self.distance[broken].mean()) if bool(broken.any()) else None,
            "adbd": self.adbd,
            "cascade": [dataclasses.asdict(s) | {"queries_to_success": None} for s in self.steps],
            "diagnostics": [d.as_dict() for d in self.diagnostics],
            "eps_curve": None if self.eps_curve is None else {"eps": self.eps_curve[0], "robust": self.eps_curve[1]},
            "wall_time_s": self.wall_time,
            "adversarial_file": None if self.adversarial_file is None else str(self.adversarial_file),
            "minimum_norm": None if self.minimum_norm is None else self.minimum_norm.summary(self.threat.eps),
            "tried_hard": dict(self.tried_hard),
            "headline": self.headline,
        }
