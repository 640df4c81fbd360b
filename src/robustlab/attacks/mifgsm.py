"""Momentum iterative FGSM.

Dong, Liao, Pang, Su, Zhu, Hu, Li. "Boosting Adversarial Attacks with Momentum", CVPR 2018. The gradient is
normalized by its l1 norm and accumulated with decay ``momentum`` (mu = 1.0 in the paper); each of ``steps`` steps
moves ``eps / steps`` along the steepest-ascent direction of the accumulated gradient (its sign for linf) and is
projected onto ball and box. Starts at the clean input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robustlab.attacks.base import AttackConfig
from robustlab.attacks.iterative import IterativeAttack, State
from robustlab.attacks.registry import register_attack
from robustlab.checks import check_number, check_positive_int
from robustlab.losses import attack_loss
from robustlab.threat import Norm, ThreatModel
from robustlab.utils import rows_like

__all__ = ["MIFGSM", "MIFGSMConfig"]


@dataclass(frozen=True)
class MIFGSMConfig(AttackConfig):
    """Options of :class:`MIFGSM`.

    Attributes:
        steps: iterations (10 in the paper).
        momentum: decay factor mu of the accumulated gradient.
        step_size: None means ``eps / steps`` (the paper's choice: the steps add up to eps).
        loss: "ce", "margin" or "dlr".
        early_stop: stop each example at its first success.
    """

    steps: int = 10
    momentum: float = 1.0
    step_size: float | None = None
    loss: str = "ce"
    early_stop: bool = True

    def validate(self) -> None:
        check_positive_int("steps", self.steps)
        if self.step_size is not None:
            check_number("step_size", self.step_size, low=0, low_open=True)
        check_number("momentum", self.momentum, low=0.0)
        attack_loss(self.loss)


@register_attack
class MIFGSM(IterativeAttack):
    """Momentum iterative FGSM (Dong et al. 2018)."""

    name = "mi-fgsm"
    norms = frozenset({Norm.LINF, Norm.L2})
    Config = MIFGSMConfig
    config: MIFGSMConfig

    def _start(self, x: Tensor, threat: ThreatModel, generator: torch.Generator) -> State:
        return {"x_adv": x.clone(), "velocity": torch.zeros_like(x)}

    def _step(self, state: State, grad: Tensor, x: Tensor, threat: ThreatModel, step: int) -> State:
        l1 = grad.abs().reshape(grad.shape[0], -1).sum(dim=1).clamp_min(1e-12)
        velocity = self.config.momentum * state["velocity"] + grad / rows_like(l1, grad)
        size = self.config.step_size if self.config.step_size is not None else threat.eps / self.config.steps
        x_adv = threat.project(state["x_adv"] + size * threat.steepest_ascent(velocity), x)
        return {"x_adv": x_adv, "velocity": velocity}
