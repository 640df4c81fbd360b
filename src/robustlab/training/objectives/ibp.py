"""Certified training with interval bound propagation (IBP) and CROWN-IBP.

Gowal, Dvijotham, Stanforth, Bunel, Qin, Uesato, Arandjelovic, Mann, Kohli. "On the Effectiveness of Interval
Bound Propagation for Training Verifiably Robust Models", 2018: minimize
``kappa * CE(f(x), y) + (1 - kappa) * CE(z_worst, y)`` where ``z_worst`` has 0 for the true class and minus the
lower bound of each margin ``f_y - f_j`` elsewhere, computed by IBP over the ball of radius ``eps_t``. ``eps_t``
ramps linearly from 0 to the threat model's eps and ``kappa`` from 1 to ``kappa_end`` between ``warmup`` and
``ramp`` (fractions of training). With ``bounds="crown-ibp"`` (Zhang et al., "Towards Stable and Efficient
Training of Verifiably Robust Neural Networks", ICLR 2020) the margins mix CROWN-IBP and IBP bounds, with the
CROWN-IBP weight ``beta`` ramping from 1 to 0.

The model must be an ``nn.Sequential`` that :mod:`robustlab.certification.bounds` supports; BatchNorm layers
must be in eval mode for bounds, so the bound pass runs in eval mode (the clean pass in train mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.certification.bounds import margin_bounds
from robustlab.checks import check_choice, check_number
from robustlab.errors import ConfigError
from robustlab.threat import ThreatModel
from robustlab.training.objectives.base import Objective, ObjectiveConfig, StepContext, StepOutput, register_objective
from robustlab.utils import model_mode


@dataclass(frozen=True)
class IBPConfig(ObjectiveConfig):
    """Options of :class:`IBPTraining`.

    Attributes:
        bounds: "ibp" or "crown-ibp".
        warmup: fraction of training with eps 0 and kappa 1 (clean training first).
        ramp: fraction of training at which eps reaches the threat model's eps and kappa reaches kappa_end.
        kappa_end: final weight of the clean loss (0.5 in Gowal et al.).
        train_eps_factor: train at this multiple of the threat model's eps (Gowal et al. use 1.1 on MNIST).
    """

    bounds: str = "ibp"
    warmup: float = 0.1
    ramp: float = 0.6
    kappa_end: float = 0.5
    train_eps_factor: float = 1.0

    def validate(self) -> None:
        check_choice("bounds", self.bounds, ("ibp", "crown-ibp"))
        check_number("warmup", self.warmup, low=0, high=1)
        check_number("ramp", self.ramp, low=0, high=1)
        if not self.warmup < self.ramp:
            raise ConfigError(f"need 0 <= warmup < ramp <= 1, got warmup={self.warmup!r}, ramp={self.ramp!r}")
        check_number("kappa_end", self.kappa_end, low=0, high=1)
        check_number("train_eps_factor", self.train_eps_factor, low=0, low_open=True)


def worst_case_logits(margin_lower: Tensor, labels: Tensor) -> Tensor:
    """Logits with 0 for the true class and ``-lower(f_y - f_j)`` for every other class j (in class order)."""
    batch, others = margin_lower.shape
    classes = others + 1
    out = torch.zeros(batch, classes, dtype=margin_lower.dtype, device=margin_lower.device)
    mask = torch.ones(batch, classes, dtype=torch.bool, device=margin_lower.device)
    mask[torch.arange(batch, device=labels.device), labels] = False
    out[mask] = -margin_lower.reshape(-1)
    return out


@register_objective
class IBPTraining(Objective):
    """IBP / CROWN-IBP certified training (Gowal et al. 2018; Zhang et al. 2020)."""

    name = "ibp"
    Config = IBPConfig
    config: IBPConfig
    attack_bn_mode = "eval"
    paper = "Gowal et al. 2018; Zhang et al., ICLR 2020"

    def schedule(self, progress: float) -> tuple[float, float, float]:
        """(eps_t, kappa_t, beta_t) at a fraction ``progress`` of training."""
        c = self.config
        ramp = min(max((progress - c.warmup) / (c.ramp - c.warmup), 0.0), 1.0)
        eps = ramp * self.threat.eps * c.train_eps_factor
        kappa = 1.0 - ramp * (1.0 - c.kappa_end)
        beta = 1.0 - ramp
        return eps, kappa, beta

    def step(self, model: nn.Module, x: Tensor, y: Tensor, context: StepContext) -> StepOutput:
        eps, kappa, beta = self.schedule(context.progress)
        logits = model(x)
        loss = kappa * F.cross_entropy(logits, y)
        scalars = {"eps": eps, "kappa": kappa}
        if eps > 0:
            threat = ThreatModel(self.threat.norm, eps, self.threat.lower, self.threat.upper)
            with model_mode(model, "eval"):
                margins = margin_bounds(model, x, y, threat, "ibp").margins
                if self.config.bounds == "crown-ibp" and beta > 0:
                    crown = margin_bounds(model, x, y, threat, "crown", intermediate="ibp").margins
                    margins = beta * crown + (1 - beta) * margins
            loss = loss + (1 - kappa) * F.cross_entropy(worst_case_logits(margins, y), y)
            scalars["verified_fraction"] = float((margins.detach() > 0).all(dim=1).float().mean())
        return StepOutput(loss=loss, logits_clean=logits.detach(), scalars=scalars)
