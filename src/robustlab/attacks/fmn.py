"""FMN, the Fast Minimum-Norm attack, in the l0, l1, l2 and linf norms.

Pintor, Roli, Brendel, Biggio, "Fast Minimum-norm Adversarial Attacks through Adaptive Norm Constraints",
NeurIPS 2021 (reference code: ``maurapintor/Fast-Minimum-Norm-FMN-Attack``; the same algorithm in adv-lib's
``attacks/fast_minimum_norm.py`` and foolbox's ``attacks/fast_minimum_norm.py``). FMN alternates two updates from
``delta = 0``:

- the norm constraint ``eps``: while no adversarial point has been seen it is the linear estimate of the distance
  to the boundary, ``||delta||`` plus the norm of the smallest step reaching the linearized boundary (``m``: the
  margin); then it shrinks by
  ``1 - gamma`` at an adversarial iterate (never above the smallest adversarial norm found) and grows by
  ``1 + gamma`` at a non-adversarial one, capped at the largest perturbation the box allows. For l0, ``eps`` is a
  number of coordinates, starts at 1 and moves by at least one;
- the perturbation: one step of length ``alpha`` along the l2-normalized gradient of the margin (toward the goal),
  projected onto the ``eps``-ball of the norm intersected with the box.

``alpha`` and ``gamma`` follow cosine annealing, from ``alpha_init`` (1) to ``alpha_init / 100`` and from
``gamma_init`` (0.05) to ``gamma_final`` (0.001). The margin is ``max_{j != y} f_j - f_y`` (untargeted) or
``f_t - max_{j != t} f_j`` (targeted). Every iteration's forward pass tells whether the iterate is adversarial; the
nearest adversarial iterate per example is kept. ``steps`` iterations cost ``steps`` gradient evaluations.

Defaults: 100 steps (foolbox's; the paper reports 1,000). Differences from the reference, on purpose, all about the
box and exact ties:

- the linear estimate of the boundary is the smallest step to the linearized boundary *inside the box*
  (:func:`robustlab.attacks.fab.boundary_projection`); the reference's ``|m| / ||grad m||_*`` ignores the box;
- the projection is the exact one onto ball and box (``ThreatModel.project`` with a radius per example); the
  reference projects onto the ball, then clips, which spends part of ``eps`` on coordinates the box then removes;
- before any adversarial point is seen, the constraint is that estimate times ``1 + gamma``: the reference takes
  the estimate itself, which on a linear model (and inside a ReLU network's linear region) lands exactly on the
  boundary, where a tie is not adversarial, and can stay there.

Without these, an example whose nearest boundary lies beyond a face of the box is approached ever more slowly and
never crossed on a linear model. The box is the threat model's (the references assume [0, 1]); with
``early_stop`` and a threat model's eps, an example leaves once it has an adversarial point within eps (see
:mod:`robustlab.attacks.minimum_norm`). The optional warm start from given adversarial points is not implemented.

Example:
    >>> distances = robustlab.minimum_norm(model, x, y, "l1", method="fmn", steps=1000).distance
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks.fab import boundary_projection
from robustlab.attacks.minimum_norm import MinimumNormAttack, MinimumNormConfig, SmallestAdversarial
from robustlab.attacks.registry import register_attack
from robustlab.checks import check_number, check_positive_int
from robustlab.goals import Goal
from robustlab.losses import margin_loss
from robustlab.oracles import GradientOracle
from robustlab.threat import Norm, ThreatModel

__all__ = ["FMN", "FMNConfig", "largest_perturbation"]

State = dict[str, Tensor]


@dataclass(frozen=True)
class FMNConfig(MinimumNormConfig):
    """Options of :class:`FMN`. Defaults are the reference's (steps: foolbox's).

    Attributes:
        steps: iterations (100), one gradient evaluation each.
        alpha_init: the initial step length (1.0, an l2 length in input units); alpha_final: the last one (None:
            ``alpha_init / 100``).
        gamma_init, gamma_final: the relative change of the norm constraint, first and last (0.05, 0.001).
        early_stop: see :class:`~robustlab.attacks.minimum_norm.MinimumNormConfig`.
    """

    steps: int = 100
    alpha_init: float = 1.0
    alpha_final: float | None = None
    gamma_init: float = 0.05
    gamma_final: float = 0.001

    def validate(self) -> None:
        super().validate()
        check_positive_int("steps", self.steps)
        check_number("alpha_init", self.alpha_init, low=0, low_open=True)
        if self.alpha_final is not None:
            check_number("alpha_final", self.alpha_final, low=0, low_open=True)
        check_number("gamma_init", self.gamma_init, low=0, high=1, low_open=True, high_open=True)
        check_number("gamma_final", self.gamma_final, low=0, high=1, low_open=True, high_open=True)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def largest_perturbation(x: Tensor, threat: ThreatModel) -> Tensor:
    """Per example, the norm of the largest perturbation the box allows (the farther face, coordinate by
    coordinate); for l0 the number of coordinates."""
    flat = _flat(x)
    if threat.norm is Norm.L0:
        return torch.full((x.shape[0],), float(flat.shape[1]), dtype=x.dtype, device=x.device)
    room = torch.maximum(flat - threat.lower, threat.upper - flat)
    if threat.norm is Norm.LINF:
        return room.amax(dim=1)
    if threat.norm is Norm.L2:
        return room.norm(dim=1)
    return room.sum(dim=1)


@register_attack
class FMN(MinimumNormAttack):
    """FMN (Pintor et al. 2021): gradient steps inside an adaptive norm constraint that closes on the boundary."""

    name = "fmn"
    norms = frozenset({Norm.LINF, Norm.L2, Norm.L1, Norm.L0})
    Config = FMNConfig
    config: FMNConfig
    summary_line = "FMN: fast minimum-norm attack with an adaptive norm constraint (l0, l1, l2, linf)"

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
        alpha_final = config.alpha_init / 100 if config.alpha_final is None else config.alpha_final
        n = int(x.shape[0])
        initial_eps = 1.0 if threat.norm is Norm.L0 else math.inf
        state: State = {
            "index": torch.arange(n, device=x.device),
            "x": x,
            "delta": torch.zeros_like(x),
            "eps": torch.full((n,), initial_eps, dtype=x.dtype, device=x.device),
            "worst": largest_perturbation(x, threat),
            "found": torch.zeros(n, dtype=torch.bool, device=x.device),
        }
        for i in range(config.steps):
            cosine = (1 + math.cos(math.pi * i / config.steps)) / 2
            alpha = alpha_final + (config.alpha_init - alpha_final) * cosine
            gamma = config.gamma_final + (config.gamma_init - config.gamma_final) * cosine
            index = state["index"]
            subgoal = goal.subset(index)
            margin, logits, grad = oracle.loss_and_grad(state["x"] + state["delta"], subgoal, margin_loss, index)
            success = subgoal.is_success(logits)
            size = threat.distance(state["x"] + state["delta"], state["x"])
            record.offer(state["x"] + state["delta"], success, index)
            state["found"] = state["found"] | success
            state["eps"] = self._update_eps(state, success, size, margin, _flat(grad), record, gamma, threat)
            state["delta"] = self._step(state, grad, alpha, threat)
            leave = self._stops(record, index)
            if bool(leave.any()):
                if bool(leave.all()):
                    break
                state = {name: value[~leave] for name, value in state.items()}
        return {}

    @staticmethod
    def _update_eps(
        state: State,
        success: Tensor,
        size: Tensor,
        margin: Tensor,
        grad: Tensor,
        record: SmallestAdversarial,
        gamma: float,
        threat: ThreatModel,
    ) -> Tensor:
        """The norm constraint after an iteration: shrink at an adversarial iterate, grow (or, before any was seen,
        jump to the linear estimate of the boundary) at another; capped by the box."""
        eps, best = state["eps"], record.distance[state["index"]]
        if threat.norm is Norm.L0:
            smaller = torch.minimum(torch.minimum(eps - 1, (eps * (1 - gamma)).floor()), best)
            larger = torch.maximum(eps + 1, (eps * (1 + gamma)).floor())
            updated = torch.where(success, smaller, larger).clamp_min(0)
        else:
            to_boundary = _box_boundary_distance(state, margin, grad, threat)
            grown = torch.where(state["found"], eps * (1 + gamma), size + (1 + gamma) * to_boundary)
            updated = torch.where(success, torch.minimum(eps * (1 - gamma), best), grown)
        return torch.minimum(updated, state["worst"])

    @staticmethod
    def _step(state: State, grad: Tensor, alpha: float, threat: ThreatModel) -> Tensor:
        """``delta + alpha * grad / ||grad||_2``, projected exactly onto the eps-ball intersected with the box."""
        size = _flat(grad).norm(dim=1).clamp_min(1e-12)
        x = state["x"]
        moved = x + state["delta"] + alpha * grad / size.reshape((-1,) + (1,) * (grad.dim() - 1))
        return threat.project(moved, x, radius=state["eps"]) - x


def _box_boundary_distance(state: State, margin: Tensor, grad: Tensor, threat: ThreatModel) -> Tensor:
    """The norm of the smallest step that reaches the linearized boundary from ``x + delta`` inside the box (the
    reference's ``|m| / ||grad m||_*`` ignores the box, and under-estimates wherever it blocks the gradient)."""
    point = _flat(state["x"] + state["delta"])
    step = boundary_projection(grad, -margin, threat.lower - point, threat.upper - point, threat.norm)
    return threat.distance(step, torch.zeros_like(step))
