"""The Carlini & Wagner L2 attack: the classical minimum-l2 baseline.

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017 (reference code:
``carlini/nn_robust_attacks``, ``l2_attack.py``; adv-lib's ``attacks/carlini_wagner/l2.py``). Per example it
minimizes ``||x' - x||_2^2 + c * max(kappa - m(x'), 0)`` (``m``: the margin toward the goal, ``max_{j != y} f_j -
f_y`` or ``f_t - max_{j != t} f_j``; ``kappa``: the confidence) with Adam (learning rate 0.01) over a variable ``w``
with ``x' = lower + (upper - lower) (tanh(w) + 1) / 2``, which keeps ``x'`` in the box without clipping. A binary
search over ``c`` (from ``initial_const`` 1e-3, 9 searches) halves the interval around the smallest ``c`` that gave
an adversarial point, or multiplies ``c`` by 10 while none did; each search restarts Adam from ``x``. The nearest
adversarial point of any search is kept (with ``kappa > 0``, one whose margin exceeds ``kappa``).

Defaults are the reference's: 9 binary searches of at most 10,000 steps, stopped early when the objective fails to
fall by 0.01% over a tenth of the steps. That makes C&W a strong but slow baseline: ``steps=1000`` is often enough.
Each step costs one gradient evaluation.

Differences from the reference, on purpose: the early abort is per example (the reference stops a search when the
batch's total stalls, so one example's result depends on the others in its batch); an input box with an infinite
bound is used as is (``x' = w``, clipped to the box) instead of through tanh; with ``early_stop`` and a threat
model's eps, an example leaves once it has an adversarial point within eps (see
:mod:`robustlab.attacks.minimum_norm`).

Example:
    >>> distances = robustlab.minimum_norm(model, x, y, "l2", method="cw-l2", steps=1000).distance
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks.minimum_norm import MinimumNormAttack, MinimumNormConfig, SmallestAdversarial
from robustlab.attacks.registry import register_attack
from robustlab.checks import check_flag, check_number, check_positive_int
from robustlab.goals import Goal
from robustlab.losses import margin_loss
from robustlab.oracles import GradientOracle
from robustlab.threat import Norm, ThreatModel

__all__ = ["CarliniWagnerL2", "CarliniWagnerL2Config"]

BETA1, BETA2 = 0.9, 0.999  # Adam's moment decay rates (the reference's)
NO_UPPER = 1e10  # the binary search's upper bound on c before any adversarial point


@dataclass(frozen=True)
class CarliniWagnerL2Config(MinimumNormConfig):
    """Options of :class:`CarliniWagnerL2`. Defaults are the reference's.

    Attributes:
        steps: Adam steps per binary search (10,000), one gradient evaluation each.
        binary_search_steps: searches over the constant c (9).
        learning_rate: Adam's step size (0.01). initial_const: the first c (1e-3).
        confidence: kappa, the margin an adversarial point must exceed (0).
        abort_early: stop a search for an example whose objective fell by less than 0.01% over a tenth of the steps.
        early_stop: see :class:`~robustlab.attacks.minimum_norm.MinimumNormConfig`.
    """

    steps: int = 10_000
    binary_search_steps: int = 9
    learning_rate: float = 0.01
    initial_const: float = 1e-3
    confidence: float = 0.0
    abort_early: bool = True

    def validate(self) -> None:
        super().validate()
        check_positive_int("steps", self.steps)
        check_positive_int("binary_search_steps", self.binary_search_steps)
        check_number("learning_rate", self.learning_rate, low=0, low_open=True)
        check_number("initial_const", self.initial_const, low=0, low_open=True)
        check_number("confidence", self.confidence, low=0)
        check_flag("abort_early", self.abort_early)


class _BoxMap:
    """``x' = lower + width (tanh(w) + 1) / 2`` for a bounded box (the identity for an unbounded one)."""

    def __init__(self, threat: ThreatModel) -> None:
        self.threat = threat
        self.bounded = math.isfinite(threat.lower) and math.isfinite(threat.upper)
        self.width = threat.upper - threat.lower

    def to_variable(self, x: Tensor) -> Tensor:
        if not self.bounded:
            return x.clone()
        scaled = ((x - self.threat.lower) / self.width * 2 - 1) * (1 - 1e-6)
        return torch.atanh(scaled)

    def to_input(self, w: Tensor) -> Tensor:
        if not self.bounded:
            return self.threat.clip_to_box(w)
        return self.threat.lower + self.width * (torch.tanh(w) + 1) / 2

    def derivative(self, w: Tensor) -> Tensor:
        """``dx'/dw`` elementwise."""
        if not self.bounded:
            return torch.ones_like(w)
        return self.width / 2 * (1 - torch.tanh(w) ** 2)


