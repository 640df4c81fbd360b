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
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks._decision import Program, Track, check_mode, finish, make_tracks, run_programs
from robustlab.attacks.base import Attack, AttackConfig, positive
from robustlab.attacks.registry import register_attack
from robustlab.goals import Goal
from robustlab.oracles import Access, LabelOracle
from robustlab.threat import Norm, ThreatModel

__all__ = ["SignOPT", "SignOPTConfig"]

Search = Generator[Tensor, Tensor, float]


@dataclass(frozen=True)
class SignOPTConfig(AttackConfig):
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

    queries: int = 10000
    mode: str = "eps"
    k: int = 200
    alpha: float = 0.2
    beta: float = 0.001
    init_directions: int = 100
    max_lambda: float = 20.0

    def validate(self) -> None:
        positive("queries", self.queries, integer=True)
        check_mode(self.mode, "Sign-OPT")
        positive("k", self.k, integer=True)
        positive("alpha", self.alpha)
        positive("beta", self.beta)
        positive("init_directions", self.init_directions, integer=True)
        positive("max_lambda", self.max_lambda)


@register_attack
class SignOPT(Attack[LabelOracle]):
    """Sign-OPT (Cheng et al., ICLR 2020): hard-label sign-SGD on the boundary distance, Linf / L2."""

    name = "sign-opt"
    access = Access.LABELS
    norms = frozenset({Norm.LINF, Norm.L2})
    Config = SignOPTConfig
    config: SignOPTConfig
    supports_targeted = False

    def _perturb(
        self, oracle: LabelOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
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
        linf = threat.norm is Norm.LINF
        order = math.inf if linf else 2.0
        init_tol = 1e-5 if linf else 1e-3
        min_alpha = 1e-6 if linf else 1e-4

        def normalize(v: Tensor) -> Tensor:
            return v / torch.linalg.vector_norm(v, ord=order, dim=-1, keepdim=True).clamp_min(1e-30)

        def point(theta: Tensor, lbd: float) -> Tensor:
            return (x0 + lbd * theta).clamp(threat.lower, threat.upper)

        def adversarial(points: Tensor) -> Generator[Tensor, Tensor, Tensor]:
            answer = yield points
            track.offer(points, answer)
            return answer

        def is_adv(theta: Tensor, lbd: float) -> Generator[Tensor, Tensor, bool]:
            answer = yield from adversarial(point(theta, lbd)[None])
            return bool(answer[0])

        def bisect(theta: Tensor, lo: float, hi: float, tol: float) -> Search:
            while hi - lo > tol:
                mid = (lo + hi) / 2.0
                if (yield from is_adv(theta, mid)):
                    hi = mid
                else:
                    lo = mid
            return hi

        def initial_search(theta: Tensor, initial_lbd: float, current_best: float) -> Search:
            """The reference's fine_grained_binary_search."""
            if initial_lbd > current_best:
                if not (yield from is_adv(theta, current_best)):
                    return math.inf
                lbd = current_best
            else:
                lbd = initial_lbd
            return (yield from bisect(theta, 0.0, lbd, init_tol))

        def local_search(theta: Tensor, initial_lbd: float, tol: float) -> Search:
            """The reference's fine_grained_binary_search_local: 1% steps to bracket, then bisection."""
            tol = max(tol, 2e-9) if linf else tol
            if not (yield from is_adv(theta, initial_lbd)):
                lo, hi = initial_lbd, initial_lbd * 1.01
                while not (yield from is_adv(theta, hi)):
                    hi *= 1.01
                    if hi > cfg.max_lambda:
                        return math.inf
            else:
                hi, lo = initial_lbd, initial_lbd * 0.99
                while (yield from is_adv(theta, lo)):
                    lo *= 0.99
            return (yield from bisect(theta, lo, hi, tol))

        # Clean check.
        answer = yield from adversarial(x0[None])
        if bool(answer[0]):
            track.clean_correct = False
            return

        # Initial direction: the best of init_directions Gaussian draws (their first queries are independent).
        count = min(cfg.init_directions, track.remaining)
        if count < 1:
            return
        draws = torch.randn((count, x0.numel()), generator=generator, device=x0.device, dtype=x0.dtype)
        hits = yield from adversarial((x0 + draws).clamp(threat.lower, threat.upper))
        best_theta: Tensor | None = None
        g_theta = math.inf
        for i in hits.nonzero().flatten().tolist():
            initial_lbd = float(torch.linalg.vector_norm(draws[i], ord=order))
            theta = draws[i] / initial_lbd
            lbd = yield from initial_search(theta, initial_lbd, g_theta)
            if lbd < g_theta:
                best_theta, g_theta = theta, lbd
        if best_theta is None:
            return

        xg, gg = best_theta, g_theta
        alpha, beta = cfg.alpha, cfg.beta
        while True:
            # Sign of the directional derivatives along k random directions.
            k = min(cfg.k, track.remaining)
            if k < 1:
                return
            u = normalize(torch.randn((k, x0.numel()), generator=generator, device=x0.device, dtype=x0.dtype))
            probes = normalize(xg[None] + beta * u)
            decreased = yield from adversarial((x0 + gg * probes).clamp(threat.lower, threat.upper))
            signs = 1.0 - 2.0 * decreased.to(x0.dtype)
            sign_grad = (signs[:, None] * u).mean(dim=0)

            # Line search on the step: grow while it improves, else shrink until it does.
            min_theta, min_g = xg, gg
            for _ in range(15):
                new_theta = normalize(xg - alpha * sign_grad)
                new_g = yield from local_search(new_theta, min_g, beta / 500)
                alpha *= 2
                if new_g < min_g:
                    min_theta, min_g = new_theta, new_g
                else:
                    break
            if min_g >= gg:
                for _ in range(15):
                    alpha *= 0.25
                    new_theta = normalize(xg - alpha * sign_grad)
                    new_g = yield from local_search(new_theta, min_g, beta / 500)
                    if new_g < gg:
                        min_theta, min_g = new_theta, new_g
                        break
            if alpha < min_alpha:
                alpha = 1.0
                beta *= 0.1
                if beta < 1e-8:
                    return
            xg, gg = min_theta, min_g
