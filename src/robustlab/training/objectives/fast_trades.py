"""Fast TRADES: the TRADES loss with a one-step inner maximization.

The single-step TRADES baseline of Chen, Cheng, Gan, Gu, Liu. "Efficient Robust Training via Backward Smoothing",
AAAI 2022 (reference ``jinghuichen/BackwardSmoothing``, ``trades_fast.py``): BatchNorm in eval mode, a uniform
random start in the eps-ball (moved into the box), one sign step of size eps on
``KL(softmax f(x) || softmax f(x'))``, projection; then the TRADES loss
``CE(f(x), y) + beta * KL`` with ``beta = 6``. The reference's step is 0.031 at eps 0.031, i.e. ``rel_step_size = 1``.
Chen et al. show it is prone to catastrophic overfitting, which Backward Smoothing was designed to avoid.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from robustlab.checks import check_number
from robustlab.training.objectives.base import Objective, ObjectiveConfig, StepContext, StepOutput, register_objective
from robustlab.training.objectives.trades import trades_perturbation, trades_regularized_loss
from robustlab.utils import model_mode

__all__ = ["FastTRADES", "FastTRADESConfig"]


@dataclass(frozen=True)
class FastTRADESConfig(ObjectiveConfig):
    """Options of :class:`FastTRADES`.

    Attributes:
        beta: weight of the KL regularizer (6).
        rel_step_size: the sign step as a fraction of eps (1.0, the reference's 0.031 at eps 0.031).
    """

    beta: float = 6.0
    rel_step_size: float = 1.0

    def validate(self) -> None:
        check_number("beta", self.beta, low=0)
        check_number("rel_step_size", self.rel_step_size, low=0, low_open=True)


@register_objective
class FastTRADES(Objective):
    """One-step TRADES from a uniform random start (the baseline of Chen et al. 2022)."""

    name = "fast-trades"
    Config = FastTRADESConfig
    config: FastTRADESConfig
    attack_bn_mode = "eval"
    paper = "Chen et al., AAAI 2022 (single-step TRADES baseline)"

    def step(self, model: nn.Module, x: Tensor, y: Tensor, context: StepContext) -> StepOutput:
        start = self.threat.random_start(x, context.generator)
        with model_mode(model, self.attack_bn_mode):
            x_adv = trades_perturbation(
                model, x, self.threat, start=start, steps=1, step_size=self.config.rel_step_size * self.threat.eps
            )
        return trades_regularized_loss(model, x, x_adv, y, self.config.beta)
