"""TRADES: trade natural accuracy for robustness with a KL regularizer.

Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan. "Theoretically Principled Trade-off between Robustness and Accuracy",
ICML 2019 (reference ``yaodongyu/TRADES``, ``trades.py``). The loss of a batch is

    CE(f(x), y) + beta * mean_i KL(softmax f(x_i) || softmax f(x'_i))

where ``x'`` ascends the KL term from ``x + 0.001 * N(0, I)`` with ``steps`` projected sign steps; BatchNorm is in
eval mode while attacking (the reference calls ``model.eval()`` before ``trades_loss``). Both softmaxes carry
gradient in the training loss, as in the reference's ``nn.KLDivLoss`` with a non-detached target.

Defaults: ``beta = 6``, ``steps = 10`` and a step of ``0.007 / 0.031 * eps`` (the reference's CIFAR-10 step 0.007
at eps 0.031, expressed relative to eps: 0.0677 at MNIST's eps 0.3; the reference's own MNIST script uses 40 steps
of 0.01 and beta 1). The start noise ``0.001 * N(0, I)`` is absolute, as in the reference (it only breaks the
symmetry: the KL gradient vanishes at ``x' = x``); unlike the reference we move the start into the box before the
first gradient, so the model never sees an input outside it. The noise comes from the run's attack generator, never
from the global random state, so a resumed run repeats it exactly.

:func:`trades_regularized_loss`, :func:`trades_perturbation` and :func:`kl_ascent` are shared by Fast TRADES,
Backward Smoothing and WAR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.checks import check_number, check_positive_int
from robustlab.losses import kl_divergence
from robustlab.threat import ThreatModel
from robustlab.training.objectives.base import Objective, ObjectiveConfig, StepContext, StepOutput, register_objective
from robustlab.training.perturb import pgd_perturb
from robustlab.utils import model_mode

__all__ = ["TRADES", "TRADESConfig", "kl_ascent", "trades_perturbation", "trades_regularized_loss"]

TRADES_REL_STEP = 0.007 / 0.031  # the reference's step at its eps, as a fraction of eps


def kl_ascent(
    model: nn.Module,
    x: Tensor,
    logits_clean: Tensor,
    threat: ThreatModel,
    *,
    steps: int,
    step_size: float,
    start: Tensor,
) -> Tensor:
    """``steps`` projected steepest-ascent steps on ``sum_i KL(softmax logits_clean_i || softmax f(x'_i))``."""
    target = logits_clean.detach()
    return pgd_perturb(
        lambda z: kl_divergence(model(z), target).sum(),
        x,
        threat,
        steps=steps,
        step_size=step_size,
        start=start,
        random_start=False,
    )


def trades_perturbation(
    model: nn.Module, x: Tensor, threat: ThreatModel, *, start: Tensor, steps: int, step_size: float
) -> Tensor:
    """TRADES' inner maximization from ``start``: :func:`kl_ascent` away from the clean output ``f(x)``.

    The model is already in the attack's BatchNorm mode; the clean pass takes no gradient.
    """
    with torch.no_grad():
        logits_clean = model(x)
    return kl_ascent(model, x, logits_clean, threat, steps=steps, step_size=step_size, start=start)


def trades_regularized_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float) -> StepOutput:
    """``CE(f(x), y) + beta * mean KL(softmax f(x) || softmax f(x_adv))`` with gradient through both outputs."""
    logits_clean = model(x)
    logits_adv = model(x_adv)
    natural = F.cross_entropy(logits_clean, y)
    robust = kl_divergence(logits_adv, logits_clean).mean()
    return StepOutput(
        loss=natural + beta * robust,
        logits_clean=logits_clean.detach(),
        logits_adv=logits_adv.detach(),
        x_adv=x_adv,
        scalars={"natural_loss": float(natural.detach()), "kl": float(robust.detach())},
    )


@dataclass(frozen=True)
class TRADESConfig(ObjectiveConfig):
    """Options of :class:`TRADES`.

    Attributes:
        beta: weight of the KL regularizer (6, the reference's CIFAR-10 value).
        steps: sign steps of the inner maximization (10).
        rel_step_size: the step as a fraction of eps (0.007 / 0.031 = 0.2258, the reference's).
        init_std: standard deviation of the Gaussian start around x, absolute (0.001).
    """

    beta: float = 6.0
    steps: int = 10
    rel_step_size: float = TRADES_REL_STEP
    init_std: float = 0.001

    def validate(self) -> None:
        check_number("beta", self.beta, low=0)
        check_positive_int("steps", self.steps)
        check_number("rel_step_size", self.rel_step_size, low=0, low_open=True)
        check_number("init_std", self.init_std, low=0)


@register_objective
class TRADES(Objective):
    """TRADES (Zhang et al. 2019): cross-entropy plus beta times the KL of a PGD-on-KL perturbation."""

    name = "trades"
    Config = TRADESConfig
    config: TRADESConfig
    attack_bn_mode = "eval"
    paper = "Zhang et al., ICML 2019"

    def step(self, model: nn.Module, x: Tensor, y: Tensor, context: StepContext) -> StepOutput:
        cfg = self.config
        noise = torch.randn(x.shape, generator=context.generator, device=x.device, dtype=x.dtype)
        with model_mode(model, self.attack_bn_mode):
            x_adv = trades_perturbation(
                model, x, self.threat, start=x + cfg.init_std * noise, steps=cfg.steps,
                step_size=cfg.rel_step_size * self.threat.eps,
            )  # fmt: skip
        return trades_regularized_loss(model, x, x_adv, y, cfg.beta)
