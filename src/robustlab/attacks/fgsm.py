"""Fast gradient sign method, and its l2/l1 counterparts (fast gradient method).

Goodfellow, Shlens, Szegedy. "Explaining and Harnessing Adversarial Examples", ICLR 2015: one step of size eps
along the sign of the loss gradient (the normalized gradient for l2, the sparse steepest direction for l1). With
``random_start`` and ``step_size`` it is the FGSM-RS attack of Fast-AT (Wong, Rice, Kolter, "Fast is better than
free", ICLR 2020): a uniform start in the ball, then a step of ``step_size`` (1.25 eps there), projected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robustlab.attacks.base import Attack, AttackConfig
from robustlab.attacks.registry import register_attack
from robustlab.checks import check_number
from robustlab.goals import Goal
from robustlab.losses import attack_loss
from robustlab.oracles import Access, GradientOracle
from robustlab.threat import Norm, ThreatModel

__all__ = ["FGSM", "FGSMConfig"]


@dataclass(frozen=True)
class FGSMConfig(AttackConfig):
    """Options of :class:`FGSM`.

    Attributes:
        step_size: the step; None means eps (classic FGSM).
        random_start: start from a uniform point in the ball (FGSM-RS of Fast-AT).
        loss: "ce", "margin" or "dlr".
    """

    step_size: float | None = None
    random_start: bool = False
    loss: str = "ce"

    def validate(self) -> None:
        if self.step_size is not None:
            check_number("step_size", self.step_size, low=0, low_open=True)
        attack_loss(self.loss)


@register_attack
class FGSM(Attack[GradientOracle]):
    """Fast gradient sign method (Goodfellow et al. 2015); FGSM-RS with a random start (Wong et al. 2020)."""

    name = "fgsm"
    access = Access.GRADIENT
    norms = frozenset({Norm.LINF, Norm.L2, Norm.L1})
    Config = FGSMConfig
    config: FGSMConfig

    def _perturb(
        self, oracle: GradientOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> Tensor:
        start = threat.random_start(x, generator) if self.config.random_start else x
        _, _, grad = oracle.loss_and_grad(start, goal, attack_loss(self.config.loss))
        step = self.config.step_size if self.config.step_size is not None else threat.eps
        return threat.project(start + step * threat.steepest_ascent(grad), x)
