"""Gaussian data augmentation: the base-classifier training of randomized smoothing.

Cohen, Rosenfeld, Kolter. "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019, section 4:
train the base classifier on ``x + N(0, sigma^2 I)`` (no clipping to the box, as at certification time) so that
it classifies noisy inputs well; the smoothed classifier's certified radii grow with it. The noise comes from the
run's generator, so checkpoints resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.checks import check_number
from robustlab.training.objectives.base import Objective, ObjectiveConfig, StepContext, StepOutput, register_objective


@dataclass(frozen=True)
class GaussianConfig(ObjectiveConfig):
    """Options of :class:`GaussianAugmentation`.

    Attributes:
        sigma: noise standard deviation, in input units (the sigma the model will be certified with).
    """

    sigma: float = 0.25

    def validate(self) -> None:
        check_number("sigma", self.sigma, low=0, low_open=True)


@register_objective
class GaussianAugmentation(Objective):
    """Cross-entropy on Gaussian-noised inputs (Cohen et al. 2019), the base model of randomized smoothing."""

    name = "gaussian"
    Config = GaussianConfig
    config: GaussianConfig
    adversarial = False
    paper = "Cohen, Rosenfeld, Kolter, ICML 2019"

    def step(self, model: nn.Module, x: Tensor, y: Tensor, context: StepContext) -> StepOutput:
        noise = torch.randn(x.shape, generator=context.generator, device=x.device, dtype=x.dtype)
        logits = model(x + self.config.sigma * noise)
        return StepOutput(loss=F.cross_entropy(logits, y), logits_clean=logits.detach())