@register_attack
class CarliniWagnerL2(MinimumNormAttack):
    """C&W L2 (Carlini & Wagner 2017): Adam on distance plus c times a hinge on the margin, binary search on c."""

    name = "cw-l2"
    norms = frozenset({Norm.L2})
    Config = CarliniWagnerL2Config
    config: CarliniWagnerL2Config
    summary_line = "C&W L2: the classical minimum-l2 attack (tanh box, Adam, binary search on c)"

    def _search(
        self,
        oracle: GradientOracle,
        x: Tensor,
        goal: Goal,
        threat: ThreatModel,
        generator: torch.Generator,
        record: SmallestAdversarial,
    ) -> dict[str, Any]:
        config = self.config
        n = int(x.shape[0])
        const = torch.full((n,), config.initial_const, dtype=x.dtype, device=x.device)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, NO_UPPER)
        box = _BoxMap(threat)
        everyone = torch.arange(n, device=x.device)
        for search in range(config.binary_search_steps):
            if config.binary_search_steps >= 10 and search == config.binary_search_steps - 1:
                const = upper.clone()  # the reference's last search repeats at the upper bound
            pending = everyone[~self._stops(record, everyone)]
            if pending.numel() == 0:
                break
            found = self._optimize(oracle, x, goal, box, record, pending, const[pending])
            success = torch.zeros(n, dtype=torch.bool, device=x.device)
            success[pending] = found
            touched = torch.zeros_like(success)
            touched[pending] = True
            upper = torch.where(success, torch.minimum(upper, const), upper)
            lower = torch.where(touched & ~success, torch.maximum(lower, const), lower)
            bracketed = upper < NO_UPPER / 10
            moved = torch.where(bracketed, (lower + upper) / 2, torch.where(success, const, const * 10))
            const = torch.where(touched, moved, const)
        return {}

    def _optimize(
        self,
        oracle: GradientOracle,
        x: Tensor,
        goal: Goal,
        box: _BoxMap,
        record: SmallestAdversarial,
        pending: Tensor,
        const: Tensor,
    ) -> Tensor:
        """One binary-search step: Adam from the clean inputs of ``pending`` with constants ``const``; returns which
        of them reached an adversarial point smaller than any earlier one of this search."""
        config = self.config
        clean = x[pending]
        origin = box.to_variable(clean)
        modifier = torch.zeros_like(clean)
        first, second = torch.zeros_like(clean), torch.zeros_like(clean)
        best = torch.full((len(pending),), math.inf, dtype=x.dtype, device=x.device)
        found = torch.zeros(len(pending), dtype=torch.bool, device=x.device)
        previous = torch.full_like(best, math.inf)
        rows = torch.arange(len(pending), device=x.device)  # positions still optimizing
        check_every = max(config.steps // 10, 1)
        for i in range(config.steps):
            index, subgoal = pending[rows], goal.subset(pending[rows])
            w = origin[rows] + modifier[rows]
            point = box.to_input(w)
            c = const[rows]

            def hinge(logits: Tensor, g: Goal, c: Tensor = c) -> Tensor:
                return c * (config.confidence - margin_loss(logits, g)).clamp_min(0)

            penalty, logits, grad = oracle.loss_and_grad(point, subgoal, hinge, index)
            offset = point - clean[rows]
            distance_sq = offset.reshape(len(rows), -1).pow(2).sum(dim=1)
            success = subgoal.is_success(logits)
            if config.confidence > 0:
                success = success & (margin_loss(logits, subgoal) > config.confidence)
            record.offer(point, success, index)
            distance = distance_sq.sqrt()
            smaller = success & (distance < best[rows])
            best[rows] = torch.where(smaller, distance, best[rows])
            found[rows] = found[rows] | smaller
            objective = distance_sq + penalty
            stalled = torch.zeros_like(success)
            if config.abort_early and i % check_every == 0:
                stalled = objective > previous[rows] * 0.9999
                previous[rows] = objective
            gradient = (2 * offset + grad) * box.derivative(w)
            step = self._adam(first, second, rows, gradient, i + 1)
            modifier[rows] = modifier[rows] - step
            leave = stalled | self._stops(record, index)
            if bool(leave.any()):
                rows = rows[~leave]
                if rows.numel() == 0:
                    break
        return found

    def _adam(self, first: Tensor, second: Tensor, rows: Tensor, gradient: Tensor, t: int) -> Tensor:
        """Adam's update for the ``rows`` (bias-corrected at step ``t``); the moments are updated in place."""
        first[rows] = BETA1 * first[rows] + (1 - BETA1) * gradient
        second[rows] = BETA2 * second[rows] + (1 - BETA2) * gradient * gradient
        denominator = (second[rows] / (1 - BETA2**t)).sqrt() + 1e-8
        return self.config.learning_rate / (1 - BETA1**t) * first[rows] / denominator
