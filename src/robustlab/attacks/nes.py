"""NES-PGD: projected gradient steps along natural-evolution-strategies gradient estimates (score-based black box).

Ilyas, Engstrom, Athalye, Lin. "Black-box Adversarial Attacks with Limited Queries and Information", ICML 2018
(reference code: ``labsix/limited-blackbox-attacks``, ``attacks.py``, query-limited setting). Each iteration:

    g_t  = NES estimate of the loss gradient at x_t: q antithetic Gaussian pairs, radius mu (the paper's sigma),
           (1 / (2 mu q)) sum_i [L(x_t + mu u_i) - L(x_t - mu u_i)] u_i   (the symmetric Gaussian RGE)
    m_t  = momentum * m_{t-1} + (1 - momentum) * g_t
    x_{t+1} = project(x_t + lr_t * sign(m_t))        (l2: m_t / ||m_t||_2)

maximizing the loss (a targeted goal makes it minus the loss of the target). The step size is annealed on plateaus
as in the reference: the mean loss over the probes of each iteration is recorded, and when the minimized objective
at the end of a window of ``plateau_length`` iterations is higher than at its start, ``lr`` is divided by
``plateau_drop`` (not below ``min_lr``) and the window restarts.

Queries per example: one at the clean input, then ``2q + 1`` per iteration (the probes and the success check at the
new iterate). The reference checks success at the top of each iteration without counting that query, and counts
one line-search query it does not make in the query-limited setting; here every query made is counted, and none
that is not.

Example:
    >>> result = robustlab.attack(model, x, y, ThreatModel("linf", 0.3), method="nes", targets=t, queries=50_000)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from robustlab.attacks.base import AttackConfig
from robustlab.attacks.registry import register_attack
from robustlab.attacks.zo_engine import State, Step, ZerothOrderAttack, check_estimate_options
from robustlab.checks import check_number, check_positive_int
from robustlab.errors import ConfigError
from robustlab.threat import Norm
from robustlab.utils import rows_like
from robustlab.zeroth_order import RGE, GradientEstimator

__all__ = ["NES", "NESConfig"]


@dataclass(frozen=True)
class NESConfig(AttackConfig):
    """Options of :class:`NES`.

    Attributes:
        queries: query budget per example, every query included (10000; the reference's ``max_queries``).
        q: antithetic direction pairs per estimate (25: the reference's ``samples_per_draw`` of 50).
        mu: the Gaussian search radius sigma (0.001, the reference's).
        lr: initial step size; None: ``rel_lr * eps``.
        rel_lr: the step as a fraction of eps when ``lr`` is None (0.2: the reference's ``max_lr`` 0.01 at its
            ImageNet eps 0.05).
        min_lr: the smallest annealed step; None: ``lr / 200`` (the reference's 5e-5 for 0.01).
        momentum: of the estimates (0.9, the reference's).
        plateau_length: iterations of the annealing window (5, the reference's).
        plateau_drop: the step is divided by this on a plateau (2, the reference's).
        loss: ``"ce"`` (the reference's), ``"margin"`` or ``"dlr"``, on log-probabilities.
    """

    queries: int = 10_000
    q: int = 25
    mu: float = 0.001
    lr: float | None = None
    rel_lr: float = 0.2
    min_lr: float | None = None
    momentum: float = 0.9
    plateau_length: int = 5
    plateau_drop: float = 2.0
    loss: str = "ce"

    def validate(self) -> None:
        check_estimate_options(self.queries, self.q, self.mu, self.loss, mu_meaning="the search radius sigma")
        if self.lr is not None:
            check_number("lr", self.lr, low=0, low_open=True)
        check_number("rel_lr", self.rel_lr, low=0, low_open=True)
        if self.min_lr is not None:
            check_number("min_lr", self.min_lr, low=0, low_open=True)
        check_positive_int("plateau_length", self.plateau_length)
        if self.lr is not None and self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        check_number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_number("plateau_drop", self.plateau_drop, low=1.0, low_open=True)


@register_attack
class NES(ZerothOrderAttack):
    """NES-PGD (Ilyas et al. 2018): sign steps along antithetic Gaussian gradient estimates, plateau annealing."""

    name = "nes"
    norms = frozenset({Norm.LINF, Norm.L2})
    Config = NESConfig
    config: NESConfig

    def _estimator(self) -> GradientEstimator:
        return RGE(q=self.config.q, mu=self.config.mu, directions="gaussian", difference="symmetric")

    def _lr_bounds(self, eps: float) -> tuple[float, float]:
        lr = self.config.lr if self.config.lr is not None else self.config.rel_lr * eps
        min_lr = self.config.min_lr if self.config.min_lr is not None else lr / 200.0
        return lr, min(min_lr, lr)

    def _init_state(self, x: Tensor) -> State:
        # Per example: the momentum of the estimates, the step size (NaN: not set yet) and the window of mean
        # probe losses that detects plateaus.
        return {
            "momentum": torch.zeros_like(x),
            "lr": torch.full((x.shape[0],), float("nan"), dtype=torch.float64, device=x.device),
            **self._loss_window(x, self.config.plateau_length),
        }

    def _step(self, state: State, step: Step) -> Tensor:
        c = self.config
        rows = step.rows
        lr_max, lr_min = self._lr_bounds(step.threat.eps)
        momentum = self._update_momentum(state["momentum"], rows, step.grad, c.momentum)

        # Plateau annealing on the mean probe loss (the reference's ``l``), before the step as in the reference.
        lr = state["lr"][rows]
        lr = torch.where(torch.isnan(lr), torch.full_like(lr, lr_max), lr)
        first, last, full = self._push_loss(state, rows, -step.values.mean(dim=1))
        plateau = full & (last > first)
        lr = torch.where(plateau, (lr / c.plateau_drop).clamp_min(lr_min), lr)
        self._restart_window(state, rows, plateau)
        state["lr"][rows] = lr

        size = rows_like(lr.to(step.x.dtype), step.x)
        return step.x_adv + size * step.threat.steepest_ascent(momentum)
