"""Minimum-norm attacks: the smallest adversarial perturbation per example, and the eps view of it.

A minimum-norm attack (``fab``, ``fab-t``, ``fmn``, ``ddn``, ``cw-l2``) takes no budget: per example it searches
the adversarial input nearest to the clean one in a norm, inside the input box. It serves both questions robustness
is asked with, through the one :class:`~robustlab.attacks.base.Attack` API:

- *Is there an adversarial example within eps?* Run it with a ``ThreatModel(norm, eps)``. An example is broken when
  the smallest perturbation found lies in the ball; with ``early_stop`` (the default) it leaves the search as soon
  as one does. An example with no perturbation inside the ball gets the point of the ball nearest to the smallest
  adversarial one found (re-checked like every result: it is rarely adversarial), or its clean input.
- *How far is the nearest adversarial example?* :func:`minimum_norm` runs it without eps: the threat model's ball
  contains the whole box (:func:`unconstrained_threat`), early stop is off, and ``result.distance`` is, per
  example, the smallest perturbation found (``result.success``: one was found), re-checked by a fresh forward pass.
  Robust accuracy at every eps follows from one run (:func:`robust_accuracy_at`).

``result.extras["smallest_distance"]`` holds the attack's own record of the smallest adversarial perturbation per
example (``inf`` when none), measured on its own forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.attacks.base import Attack, AttackConfig, AttackResult
from robustlab.attacks.registry import get_attack
from robustlab.checks import check_flag, check_positive_int
from robustlab.errors import ConfigError
from robustlab.goals import Goal
from robustlab.oracles import Access, GradientOracle
from robustlab.threat import Norm, ThreatModel
from robustlab.utils import rows_like

__all__ = [
    "MinimumNormAttack",
    "MinimumNormConfig",
    "SmallestAdversarial",
    "minimum_norm",
    "robust_accuracy_at",
    "unconstrained_threat",
]

UNBOUNDED_RADIUS = 1e300  # the ball of an unconstrained search when the box itself is unbounded


@dataclass(frozen=True)
class MinimumNormConfig(AttackConfig):
    """Options every minimum-norm attack has.

    Attributes:
        early_stop: with a threat model's eps, an example leaves the search once a perturbation within eps is
            found (evaluation); False keeps shrinking it (``minimum_norm`` always runs without).
        line_search: bisection steps (one forward pass each) that finally move each example's nearest adversarial
            point toward its clean input along the segment between them, as long as it stays adversarial; an
            iterative search stops some way past the boundary (DDN's norm moves by 5% a step). 0: none.
    """

    early_stop: bool = True
    line_search: int = 0

    def validate(self) -> None:
        check_flag("early_stop", self.early_stop)
        check_positive_int("line_search", self.line_search, minimum=0)


class SmallestAdversarial:
    """Per example, the adversarial point nearest to the clean input seen so far, and its distance."""

    def __init__(self, x: Tensor, threat: ThreatModel) -> None:
        self.x = x
        self.threat = threat
        self.point = x.clone()
        self.distance = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)

    @property
    def found(self) -> Tensor:
        return torch.isfinite(self.distance)

    def offer(self, points: Tensor, success: Tensor, index: Tensor | None = None) -> Tensor:
        """Keep the ``success`` rows of ``points`` (examples ``index``, all when None) that are nearer than the
        best so far; returns their distances."""
        clean = self.x if index is None else self.x[index]
        distance = self.threat.distance(points, clean)
        current = self.distance if index is None else self.distance[index]
        better = success & (distance < current)
        if index is None:
            self.point = torch.where(rows_like(better, points), points, self.point)
            self.distance = torch.where(better, distance, self.distance)
        elif bool(better.any()):
            chosen = index[better]
            self.point[chosen] = points[better]
            self.distance[chosen] = distance[better]
        return distance

    def shrink_along_segment(self, oracle: GradientOracle, goal: Goal, steps: int) -> None:
        """Bisect, per example with a nearest adversarial point ``p`` (not the clean input itself), the smallest
        ``t`` in (0, 1] for which ``x + t (p - x)`` still meets ``goal``; each adversarial midpoint is offered. The
        segment lies in the box (both ends do) and inside the ball (it only comes nearer)."""
        index = (self.found & (self.distance > 0)).nonzero().flatten()
        if steps == 0 or index.numel() == 0:
            return
        clean, far, subgoal = self.x[index], self.point[index], goal.subset(index)
        low = torch.zeros(index.numel(), dtype=clean.dtype, device=clean.device)
        high = torch.ones_like(low)
        for _ in range(steps):
            middle = (low + high) / 2
            points = clean + rows_like(middle, clean) * (far - clean)
            success = subgoal.is_success(oracle.logits(points, index))
            self.offer(points, success, index)
            high, low = torch.where(success, middle, high), torch.where(success, low, middle)

    def within_eps(self, index: Tensor | None = None) -> Tensor:
        """Examples (of ``index``) whose smallest perturbation found lies in the threat model's ball."""
        distance = self.distance if index is None else self.distance[index]
        return distance <= self.threat.eps

    def candidates(self) -> Tensor:
        """What the attack returns: the smallest adversarial point when in the ball, else the nearest point of the
        ball to it (the clean input when none was found)."""
        inside = self.within_eps()
        if bool(inside.all()):
            return self.point
        return torch.where(rows_like(inside, self.x), self.point, self.threat.project(self.point, self.x))


class MinimumNormAttack(Attack[GradientOracle]):
    """A white-box attack that minimizes the perturbation's norm; subclasses implement :meth:`_search`."""

    access = Access.GRADIENT
    config: MinimumNormConfig

    def _perturb(
        self, oracle: GradientOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        record = SmallestAdversarial(x, threat)
        extras = self._search(oracle, x, goal, threat, generator, record) or {}
        record.shrink_along_segment(oracle, goal, self._line_search_steps())
        return record.candidates(), {"smallest_distance": record.distance, **extras}

    def _line_search_steps(self) -> int:
        return self.config.line_search

    def _search(
        self,
        oracle: GradientOracle,
        x: Tensor,
        goal: Goal,
        threat: ThreatModel,
        generator: torch.Generator,
        record: SmallestAdversarial,
    ) -> dict[str, Any] | None:
        """Offer every adversarial point found to ``record``; optionally return extra results."""
        raise NotImplementedError

    def _stops(self, record: SmallestAdversarial, index: Tensor) -> Tensor:
        """Examples of ``index`` that may leave the search: with ``early_stop``, those broken within eps."""
        if getattr(self.config, "early_stop", False):
            return record.within_eps(index)
        return torch.zeros(index.shape[0], dtype=torch.bool, device=index.device)


def unconstrained_threat(norm: str | Norm, x: Tensor, lower: float = 0.0, upper: float = 1.0) -> ThreatModel:
    """The threat model of a search without eps: ``norm`` and the box, with a ball containing the whole box.

    Its radius is the box's diameter in ``norm`` for inputs shaped like ``x`` (for l0: the number of coordinates),
    so the final projection only clips to the box and every adversarial point counts.
    """
    norm = Norm.parse(norm)
    width = float(upper) - float(lower)
    dim = int(x[0].numel()) if x.dim() > 1 else 1
    radius = {
        Norm.LINF: width,
        Norm.L2: width * math.sqrt(dim),
        Norm.L1: width * dim,
        Norm.L0: float(dim),
    }[norm]
    if not math.isfinite(radius):
        radius = UNBOUNDED_RADIUS
    return ThreatModel(norm, radius, lower, upper)


def minimum_norm(
    model: nn.Module | GradientOracle,
    x: Tensor,
    y: Tensor,
    norm: str | Norm = "l2",
    method: str = "fmn",
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
    targets: Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> AttackResult:
    """The smallest adversarial perturbation ``method`` finds for each example of ``(x, y)``, with no eps.

    Args:
        model: a ``torch.nn.Module`` returning logits (or a :class:`GradientOracle`).
        x, y: inputs inside ``bounds`` and their labels. targets: explicit target labels (targeted search).
        norm: the norm to minimize (``linf``, ``l2``, ``l1``; ``l0`` for ``fmn``); ``ddn`` and ``cw-l2`` are l2 only.
        method: a registered minimum-norm attack: ``fmn`` (default), ``fab``, ``fab-t``, ``ddn`` or ``cw-l2``.
        **options: the attack's options, e.g. ``steps=1000``.

    Returns:
        An :class:`AttackResult` whose ``distance`` is the smallest perturbation found per example and ``success``
        whether one was found (both re-checked by a fresh forward pass; ``distance`` is 0 where none was).
    """
    info = get_attack(method)
    if not issubclass(info.cls, MinimumNormAttack):
        names = ", ".join(i.name for i in _minimum_norm_attacks())
        raise ConfigError(f"{info.name} is not a minimum-norm attack; choose one of {names}")
    if options.get("early_stop", False):
        raise ConfigError("minimum_norm searches without eps: early_stop=True would stop at the first adversarial")
    options["early_stop"] = False
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ConfigError("x must be a batch tensor (examples along the first dimension)")
    threat = unconstrained_threat(norm, x, *bounds)
    attack = info.cls(**options)
    return attack.run(model, x, y, threat, targets=targets, seed=seed, generator=generator)


def robust_accuracy_at(result: AttackResult, eps_values: Sequence[float], correct: Tensor | None = None) -> list[float]:
    """Robust accuracy at each eps from one :func:`minimum_norm` result: an example is robust at eps when it is
    ``correct`` (all, when None) and no adversarial perturbation of norm at most eps was found."""
    correct = torch.ones_like(result.success) if correct is None else correct.to(result.success.device).bool()
    distance = torch.where(result.success, result.distance, torch.full_like(result.distance, math.inf))
    n = max(int(correct.numel()), 1)
    return [float((correct & (distance > float(eps))).sum()) / n for eps in eps_values]


def _minimum_norm_attacks() -> list[Any]:
    from robustlab.attacks.registry import ATTACKS

    return [info for info in ATTACKS.list() if issubclass(info.cls, MinimumNormAttack)]
