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
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks._decision import Program, Track, check_mode, finish, make_tracks, run_programs
from robustlab.attacks.base import Attack, AttackConfig, positive
from robustlab.attacks.registry import register_attack
from robustlab.errors import ConfigError
from robustlab.goals import Goal
from robustlab.oracles import Access, LabelOracle
from robustlab.threat import Norm, ThreatModel

__all__ = ["HopSkipJump", "HopSkipJumpConfig"]


@dataclass(frozen=True)
class HopSkipJumpConfig(AttackConfig):
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

    queries: int = 10000
    mode: str = "eps"
    iterations: int = 40
    gamma: float = 1.0
    init_evals: int = 100
    max_evals: int = 10000
    init_trials: int = 100

    def validate(self) -> None:
        positive("queries", self.queries, integer=True)
        check_mode(self.mode, "HopSkipJump")
        positive("iterations", self.iterations, integer=True)
        positive("gamma", self.gamma)
        positive("init_evals", self.init_evals, integer=True)
        positive("max_evals", self.max_evals, integer=True)
        positive("init_trials", self.init_trials, integer=True)
        if self.init_evals > self.max_evals:
            raise ConfigError(f"init_evals ({self.init_evals}) must not exceed max_evals ({self.max_evals})")


@register_attack
class HopSkipJump(Attack[LabelOracle]):
    """HopSkipJump (Chen, Jordan & Wainwright, S&P 2020): hard-label boundary walk, Linf / L2."""

    name = "hsja"
    access = Access.LABELS
    norms = frozenset({Norm.LINF, Norm.L2})
    Config = HopSkipJumpConfig
    config: HopSkipJumpConfig

    def _perturb(
        self, oracle: LabelOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        if not (math.isfinite(threat.lower) and math.isfinite(threat.upper)):
            raise ConfigError("HopSkipJump starts from uniform noise in the box: it needs a bounded box")
        n = int(x.shape[0])
        tracks = make_tracks(x, threat)
        programs = [self._program(tracks[i], threat, generator) for i in range(n)]
        run_programs(
            oracle,
            goal,
            tracks,
            programs,
            shape=tuple(x.shape[1:]),
            budget=self.config.queries,
            stop_at_eps=self.config.mode == "eps",
        )
        return finish(x, tracks, threat, threat.eps)

    def _program(self, track: Track, threat: ThreatModel, generator: torch.Generator) -> Program:
        cfg = self.config
        x0 = track.x
        dim = int(x0.numel())
        linf = threat.norm is Norm.LINF
        theta = cfg.gamma / dim**2 if linf else cfg.gamma / (math.sqrt(dim) * dim)
        lower, upper = threat.lower, threat.upper

        def clip(points: Tensor) -> Tensor:
            return points.clamp(lower, upper)

        def ask(points: Tensor) -> Generator[Tensor, Tensor, Tensor]:
            """Yield ``points`` (``(k, n)``), record adversarial ones, return the mask (a sub-generator)."""
            answer = yield points
            track.offer(points, answer)
            return answer

        def project(point: Tensor, alpha: float) -> Tensor:
            if linf:
                return torch.min(torch.max(point, x0 - alpha), x0 + alpha)
            return (1 - alpha) * x0 + alpha * point

        def binary_search(point: Tensor) -> Generator[Tensor, Tensor, tuple[Tensor, float]]:
            """Back to the boundary between x0 and ``point``; returns (boundary point, distance of ``point``)."""
            dist_post = float(track.distance(point[None])[0])
            if linf:
                high, threshold = dist_post, min(dist_post * theta, theta)
            else:
                high, threshold = 1.0, theta
            low = 0.0
            while (high - low) / threshold > 1:
                mid = (high + low) / 2.0
                answer = yield from ask(project(point, mid)[None])
                if bool(answer[0]):
                    high = mid
                else:
                    low = mid
            return project(point, high), dist_post

        # Clean check: a misclassified input is its own adversarial example.
        answer = yield from ask(x0[None])
        if bool(answer[0]):
            track.clean_correct = False
            return

        # Initialization (the reference's BlendedUniformNoise): noise meeting the goal, blended toward x0.
        noise = None
        for _ in range(cfg.init_trials):
            draw = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            draw = lower + (upper - lower) * draw
            answer = yield from ask(draw[None])
            if bool(answer[0]):
                noise = draw
                break
        if noise is None:
            return
        low, high = 0.0, 1.0
        while high - low > 0.001:
            mid = (high + low) / 2.0
            answer = yield from ask(((1 - mid) * x0 + mid * noise)[None])
            if bool(answer[0]):
                high = mid
            else:
                low = mid
        perturbed = (1 - high) * x0 + high * noise

        perturbed, dist_post = yield from binary_search(perturbed)
        dist = float(track.distance(perturbed[None])[0])
        for step in range(1, cfg.iterations + 1):
            # The probe scale: a tenth of the box at first, then proportional to the last distance.
            delta = 0.1 * (upper - lower) if step == 1 else (dim if linf else math.sqrt(dim)) * theta * dist_post
            evals = min(int(cfg.init_evals * math.sqrt(step)), cfg.max_evals, track.remaining)
            if evals < 1:
                return
            if linf:
                rv = torch.rand((evals, dim), generator=generator, device=x0.device, dtype=x0.dtype) * 2 - 1
            else:
                rv = torch.randn((evals, dim), generator=generator, device=x0.device, dtype=x0.dtype)
            rv = rv / rv.norm(dim=1, keepdim=True).clamp_min(1e-30)
            probes = clip(perturbed + delta * rv)
            rv = (probes - perturbed) / delta
            decisions = yield from ask(probes)
            fval = 2.0 * decisions.to(x0.dtype) - 1.0
            mean = float(fval.mean())
            if mean == 1.0:
                grad = rv.mean(dim=0)
            elif mean == -1.0:
                grad = -rv.mean(dim=0)
            else:
                grad = ((fval - mean)[:, None] * rv).mean(dim=0)
            grad = grad / grad.norm().clamp_min(1e-30)
            update = grad.sign() if linf else grad

            # Geometric progression: halve the step until it lands on the adversarial side.
            size = dist / math.sqrt(step)
            for _ in range(64):
                candidate = clip(perturbed + size * update)
                answer = yield from ask(candidate[None])
                if bool(answer[0]):
                    perturbed = candidate
                    break
                size /= 2.0
            perturbed, dist_post = yield from binary_search(perturbed)
            dist = float(track.distance(perturbed[None])[0])
