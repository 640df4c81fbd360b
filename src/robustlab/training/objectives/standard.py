"""Standard (natural) training: cross-entropy on clean inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.training.objectives.base import Objective, ObjectiveConfig, StepContext, StepOutput, register_objective


@dataclass(frozen=True)
class StandardConfig(ObjectiveConfig):
    """Standard training has no options."""


@register_objective
class Standard(Objective):
    """Empirical risk minimization on clean inputs (the non-robust baseline)."""

    name = "standard"
    Config = StandardConfig
    adversarial = False

    def step(self, model: nn.Module, x: Tensor, y: Tensor, context: StepContext) -> StepOutput:
        logits = model(x)
        return StepOutput(loss=F.cross_entropy(logits, y), logits_clean=logits.detach())
