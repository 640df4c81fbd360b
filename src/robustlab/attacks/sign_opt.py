"""Sign-OPT: hard-label attack by sign-SGD on the boundary-distance function, Linf and L2.

Minhao Cheng, Simranjit Singh, Patrick Chen, Pin-Yu Chen, Sijia Liu, Cho-Jui Hsieh. "Sign-OPT: A
Query-Efficient Hard-label Adversarial Attack", ICLR 2020 (reference code: ``cmhcbb/attackbox``,
``attack/Sign_OPT.py`` for L2 and ``attack/Sign_OPT_lf.py`` for Linf). A hard-label baseline for RayS.

The attack minimizes ``g(theta)``, the distance along the direction ``theta`` (unit norm in the threat model's
norm) at which ``x + g * theta`` first meets the goal; it needs only labels to evaluate ``g`` by a binary search.
Per example:

1. ``init_directions`` (100) Gaussian directions, one query each at ``x + theta``; for each adversarial one, in
   order, a binary search for ``g`` (starting at the best ``g`` so far, rejected with one query if that point is
   not adversarial; tolerance 1e-3 for L2, 1e-5 for Linf);
2. repeat: the sign of the directional derivative of ``g`` along ``k`` (200) random directions ``u`` is read from
   one query each at ``x + g * normalize(theta + beta * u)`` (adversarial means g decreased); the estimate is the
   mean of ``-+u``; a line search on the step (start ``alpha`` 0.2, doubled while it improves, else quartered
   until it does, 15 tries each) where each trial evaluates g locally from the current value (1% steps out, then
   bisection to ``beta / 500``); when the step has collapsed (below 1e-4 for L2, 1e-6 for Linf) alpha is reset to
   1 and beta divided by 10, and the search ends once beta < 1e-8.

Unlike the reference, every point is clipped to the box (the reference never clips, so its points can leave
[0, 1]), and every query is counted (the reference forgets the acceptance query of its initial binary search and
the clean check). In ``"eps"`` mode an example stops at its first queried adversarial point within eps;
``"adbd"`` uses the whole budget. Untargeted only, as the reference's public code (its targeted variant needs
training images of the target class).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from robustlab.attacks._decision import DecisionConfig, Program, Search, Walk, WalkAttack
from robustlab.attacks.registry import register_attack
from robustlab.checks import check_number, check_positive_int
from robustlab.threat import Norm

__all__ = ["SignOPT", "SignOPTConfig"]


@dataclass(frozen=True)
class SignOPTConfig(DecisionConfig):
    """Options of :class:`SignOPT` (defaults from the reference code).

    Attributes:
        queries: query budget per example, including the clean check.
        mode: ``"eps"`` stops each example at its first adversarial point within eps; ``"adbd"`` uses the budget.
        k: random directions per sign-gradient estimate.
        alpha: initial line-search step.
        beta: smoothing radius of the directional probes.
        init_directions: Gaussian directions tried at the start.
        max_lambda: the local search gives up on a direction whose boundary lies beyond this distance.
    """

    title: ClassVar[str] = "Sign-OPT"

    k: int = 200
    alpha: float = 0.2
    beta: float = 0.001
    init_directions: int = 100
    max_lambda: float = 20.0

    def validate(self) -> None:
        super().validate()
        check_positive_int("k", self.k)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("beta", self.beta, low=0, low_open=True)
        check_positive_int("init_directions", self.init_directions)
        check_number("max_lambda", self.max_lambda, low=0, low_open=True)


class _SignOPTWalk(Walk):
    """One example's Sign-OPT run (the steps of the module docstring): ``g(theta)`` is the distance along the
    unit direction ``theta`` at which ``x0 + g * theta`` meets the goal."""

    config: SignOPTConfig

    def setup(self) -> None:
        linf = self.threat.norm is Norm.LINF
        self.linf = linf
        self.order = math.inf if linf else 2.0
        self.init_tol = 1e-5 if linf else 1e-3
        self.min_alpha = 1e-6 if linf else 1e-4

    def run(self) -> Program:
        start = yield from self.initial_direction()
        if start is None:
            return
        theta, g = start
        alpha, beta = self.config.alpha, self.config.beta
        while True:
            k = min(self.config.k, self.track.remaining)
            if k < 1:
                return
            sign_grad = yield from self.sign_gradient(theta, g, beta, k)
            theta, g, alpha = yield from self.line_search(theta, g, sign_grad, alpha, beta)
            if alpha < self.min_alpha:
                alpha = 1.0
                beta *= 0.1
                if beta < 1e-8:
                    return

    # ------------------------------------------------------------ geometry
    def normalize(self, v: Tensor) -> Tensor:
        return v / torch.linalg.vector_norm(v, ord=self.order, dim=-1, keepdim=True).clamp_min(1e-30)

    def point(self, theta: Tensor, lbd: float) -> Tensor:
        return self.threat.clip_to_box(self.x0 + lbd * theta)

    def gaussian(self, count: int) -> Tensor:
        x0 = self.x0
        return torch.randn((count, x0.numel()), generator=self.generator, device=x0.device, dtype=x0.dtype)

    # ------------------------------------------------------------ steps
    def initial_direction(self) -> Generator[Tensor, Tensor, tuple[Tensor, float] | None]:
        """The best of ``init_directions`` Gaussian directions (their first queries are independent, so they go
        together), each adversarial one measured in turn. None: none was adversarial."""
        count = min(self.config.init_directions, self.track.remaining)
        if count < 1:
            return None
        draws = self.gaussian(count)
        hits = yield from self.ask(self.threat.clip_to_box(self.x0 + draws))
        best_theta: Tensor | None = None
        g_theta = math.inf
        for i in hits.nonzero().flatten().tolist():
            initial_lbd = float(torch.linalg.vector_norm(draws[i], ord=self.order))
            theta = draws[i] / initial_lbd
            lbd = yield from self.initial_search(theta, initial_lbd, g_theta)
            if lbd < g_theta:
                best_theta, g_theta = theta, lbd
        if best_theta is None:
            return None
        return best_theta, g_theta

    def sign_gradient(self, theta: Tensor, g: float, beta: float, k: int) -> Generator[Tensor, Tensor, Tensor]:
        """Sign-OPT's estimate: the mean of ``-+u`` over ``k`` random unit directions ``u``, the sign read from
        one query each at ``x0 + g * normalize(theta + beta * u)`` (adversarial means g decreased)."""
        u = self.normalize(self.gaussian(k))
        probes = self.normalize(theta[None] + beta * u)
        decreased = yield from self.ask(self.threat.clip_to_box(self.x0 + g * probes))
        signs = 1.0 - 2.0 * decreased.to(self.x0.dtype)
        return (signs[:, None] * u).mean(dim=0)

    def line_search(
        self, theta: Tensor, g: float, sign_grad: Tensor, alpha: float, beta: float
    ) -> Generator[Tensor, Tensor, tuple[Tensor, float, float]]:
        """Grow the step while it improves, else shrink it until it does (15 tries each); returns the new
        direction, its g and the step size."""
        min_theta, min_g = theta, g
        for _ in range(15):
            new_theta = self.normalize(theta - alpha * sign_grad)
            new_g = yield from self.local_search(new_theta, min_g, beta / 500)
            alpha *= 2
            if new_g < min_g:
                min_theta, min_g = new_theta, new_g
            else:
                break
        if min_g >= g:
            for _ in range(15):
                alpha *= 0.25
                new_theta = self.normalize(theta - alpha * sign_grad)
                new_g = yield from self.local_search(new_theta, min_g, beta / 500)
                if new_g < g:
                    min_theta, min_g = new_theta, new_g
                    break
        return min_theta, min_g, alpha

    def initial_search(self, theta: Tensor, initial_lbd: float, current_best: float) -> Search:
        """The reference's fine_grained_binary_search."""
        if initial_lbd > current_best:
            if not (yield from self.ask_one(self.point(theta, current_best))):
                return math.inf
            lbd = current_best
        else:
            lbd = initial_lbd
        return (yield from self.bisect(lambda t: self.point(theta, t), 0.0, lbd, self.init_tol))

    def local_search(self, theta: Tensor, initial_lbd: float, tol: float) -> Search:
        """The reference's fine_grained_binary_search_local: 1% steps to bracket, then bisection."""
        tol = max(tol, 2e-9) if self.linf else tol
        if not (yield from self.ask_one(self.point(theta, initial_lbd))):
            lo, hi = initial_lbd, initial_lbd * 1.01
            while not (yield from self.ask_one(self.point(theta, hi))):
                hi *= 1.01
                if hi > self.config.max_lambda:
                    return math.inf
        else:
            hi, lo = initial_lbd, initial_lbd * 0.99
            while (yield from self.ask_one(self.point(theta, lo))):
                lo *= 0.99
        return (yield from self.bisect(lambda t: self.point(theta, t), lo, hi, tol))


@register_attack
class SignOPT(WalkAttack):
    """Sign-OPT (Cheng et al., ICLR 2020): hard-label sign-SGD on the boundary distance, Linf / L2."""

    name = "sign-opt"
    norms = frozenset({Norm.LINF, Norm.L2})
    Config = SignOPTConfig
    config: SignOPTConfig
    supports_targeted = False
    walk = _SignOPTWalk
