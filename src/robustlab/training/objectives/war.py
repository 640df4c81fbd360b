"""Width-adjusted regularization (WAR): adversarial training with an automatically adjusted lambda.

Wu, Chen, Cai, He, Gu. "Do Wider Neural Networks Really Help Adversarial Robustness?", NeurIPS 2021 (Jinghui
Chen's dissertation, ch. 5). Adversarial training is written as natural risk plus a robust regularizer,

    L_nat + lambda * L_rob,    L_rob = L(x_adv) - L(x)       (robust_loss="ce"; lambda = 1 is PGD-AT)
                               L_rob = KL(f(x) || f(x_adv))  (robust_loss="kl"; TRADES with beta = lambda),

and the paper shows that wider networks need a larger lambda: at the same lambda they reach a lower natural risk
but a worse perturbation stability. WAR transfers the balance found on a tuned *thin* network to a wide one by
keeping the ratio ``L_nat / L_rob`` near the thin network's ``zeta``, with a projected gradient step on lambda:

    lambda_t = max(lambda_{t-1} + alpha * (zeta - L_nat / L_rob), 0),    alpha = 0.1.

Update frequency: Algorithm 1 of the paper updates lambda inside the mini-batch loop, right after the weight update,
from the same mini-batch's L_nat and L_rob; we do the same at every optimizer step (the batch's loss uses the lambda
from before the update). A batch whose L_rob is not positive (the ratio is undefined) leaves lambda unchanged.
lambda is part of :meth:`WAR.state_dict`, so checkpoints resume it exactly, and is logged per epoch (``lambda``).

``zeta`` has no universal default: it is the ratio of the tuned thin network. Measure it with :func:`measure_zeta`
on that network (same attack and loss form), and pass it as ``zeta``. The attack is PGD with ``steps`` sign steps
of ``rel_step_size * eps`` (10 and 0.25; from a uniform start on the cross-entropy for "ce", from
``x + 0.001 N(0, I)`` on the KL for "kl", as in TRADES), with BatchNorm in eval mode as in the TRADES code the
paper builds on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.checks import check_choice, check_number, check_positive_int
from robustlab.data import ArrayDataset
from robustlab.errors import ConfigError
from robustlab.losses import kl_divergence
from robustlab.threat import ThreatModel
from robustlab.training.objectives.base import Objective, ObjectiveConfig, StepContext, StepOutput, register_objective
from robustlab.training.objectives.trades import trades_perturbation
from robustlab.training.perturb import pgd_perturb
from robustlab.utils import model_device, model_mode

__all__ = ["WAR", "WARConfig", "measure_zeta", "update_lambda"]

RobustLoss = Literal["ce", "kl"]


def update_lambda(lam: float, natural: float, robust: float, *, zeta: float, alpha: float) -> float:
    """One WAR step: ``max(lam + alpha * (zeta - natural / robust), 0)``; ``lam`` unchanged if ``robust <= 0``."""
    if not robust > 0 or not math.isfinite(natural) or not math.isfinite(robust):
        return lam
    return max(lam + alpha * (zeta - natural / robust), 0.0)


def _adversarial(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    robust_loss: RobustLoss,
    *,
    steps: int,
    step_size: float,
    generator: torch.Generator,
) -> Tensor:
    """The training attack of WAR (model already in the attack's BatchNorm mode)."""
    if robust_loss == "kl":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return trades_perturbation(model, x, threat, start=x + 0.001 * noise, steps=steps, step_size=step_size)
    return pgd_perturb(
        lambda z: F.cross_entropy(model(z), y, reduction="sum"),
        x,
        threat,
        steps=steps,
        step_size=step_size,
        random_start=True,
        generator=generator,
    )


def _losses(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, robust_loss: RobustLoss) -> tuple[Tensor, ...]:
    """``(L_nat, L_rob, logits_clean, logits_adv)`` of a batch, batch means."""
    logits_clean = model(x)
    logits_adv = model(x_adv)
    natural = F.cross_entropy(logits_clean, y)
    if robust_loss == "kl":
        robust = kl_divergence(logits_adv, logits_clean).mean()
    else:
        robust = F.cross_entropy(logits_adv, y) - natural
    return natural, robust, logits_clean, logits_adv


@dataclass(frozen=True)
class WARConfig(ObjectiveConfig):
    """Options of :class:`WAR`.

    Attributes:
        zeta: the target ratio ``L_nat / L_rob``, measured on a tuned thinner model (:func:`measure_zeta`);
            required.
        alpha: step of the lambda update (0.1).
        lam0: the initial lambda; None: 1.0 for "ce" (PGD-AT), 6.0 for "kl" (TRADES).
        robust_loss: "ce" (``L(x_adv) - L(x)``) or "kl" (the TRADES regularizer).
        steps, rel_step_size: the PGD attack (10 steps of eps/4).
    """

    zeta: float | None = None
    alpha: float = 0.1
    lam0: float | None = None
    robust_loss: RobustLoss = "ce"
    steps: int = 10
    rel_step_size: float = 0.25

    def validate(self) -> None:
        if self.zeta is None:
            raise ConfigError(
                "war needs zeta, the ratio L_nat / L_rob of a tuned thinner model: measure it with "
                "robustlab.training.objectives.war.measure_zeta(thin_model, data, threat) and pass zeta=..."
            )
        for name in ("zeta", "alpha", "rel_step_size"):
            check_number(name, getattr(self, name), low=0, low_open=True)
        if self.lam0 is not None:
            check_number("lam0", self.lam0, low=0)
        check_choice("robust_loss", self.robust_loss, ("ce", "kl"))
        check_positive_int("steps", self.steps)


@register_objective
class WAR(Objective):
    """Width-adjusted regularization (Wu et al. 2021): lambda follows the thin model's loss ratio zeta."""

    name = "war"
    Config = WARConfig
    config: WARConfig
    attack_bn_mode = "eval"
    paper = "Wu et al., NeurIPS 2021"

    def __init__(self, threat: ThreatModel, config: WARConfig | None = None, **options: Any) -> None:
        super().__init__(threat, config, **options)
        cfg = self.config
        self.lam = float(cfg.lam0 if cfg.lam0 is not None else (6.0 if cfg.robust_loss == "kl" else 1.0))

    def step(self, model: nn.Module, x: Tensor, y: Tensor, context: StepContext) -> StepOutput:
        cfg = self.config
        assert cfg.zeta is not None
        with model_mode(model, self.attack_bn_mode):
            x_adv = _adversarial(
                model, x, y, self.threat, cfg.robust_loss, steps=cfg.steps,
                step_size=cfg.rel_step_size * self.threat.eps, generator=context.generator,
            )  # fmt: skip
        natural, robust, logits_clean, logits_adv = _losses(model, x, x_adv, y, cfg.robust_loss)
        lam = self.lam
        self.lam = update_lambda(lam, float(natural.detach()), float(robust.detach()), zeta=cfg.zeta, alpha=cfg.alpha)
        return StepOutput(
            loss=natural + lam * robust,
            logits_clean=logits_clean.detach(),
            logits_adv=logits_adv.detach(),
            x_adv=x_adv,
            scalars={"lambda": lam, "loss_ratio": float(natural.detach()) / max(float(robust.detach()), 1e-12)},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.lam = float(state["lambda"])


def measure_zeta(
    model: nn.Module,
    data: ArrayDataset,
    threat: ThreatModel,
    *,
    robust_loss: RobustLoss = "ce",
    steps: int = 10,
    rel_step_size: float = 0.25,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """The ratio ``mean L_nat / mean L_rob`` of a trained (thin) model on ``data``: WAR's ``zeta``.

    Both losses are measured in eval mode with the same attack WAR uses for training.
    """
    device = model_device(model) or torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    natural_sum = robust_sum = 0.0
    with model_mode(model, "eval"):
        for start in range(0, len(data), batch_size):
            x = data.x[start : start + batch_size].to(device)
            y = data.y[start : start + batch_size].to(device)
            x_adv = _adversarial(
                model, x, y, threat, robust_loss, steps=steps, step_size=rel_step_size * threat.eps,
                generator=generator,
            )  # fmt: skip
            with torch.no_grad():
                natural, robust, _, _ = _losses(model, x, x_adv, y, robust_loss)
            natural_sum += float(natural) * len(y)
            robust_sum += float(robust) * len(y)
    if not robust_sum > 0:
        raise ConfigError("the model's robust regularizer is not positive on this data: zeta is undefined")
    return natural_sum / robust_sum
