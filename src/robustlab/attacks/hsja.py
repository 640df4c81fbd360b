"""HopSkipJump: decision-based attack by boundary gradient estimation, Linf and L2.

Jianbo Chen, Michael I. Jordan, Martin J. Wainwright. "HopSkipJumpAttack: A Query-Efficient Decision-Based
Attack", IEEE S&P 2020 (reference code: ``Jianbo-Lab/HSJA``, ``hsja.py``). A hard-label baseline for RayS.

Per example, with ``d`` the input dimension and ``theta = gamma / d^(3/2)`` (L2) or ``gamma / d^2`` (Linf):

1. start from uniform noise in the box that meets the goal (one query per draw, at most ``init_trials``), moved
   toward ``x`` by a binary search on the blend factor (tolerance 1e-3);
2. binary search between ``x`` and the current point back to the boundary (L2: on the blend factor, threshold
   ``theta``; Linf: on the Linf radius of a clip around ``x``, threshold ``min(theta * dist, theta)``);
3. repeat: estimate the boundary's normal at the current point from ``int(100 * sqrt(t))`` (at most 10,000)
   random unit directions (Gaussian for L2, uniform in [-1, 1] for Linf) at scale ``delta`` (0.1 times the box
   width at the first iteration, then ``sqrt(d) * theta * dist`` for L2 or ``d * theta * dist`` for Linf, where
   ``dist`` is the distance before the last binary search, as in the reference), with the baseline subtraction;
   step along it (its sign for Linf) by ``dist / sqrt(t)``, halved until the step lands on the adversarial side
   (geometric progression); binary search back to the boundary.

Every query counts against ``queries``, including a first query at the clean input (the reference asks it too,
for the original label). In ``"eps"`` mode an example stops at the first queried adversarial point within eps
(any query: binary-search midpoints and gradient probes included); ``"adbd"`` uses the whole budget and reports
the nearest adversarial point in ``extras["boundary_distance"]``. The attack only returns points it queried and
saw adversarial within eps, else the clean input.

Targeted attacks are supported as in the reference without a target image: the initial point is random noise
classified as the target, which for many classes needs luck (``init_trials`` draws).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from robustlab.attacks._decision import DecisionConfig, Program, Walk, WalkAttack
from robustlab.attacks.registry import register_attack
from robustlab.checks import check_number, check_positive_int
from robustlab.errors import ConfigError
from robustlab.threat import Norm, ThreatModel

__all__ = ["HopSkipJump", "HopSkipJumpConfig"]


@dataclass(frozen=True)
class HopSkipJumpConfig(DecisionConfig):
    """Options of :class:`HopSkipJump` (defaults from the reference code).

    Attributes:
        queries: query budget per example, including the clean check.
        mode: ``"eps"`` stops each example at its first adversarial point within eps; ``"adbd"`` uses the budget.
        iterations: gradient-estimation iterations at most (reference 40; the budget usually ends the run first).
        gamma: sets the binary-search threshold ``theta`` (see the module docstring).
        init_evals: gradient-estimation probes at the first iteration (``init_evals * sqrt(t)`` at iteration t).
        max_evals: probes per estimate at most.
        init_trials: random-noise draws to find a starting point (the reference allows 10,000).
    """

    title: ClassVar[str] = "HopSkipJump"

    iterations: int = 40
    gamma: float = 1.0
    init_evals: int = 100
    max_evals: int = 10000
    init_trials: int = 100

    def validate(self) -> None:
        super().validate()
        check_positive_int("iterations", self.iterations)
        check_number("gamma", self.gamma, low=0, low_open=True)
        check_positive_int("init_evals", self.init_evals)
        check_positive_int("max_evals", self.max_evals)
        check_positive_int("init_trials", self.init_trials)
        if self.init_evals > self.max_evals:
            raise ConfigError(f"init_evals ({self.init_evals}) must not exceed max_evals ({self.max_evals})")


class _HopSkipJumpWalk(Walk):
    """One example's HopSkipJump run (the steps of the module docstring)."""

    config: HopSkipJumpConfig

    def setup(self) -> None:
        self.dim = int(self.x0.numel())
        self.linf = self.threat.norm is Norm.LINF
        gamma = self.config.gamma
        self.theta = gamma / self.dim**2 if self.linf else gamma / (math.sqrt(self.dim) * self.dim)

    def run(self) -> Program:
        perturbed = yield from self.initial_point()
        if perturbed is None:
            return
        perturbed, dist_post = yield from self.to_boundary(perturbed)
        dist = float(self.track.distance(perturbed[None])[0])
        lower, upper = self.threat.lower, self.threat.upper
        scale = self.dim if self.linf else math.sqrt(self.dim)
        for step in range(1, self.config.iterations + 1):
            # The probe scale: a tenth of the box at first, then proportional to the last distance.
            delta = 0.1 * (upper - lower) if step == 1 else scale * self.theta * dist_post
            evals = min(int(self.config.init_evals * math.sqrt(step)), self.config.max_evals, self.track.remaining)
            if evals < 1:
                return
            grad = yield from self.boundary_normal(perturbed, delta, evals)
            update = grad.sign() if self.linf else grad
            perturbed = yield from self.geometric_step(perturbed, update, dist / math.sqrt(step))
            perturbed, dist_post = yield from self.to_boundary(perturbed)
            dist = float(self.track.distance(perturbed[None])[0])

    def initial_point(self) -> Generator[Tensor, Tensor, Tensor | None]:
        """The reference's BlendedUniformNoise: uniform noise in the box that meets the goal (at most
        ``init_trials`` draws), blended toward ``x0`` by a binary search (tolerance 1e-3). None: no noise did."""
        x0, lower, upper = self.x0, self.threat.lower, self.threat.upper
        noise = None
        for _ in range(self.config.init_trials):
            draw = torch.rand(x0.shape, generator=self.generator, device=x0.device, dtype=x0.dtype)
            draw = lower + (upper - lower) * draw
            if (yield from self.ask_one(draw)):
                noise = draw
                break
        if noise is None:
            return None
        blend = yield from self.bisect(lambda t: (1 - t) * x0 + t * noise, 0.0, 1.0, 0.001)
        return (1 - blend) * x0 + blend * noise

    def project(self, point: Tensor, alpha: float) -> Tensor:
        """Linf: ``point`` clipped to the ball of radius ``alpha`` around ``x0``; L2: the blend at ``alpha``."""
        x0 = self.x0
        if self.linf:
            return torch.min(torch.max(point, x0 - alpha), x0 + alpha)
        return (1 - alpha) * x0 + alpha * point

    def to_boundary(self, point: Tensor) -> Generator[Tensor, Tensor, tuple[Tensor, float]]:
        """Back to the boundary between ``x0`` and ``point``; returns (boundary point, distance of ``point``)."""
        dist_post = float(self.track.distance(point[None])[0])
        if self.linf:
            high, threshold = dist_post, min(dist_post * self.theta, self.theta)
        else:
            high, threshold = 1.0, self.theta
        # The reference bisects while (high - low) / threshold > 1: for positive floats the same test.
        high = yield from self.bisect(lambda alpha: self.project(point, alpha), 0.0, high, threshold)
        return self.project(point, high), dist_post

    def boundary_normal(self, point: Tensor, delta: float, evals: int) -> Generator[Tensor, Tensor, Tensor]:
        """Unit estimate of the boundary's normal at ``point`` from ``evals`` random probes at scale ``delta``,
        with the reference's baseline subtraction."""
        x0 = self.x0
        shape = (evals, self.dim)
        if self.linf:
            rv = torch.rand(shape, generator=self.generator, device=x0.device, dtype=x0.dtype) * 2 - 1
        else:
            rv = torch.randn(shape, generator=self.generator, device=x0.device, dtype=x0.dtype)
        rv = rv / rv.norm(dim=1, keepdim=True).clamp_min(1e-30)
        probes = self.threat.clip_to_box(point + delta * rv)
        rv = (probes - point) / delta
        decisions = yield from self.ask(probes)
        fval = 2.0 * decisions.to(x0.dtype) - 1.0
        mean = float(fval.mean())
        if mean == 1.0:
            grad = rv.mean(dim=0)
        elif mean == -1.0:
            grad = -rv.mean(dim=0)
        else:
            grad = ((fval - mean)[:, None] * rv).mean(dim=0)
        return grad / grad.norm().clamp_min(1e-30)

    def geometric_step(self, point: Tensor, update: Tensor, size: float) -> Generator[Tensor, Tensor, Tensor]:
        """Step from ``point`` along ``update``, halving ``size`` until the step lands on the adversarial side
        (at most 64 tries; ``point`` itself if none does)."""
        for _ in range(64):
            candidate = self.threat.clip_to_box(point + size * update)
            if (yield from self.ask_one(candidate)):
                return candidate
            size /= 2.0
        return point


@register_attack
class HopSkipJump(WalkAttack):
    """HopSkipJump (Chen, Jordan & Wainwright, S&P 2020): hard-label boundary walk, Linf / L2."""

    name = "hsja"
    norms = frozenset({Norm.LINF, Norm.L2})
    Config = HopSkipJumpConfig
    config: HopSkipJumpConfig
    walk = _HopSkipJumpWalk

    def _check_threat(self, threat: ThreatModel) -> None:
        if not (math.isfinite(threat.lower) and math.isfinite(threat.upper)):
            raise ConfigError("HopSkipJump starts from uniform noise in the box: it needs a bounded box")
