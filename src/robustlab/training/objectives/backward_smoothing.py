"""Backward Smoothing: a single-step TRADES whose start is smoothed backwards from the output space.

Chen, Cheng, Gan, Gu, Liu. "Efficient Robust Training via Backward Smoothing", AAAI 2022 (Jinghui Chen's
dissertation, ch. 6; reference ``jinghuichen/BackwardSmoothing``, ``trades_backward.py``). With BatchNorm in eval
mode:

1. draw ``psi ~ U(-1, 1)^classes`` per example and take one projected sign step from ``x`` that *decreases*
   ``KL(softmax(f(x) + gamma * psi) || softmax f(x'))``: the start moves toward an input whose output is the clean
   output smoothed by a random output-space perturbation (``gamma = 1``);
2. take ``steps`` (1) projected sign steps that *increase* the TRADES term ``KL(softmax f(x) || softmax f(x'))``;

both steps have size eps (the reference's 0.031 at eps 0.031, so ``rel_step_size = 1``). The model is then
trained on the TRADES loss ``CE(f(x), y) + beta * KL`` with ``beta = 6`` (the reference's default; its README
example uses 10). Reported on CIFAR-10 ResNet-18: 82.38% clean / 52.50% PGD in 164 min, against TRADES 82.33 /
52.74 in 482 min. ``psi`` is drawn from the run's attack generator, so resumed runs repeat it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustlab.checks import check_number, check_positive_int
from robustlab.losses import kl_divergence
from robustlab.training.objectives.base import Objective, ObjectiveConfig, StepContext, StepOutput, register_objective
from robustlab.training.objectives.trades import kl_ascent, trades_regularized_loss
from robustlab.utils import model_mode

__all__ = ["BackwardSmoothing", "BackwardSmoothingConfig"]


@dataclass(frozen=True)
class BackwardSmoothingConfig(ObjectiveConfig):
    """Options of :class:`BackwardSmoothing`.

    Attributes:
        beta: weight of the TRADES KL regularizer (6).
        gamma: scale of the uniform output-space smoothing noise (1.0).
        rel_step_size: both steps' size as a fraction of eps (1.0).
        steps: TRADES ascent steps after the smoothing step (1).
    """

    beta: float = 6.0
    gamma: float = 1.0
    rel_step_size: float = 1.0
    steps: int = 1

    def validate(self) -> None:
        check_number("beta", self.beta, low=0)
        check_number("gamma", self.gamma, low=0)
        check_number("rel_step_size", self.rel_step_size, low=0, low_open=True)
        check_positive_int("steps", self.steps)


@register_objective
class BackwardSmoothing(Objective):
    """Backward Smoothing (Chen et al. 2022): a smoothed start and one TRADES step, then the TRADES loss."""

    name = "backward-smoothing"
    Config = BackwardSmoothingConfig
    config: BackwardSmoothingConfig
    attack_bn_mode = "eval"
    paper = "Chen et al., AAAI 2022"

    def step(self, model: nn.Module, x: Tensor, y: Tensor, context: StepContext) -> StepOutput:
        cfg = self.config
        step_size = cfg.rel_step_size * self.threat.eps
        with model_mode(model, self.attack_bn_mode):
            # The smoothing step starts at x itself, so its forward pass also gives the clean logits.
            point = x.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(point)
                logits_clean = logits.detach()
                psi = torch.rand(
                    logits_clean.shape, generator=context.generator, device=x.device, dtype=logits_clean.dtype
                )
                smoothed = logits_clean + cfg.gamma * (2 * psi - 1)
                (grad,) = torch.autograd.grad(-kl_divergence(logits, smoothed).sum(), point)
            start = self.threat.project(x + step_size * self.threat.steepest_ascent(grad), x)
            x_adv = kl_ascent(model, x, logits_clean, self.threat, steps=cfg.steps, step_size=step_size, start=start)
        return trades_regularized_loss(model, x, x_adv, y, cfg.beta)
