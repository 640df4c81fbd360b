"""Fast adversarial training: FGSM with a random start.

Wong, Rice, Kolter. "Fast is better than free: Revisiting adversarial training", ICLR 2020 (reference
``locuslab/fast_adversarial``): a uniform start in the ball, one sign step of size ``1.25 * eps``, projection,
then cross-entropy on the result; BatchNorm stays in train mode while attacking. Use the cyclic learning-rate
schedule. At larger eps or step sizes it falls into catastrophic overfitting (robust accuracy collapses to about 0
within an epoch), which the training loop detects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.checks import check_number
from robustlab.training.objectives.base import Objective, ObjectiveConfig, StepContext, StepOutput, register_objective
from robustlab.training.perturb import pgd_perturb
from robustlab.utils import model_mode


@dataclass(frozen=True)
class FastATConfig(ObjectiveConfig):
    """Options of :class:`FastAT`.

    Attributes:
        rel_step_size: the FGSM step as a multiple of eps (1.25, the reference's).
        random_start: start from a uniform point of the ball (True; False is plain FGSM training).
    """

    rel_step_size: float = 1.25
    random_start: bool = True

    def validate(self) -> None:
        check_number("rel_step_size", self.rel_step_size, low=0, low_open=True)


@register_objective
class FastAT(Objective):
    """FGSM-RS adversarial training (Wong et al. 2020)."""

    name = "fast-at"
    Config = FastATConfig
    config: FastATConfig
    attack_bn_mode = "train"
    paper = "Wong, Rice, Kolter, ICLR 2020"

    def step(self, model: nn.Module, x: Tensor, y: Tensor, context: StepContext) -> StepOutput:
        with model_mode(model, self.attack_bn_mode):
            x_adv = pgd_perturb(
                lambda z: F.cross_entropy(model(z), y, reduction="sum"),
                x,
                self.threat,
                steps=1,
                step_size=self.config.rel_step_size * self.threat.eps,
                random_start=self.config.random_start,
                generator=context.generator,
            )
        logits_adv = model(x_adv)
        return StepOutput(loss=F.cross_entropy(logits_adv, y), logits_adv=logits_adv.detach(), x_adv=x_adv)
