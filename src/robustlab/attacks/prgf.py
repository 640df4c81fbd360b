"""P-RGF: random gradient-free estimates biased toward a surrogate's gradient (score-based black box).

Cheng, Dong, Pang, Su, Zhu. "Improving Black-box Adversarial Attacks with a Transfer-based Prior", NeurIPS 2019
(reference code: ``thu-ml/Prior-Guided-RGF``, ``attack.py``, method ``biased`` without the data prior). At each
iterate ``x`` with loss ``f(x)`` (known from the previous success check), ``n`` input dimensions, probe scale
``sigma`` and directions of RMS 1 (norm ``sqrt(n)``, the reference's scaling):

1. the prior ``v``: the surrogates' loss gradient at ``x`` (an ensemble: :mod:`robustlab.attacks._surrogate`),
   unit length, no query of the target;
2. ``||grad f||^2`` is estimated every 10 steps (at steps 0, 3, 10, 20, ... as in the reference) from
   ``norm_samples`` (10) Gaussian directions ``u``: the mean of ``((f(x + sigma u) - f(x)) / sigma)^2``, since
   ``E[(u . g)^2] = ||g||^2`` for such ``u``;
3. ``alpha``, the cosine between the prior and the true gradient, from ONE query: ``(f(x + sigma sqrt(n) v) -
   f(x)) / (sigma sqrt(n) ||grad f||)``; a negative estimate flips the prior;
4. the optimal mixing coefficient (the paper's Theorem 1 with ``D = n``):
   ``lambda* = (1 - a^2)(1 - a^2 (n + 2q - 2)) / (a^4 n (n + 2q - 2) - 2 a^2 n q + 1)`` when that lies in
   ``(0, 1)``; else 0 when ``a^2 (n + 2q - 2) < 1`` (the prior is no better than a random direction: plain RGF,
   reported in ``extras["fallback_steps"]``), else 1 (the prior alone: no more queries);
5. unless ``lambda* = 1``: ``q`` directions ``u_i = sqrt(lambda) sqrt(n) v + sqrt(1 - lambda) xi_i``, with
   ``xi_i`` Gaussian, projected orthogonally to ``v`` and scaled to RMS 1, and the estimate
   ``g = (1/q) sum_i (f(x + sigma u_i) - f(x)) / sigma u_i``; with ``lambda* = 1``, ``g = v``;
6. the step ``x <- project(x + lr * steepest_ascent(g))`` (the sign of ``g`` in linf), then one query at the new
   iterate: the success check, whose loss is the next step's ``f(x)``.

Queries per example: one at the clean input, then per step ``10`` (norm steps only) ``+ 1`` (alpha) ``+ q``
(unless ``lambda* = 1``) ``+ 1`` (the check), each charged by the oracle to its example. An example goes on only
while it can afford a whole step at its worst (``11 + q + 1``), so the budget is never exceeded. Without any
surrogate the attack is plain RGF (``lambda = 0``, no alpha query). Probes are clipped to the box as in every
robustlab score attack (:func:`robustlab.zeroth_order.estimate_with_oracle`).

Two departures from the reference: the loss defaults to the margin of the log-probabilities (``loss="margin"``),
because the float32 cross-entropy of a confident model rounds to exactly 0 and every finite difference vanishes (the
reference doubles ``sigma`` until they do not, spending queries; here that fallback is not implemented); and the
step size is ``rel_lr * eps`` (0.1, the reference's 0.005 at its linf eps 0.05).

:func:`estimate_gradient_norm` and :func:`prior_guided_estimate` are the estimator alone, on any function of a
batch of points, so that its statistics can be checked against the true gradient.

Example:
    >>> result = robustlab.attack(target_oracle, x, y, ThreatModel("linf", 0.3), method="p-rgf",
    ...                           surrogate=[cnn_a, cnn_b], queries=10_000)
    >>> result.extras["alpha"], result.extras["fallback_steps"]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks._surrogate import Ensemble, SurrogateAttack, SurrogateOptions
from robustlab.attacks.base import Attack, AttackConfig
from robustlab.attacks.registry import register_attack
from robustlab.attacks.zo_engine import ScoreSearch, check_estimate_options
from robustlab.checks import check_choice, check_number, check_positive_int
from robustlab.goals import Goal
from robustlab.losses import attack_loss
from robustlab.oracles import Access, ScoreOracle
from robustlab.threat import Norm, ThreatModel
from robustlab.zeroth_order import ScoreObjective

__all__ = ["PRGF", "PRGFConfig", "PriorEstimate", "estimate_gradient_norm", "optimal_lambda", "prior_guided_estimate"]

# evaluate(points, owners) -> one value per point; owners[i] is the row of x the point belongs to.
Evaluate = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class PRGFConfig(AttackConfig):
    """Options of :class:`PRGF`.

    Attributes:
        queries: query budget per example, every query included (10,000, the reference's).
        q: directions per estimate (50, the reference's ``samples_per_draw``).
        sigma: probe scale along directions of RMS 1 (1e-4, the reference's).
        norm_samples: directions of each gradient-norm estimate (10, the reference's).
        norm_every: re-estimate the gradient norm every this many steps (10, the reference's; also at step 3).
        lr: step size; None: ``rel_lr * eps``.
        rel_lr: the step as a fraction of eps when ``lr`` is None.
        loss: ``"margin"`` (default, see the module docstring), ``"ce"`` or ``"dlr"``, on log-probabilities.
        ensemble: how several surrogates make one prior: ``"logits"`` or ``"loss"`` averaging.
    """

    queries: int = 10_000
    q: int = 50
    sigma: float = 1e-4
    norm_samples: int = 10
    norm_every: int = 10
    lr: float | None = None
    rel_lr: float = 0.1
    loss: str = "margin"
    ensemble: str = "logits"

    def validate(self) -> None:
        check_estimate_options(self.queries, self.q, self.sigma, self.loss, mu_meaning="sigma, the probe scale")
        check_positive_int("norm_samples", self.norm_samples)
        check_positive_int("norm_every", self.norm_every)
        if self.lr is not None:
            check_number("lr", self.lr, low=0, low_open=True)
        check_number("rel_lr", self.rel_lr, low=0, low_open=True)
        check_choice("ensemble", self.ensemble, ("logits", "loss"))


def optimal_lambda(alpha: Tensor, dim: int, q: int) -> Tensor:
    """The paper's optimal ``lambda`` for cosines ``alpha`` (absolute values), ``dim`` dimensions, ``q`` directions:
    0 when ``alpha^2 (dim + 2q - 2) < 1``, 1 when the closed form reaches 1 (or ``alpha >= 1``)."""
    a2 = alpha.double().clamp(0.0, 1.0) ** 2
    width = dim + 2 * q - 2
    denominator = a2**2 * dim * width - 2 * a2 * dim * q + 1
    closed = (1 - a2) * (1 - a2 * width) / torch.where(denominator == 0, torch.ones_like(a2), denominator)
    inside = (closed > 0) & (closed < 1) & (denominator != 0)
    edge = torch.where(a2 * width < 1, torch.zeros_like(a2), torch.ones_like(a2))
    lam = torch.where(inside, closed, edge)
    return torch.where(a2 >= 1, torch.ones_like(lam), lam)


def _rms_unit(directions: Tensor) -> Tensor:
    """Rows scaled to RMS 1 (norm ``sqrt(dim)``) along the last dimension."""
    rms = directions.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
    return directions / rms


def _probe(evaluate: Evaluate, flat: Tensor, directions: Tensor, sigma: float, shape: tuple[int, ...]) -> Tensor:
    """``(f(x + sigma u) - f(x))``-ready values: ``f`` at ``x + sigma u`` for ``directions`` ``(m, k, d)``."""
    m, k, _ = directions.shape
    points = (flat[:, None, :] + sigma * directions).reshape((m * k, *shape))
    owners = torch.arange(m, device=flat.device).repeat_interleave(k)
    return evaluate(points, owners).reshape(m, k).to(flat.dtype)


def estimate_gradient_norm(
    evaluate: Evaluate, x: Tensor, value: Tensor, *, samples: int, sigma: float, generator: torch.Generator | None
) -> Tensor:
    """``||grad f||^2`` at each row of ``x`` (where ``f = value``) from ``samples`` queries each: the mean squared
    directional derivative along Gaussian directions of RMS 1."""
    n = int(x.shape[0])
    flat = x.reshape(n, -1)
    u = torch.randn((n, samples, flat.shape[1]), generator=generator, dtype=x.dtype, device=x.device)
    values = _probe(evaluate, flat, _rms_unit(u), sigma, tuple(x.shape[1:]))
    return (((values - value[:, None]) / sigma) ** 2).mean(dim=1)


@dataclass(frozen=True)
class PriorEstimate:
    """One P-RGF estimate per row: the direction ``grad`` (unnormalized), the estimated cosine ``alpha`` of the
    prior with the true gradient, the ``lam`` used, and the queries each row made."""

    grad: Tensor
    alpha: Tensor
    lam: Tensor
    queries: Tensor


def prior_guided_estimate(
    evaluate: Evaluate,
    x: Tensor,
    value: Tensor,
    prior: Tensor | None,
    norm_square: Tensor,
    *,
    q: int,
    sigma: float,
    generator: torch.Generator | None,
) -> PriorEstimate:
    """Steps 3-5 of the module docstring at each row of ``x`` (``f(x) = value``, ``||grad f||^2 ~ norm_square``).

    ``prior`` None (or a zero row): plain RGF with ``q`` Gaussian directions of RMS 1, no alpha query.
    """
    n = int(x.shape[0])
    shape = tuple(x.shape[1:])
    flat = x.reshape(n, -1)
    dim = int(flat.shape[1])
    root = math.sqrt(dim)
    queries = torch.zeros(n, dtype=torch.long, device=x.device)
    alpha = torch.zeros(n, dtype=torch.float64, device=x.device)
    v = torch.zeros_like(flat)
    has_prior = torch.zeros(n, dtype=torch.bool, device=x.device)
    if prior is not None:
        p = prior.reshape(n, -1).to(flat.dtype)
        length = p.norm(dim=1)
        has_prior = length > 0
        v = p / length.clamp_min(1e-30)[:, None]
    rows = has_prior.nonzero().flatten()
    if rows.numel():
        along = _probe(lambda pts, own: evaluate(pts, rows[own]), flat[rows], root * v[rows, None, :], sigma, shape)
        queries[rows] += 1
        slope = (along[:, 0] - value[rows]) / sigma
        alpha[rows] = (slope.double() / (root * norm_square[rows].double().clamp_min(0).sqrt())).nan_to_num(0.0)
        flip = alpha < 0
        v = torch.where(flip[:, None], -v, v)
        alpha = alpha.abs()
    lam = torch.where(has_prior, optimal_lambda(alpha, dim, q), torch.zeros_like(alpha))
    grad = v.clone()  # lambda = 1: the prior itself
    mixed = (lam < 1).nonzero().flatten()
    if mixed.numel():
        xi = torch.randn((mixed.numel(), q, dim), generator=generator, dtype=flat.dtype, device=flat.device)
        vm = v[mixed][:, None, :]
        xi = _rms_unit(xi - (xi * vm).sum(dim=-1, keepdim=True) * vm)
        weight = lam[mixed].to(flat.dtype)[:, None, None]
        u = weight.sqrt() * root * vm + (1 - weight).sqrt() * xi
        values = _probe(lambda pts, own: evaluate(pts, mixed[own]), flat[mixed], u, sigma, shape)
        queries[mixed] += q
        slopes = (values - value[mixed][:, None]) / sigma
        grad[mixed] = torch.einsum("mk,mkd->md", slopes, u) / q
    return PriorEstimate(grad.reshape(x.shape), alpha, lam, queries)


@register_attack
class PRGF(SurrogateAttack, Attack[ScoreOracle]):
    """P-RGF (Cheng et al. 2019): RGF estimates biased toward a surrogate's gradient, lambda from queries."""

    name = "p-rgf"
    access = Access.SCORES
    norms = frozenset({Norm.LINF, Norm.L2})
    Config = PRGFConfig
    config: PRGFConfig

    def _perturb(
        self, oracle: ScoreOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        c = self.config
        loss = attack_loss(c.loss)
        search = ScoreSearch(oracle, goal, ScoreObjective(loss, goal), c.queries, x)
        ensemble: Ensemble | None = None
        if self.surrogates:
            ensemble = self.ensemble(x, oracle.num_classes, SurrogateOptions(c.ensemble), goal).to(x.device)
        n = int(x.shape[0])
        lr = c.lr if c.lr is not None else c.rel_lr * threat.eps
        value = torch.zeros(n, dtype=x.dtype, device=x.device)
        norm_square = torch.zeros(n, dtype=x.dtype, device=x.device)
        stats = {
            "steps": torch.zeros(n, dtype=torch.long, device=x.device),
            "fallback_steps": torch.zeros(n, dtype=torch.long, device=x.device),
            "prior_steps": torch.zeros(n, dtype=torch.long, device=x.device),
            "alpha_sum": torch.zeros(n, dtype=torch.float64, device=x.device),
        }
        x_adv = x.clone()

        def evaluate(points: Tensor, owners: Tensor) -> Tensor:
            return search.objective(oracle.scores(points.clamp(threat.lower, threat.upper), owners), owners)

        active = search.start(x, value)
        number = 0
        while active.numel() > 0:
            norm_step = number % c.norm_every == 0 or number == 3
            worst = (c.norm_samples if norm_step and ensemble is not None else 0) + int(ensemble is not None) + c.q + 1
            active = search.affordable(active, worst)
            if active.numel() == 0:
                break
            here = x_adv[active]

            def on_active(points: Tensor, owners: Tensor, rows: Tensor = active) -> Tensor:
                return evaluate(points, rows[owners])

            prior = None
            if ensemble is not None:
                if norm_step:
                    norm_square[active] = estimate_gradient_norm(
                        on_active, here, value[active], samples=c.norm_samples, sigma=c.sigma, generator=generator
                    ).to(x.dtype)
                _, prior = ensemble.loss_and_grad(here, goal.subset(active), loss)
            estimate = prior_guided_estimate(
                on_active, here, value[active], prior, norm_square[active], q=c.q, sigma=c.sigma, generator=generator
            )
            stats["steps"][active] += 1
            if ensemble is not None:
                stats["fallback_steps"][active] += (estimate.lam == 0).long()
                stats["prior_steps"][active] += (estimate.lam == 1).long()
                stats["alpha_sum"][active] += estimate.alpha
            candidate = threat.project(here + lr * threat.steepest_ascent(estimate.grad), x[active])
            x_adv[active] = candidate
            success, new_value = search.evaluate(candidate, active)
            value[active] = new_value.to(x.dtype)
            active = search.record(candidate, active, success, new_value, number + 1)
            number += 1
        steps = stats["steps"]
        extras = {
            "iterations": search.iterations,
            "steps": steps,
            "fallback_steps": stats["fallback_steps"],
            "prior_steps": stats["prior_steps"],
            "alpha": stats["alpha_sum"] / steps.clamp_min(1),
            "prior": torch.full((n,), ensemble is not None, dtype=torch.bool, device=x.device),
        }
        return search.best.x, extras
