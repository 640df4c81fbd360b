"""PGD adversarial training.

Madry, Makelov, Schmidt, Tsipras, Vladu. "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR
2018: minimize the cross-entropy of PGD adversarial examples (uniform random start, ``steps`` projected
steepest-ascent steps of size ``step_size``). The attack runs with BatchNorm in eval mode by default, as in the
distributed adversarial training reference (``dat-2022/dat``); ``attack_bn_mode="train"`` follows Rice et al.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.checks import check_choice, check_number, check_positive_int
from robustlab.training.objectives.base import Objective, ObjectiveConfig, StepContext, StepOutput, register_objective
from robustlab.training.perturb import BatchNormMode, pgd_perturb
from robustlab.utils import model_mode


@dataclass(frozen=True)
class PGDATConfig(ObjectiveConfig):
    """Options of :class:`PGDAT`.

    Attributes:
        steps: attack steps (10).
        rel_step_size: step as a fraction of eps (0.25: 2/255 at eps 8/255, 0.075 at eps 0.3).
        random_start: start the attack from a uniform point of the ball.
        bn_mode: BatchNorm mode while attacking ("eval").
    """

    steps: int = 10
    rel_step_size: float = 0.25
    random_start: bool = True
    bn_mode: BatchNormMode = "eval"

    def validate(self) -> None:
        check_positive_int("steps", self.steps)
        check_number("rel_step_size", self.rel_step_size, low=0, low_open=True)
        check_choice("bn_mode", self.bn_mode, ("train", "eval"))


@register_objective
class PGDAT(Objective):
    """PGD adversarial training (Madry et al. 2018)."""

    name = "pgd-at"
    Config = PGDATConfig
    config: PGDATConfig
    paper = "Madry et al., ICLR 2018"

    def step(self, model: nn.Module, x: Tensor, y: Tensor, context: StepContext) -> StepOutput:
        with model_mode(model, self.config.bn_mode):
            x_adv = pgd_perturb(
                lambda z: F.cross_entropy(model(z), y, reduction="sum"),
                x,
                self.threat,
                steps=self.config.steps,
                step_size=self.config.rel_step_size * self.threat.eps,
                random_start=self.config.random_start,
                generator=context.generator,
            )
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv, y)
        return StepOutput(loss=loss, logits_adv=logits_adv.detach(), x_adv=x_adv)
