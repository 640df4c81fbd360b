"""Projected gradient descent (ascent on the attack loss) in the linf, l2 and l1 norms.

Madry, Makelov, Schmidt, Tsipras, Vladu. "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018. Uniform random start in the ball, ``steps`` steps of size ``step_size`` along the steepest-ascent
direction of the norm (sign for linf, normalized gradient for l2, a sparse direction for l1 as in Tramer & Boneh,
"Adversarial Training and Robustness for Multiple Perturbations", NeurIPS 2019), each followed by the exact
projection onto ball and box. Restarts keep the per-example worst case; ``early_stop`` (for evaluation) freezes
each example as soon as it is broken.

Example:
    >>> result = robustlab.attack(model, x, y, ThreatModel("linf", 0.3), method="pgd", steps=40)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robustlab.attacks.base import AttackConfig
from robustlab.attacks.iterative import IterativeAttack, State
from robustlab.attacks.registry import register_attack
from robustlab.checks import check_number, check_positive_int
from robustlab.errors import ConfigError
from robustlab.losses import attack_loss
from robustlab.threat import Norm, ThreatModel

__all__ = ["PGD", "PGDConfig"]


@dataclass(frozen=True)
class PGDConfig(AttackConfig):
    """Options of :class:`PGD`.

    Attributes:
        steps: gradient steps per restart.
        step_size: absolute step size; None means ``rel_step_size * eps``.
        rel_step_size: step as a fraction of eps when ``step_size`` is None; None means ``2.5 / steps``
            (Madry et al.), which is eps/4 for 10 steps.
        restarts: independent random restarts; the per-example worst case is kept.
        random_start: start from a uniform point in the ball (else from the clean input).
        loss: "ce", "margin" (CW) or "dlr"; targeted variants follow from the goal.
        early_stop: stop each example at its first success (the default, for evaluation: the same examples
            break, for less work); False runs every step on every example and returns the last iterate unless an
            earlier one was adversarial (the classic fixed-step attack).
        l1_sparsity: for l1, the quantile of gradient magnitudes a step spreads over (0.99: the top 1%).
    """

    steps: int = 10
    step_size: float | None = None
    rel_step_size: float | None = None
    restarts: int = 1
    random_start: bool = True
    loss: str = "ce"
    early_stop: bool = True
    l1_sparsity: float = 0.99

    def validate(self) -> None:
        check_positive_int("steps", self.steps)
        check_positive_int("restarts", self.restarts)
        if self.step_size is not None:
            check_number("step_size", self.step_size, low=0, low_open=True)
        if self.rel_step_size is not None:
            check_number("rel_step_size", self.rel_step_size, low=0, low_open=True)
        if self.step_size is not None and self.rel_step_size is not None:
            raise ConfigError("give step_size or rel_step_size, not both")
        check_number("l1_sparsity", self.l1_sparsity, low=0.0, high=1.0, high_open=True)
        attack_loss(self.loss)


def step_length(config: PGDConfig, eps: float) -> float:
    if config.step_size is not None:
        return config.step_size
    relative = config.rel_step_size if config.rel_step_size is not None else 2.5 / config.steps
    return relative * eps


@register_attack
class PGD(IterativeAttack):
    """Projected gradient descent (Madry et al. 2018), linf / l2 / l1, with restarts and early stop."""

    name = "pgd"
    norms = frozenset({Norm.LINF, Norm.L2, Norm.L1})
    Config = PGDConfig
    config: PGDConfig

    def _start(self, x: Tensor, threat: ThreatModel, generator: torch.Generator) -> State:
        x_adv = threat.random_start(x, generator) if self.config.random_start else x.clone()
        if threat.norm is Norm.LINF:
            low, high = threat.linf_bounds(x)
            return {"x_adv": x_adv, "low": low, "high": high}
        return {"x_adv": x_adv}

    def _step(self, state: State, grad: Tensor, x: Tensor, threat: ThreatModel, step: int) -> State:
        x_adv = state["x_adv"]
        size = step_length(self.config, threat.eps)
        if threat.norm is Norm.LINF:
            # The hot path of every linf evaluation. Updating the iterate in place matters on CPUs: a fresh
            # image-batch-sized tensor per operation costs page faults that add up to several percent of a small
            # model's forward+backward. The iterate and the gradient buffer belong to this run.
            x_adv.add_(grad.sign_(), alpha=size).clamp_(state["low"], state["high"])
            return state
        if threat.norm is Norm.L1:
            # Coordinates pinned at a box face by a gradient pointing outward cannot move: leave them out so the
            # sparse step spends its l1 budget where it has an effect.
            blocked = ((x_adv <= threat.lower) & (grad < 0)) | ((x_adv >= threat.upper) & (grad > 0))
            grad = grad.masked_fill(blocked, 0.0)
        direction = threat.steepest_ascent(grad, l1_sparsity=self.config.l1_sparsity)
        return {"x_adv": threat.project(x_adv + size * direction, x)}
