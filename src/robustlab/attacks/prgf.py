"""P-RGF: random gradient-free estimates biased toward a surrogate's gradient (score-based black box).

Cheng, Dong, Pang, Su, Zhu. "Improving Black-box Adversarial Attacks with a Transfer-based Prior", NeurIPS 2019
(reference code: ``thu-ml/Prior-Guided-RGF``, ``attack.py``, method ``biased`` without the data prior). At each
iterate ``x`` with loss ``f(x)`` (known from the previous success check), ``n`` input dimensions, probe scale
``sigma`` and directions of RMS 1 (norm ``sqrt(n)``, the reference's scaling):

1. the prior ``v``: the surrogates' loss gradient at ``x`` (an ensemble: :mod:`robustlab.attacks._surrogate`),
   unit length, no query of the target. With the margin loss (the default) it is the gradient of the surrogates'
   ``z_r - z_y`` where ``r`` is the TARGET's strongest other class at ``x`` (known from the last query there;
   ``prior_loss="rival"``), not the surrogates' own strongest other class: the target's margin gradient is
   ``grad z_r - grad z_y`` of the target, and where the surrogates' runner-up differs their margin gradient points
   at another boundary. On the MNIST benchmark this alone lowered P-RGF's mean queries from the clean input from
   257 to 169 (with sign steps; docs/benchmarks.md);
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
6. the step ``x <- project(x + lr * d)``, then one query at the new iterate: the success check, whose loss is the
   next step's ``f(x)``. In l2 ``d = g / ||g||``. In linf the reference takes ``d = sign(g)``; here by default
   ``d = g / max|g|`` with ``lr = 2 eps`` (``linf_step="scaled"``): each pixel moves in proportion to its
   estimated slope, at most the ball's width (2 eps: the steepest pixels can cross from one face to the other in
   one step). With estimates whose cosine with the gradient is 0.3-0.5, the sign gives every
   noisy coordinate a full step: the ascent climbs fast, then crawls near the boundary with most pixels pinned
   at a corner of the ball and often stalls there (the ZO-signSGD trade-off, Liu et al., ICLR 2019). On the
   MNIST benchmark the scaled step lowered mean queries by 27-38% and failed on fewer examples
   (docs/benchmarks.md); ``linf_step="sign", rel_lr=0.1`` is the reference's step. The width 2 eps instead of
   eps: on the examples no transfer candidate fools, over 4 seeds, 25-31% fewer queries (1,188 -> 820 on the two
   image sets the settings were developed on, 827 -> 620 on a third set used only for this check); 0.5, 3 and 4 eps
   failed more often. Without a surrogate (plain RGF) the step stays eps: there 2 eps lowered the success rate on
   the benchmark from 88.8% to 76.0%.

The free subspace (a departure from the reference, whose attacks did not reach the faces of their sets as
often): a signed step along the prior does nothing on a coordinate where the iterate already sits on a face of the
feasible set (the box; in linf also the ball) and the prior points out through it. Such coordinates are dropped
per example at every step (:func:`free_coordinates`): the prior, the random directions, the gradient-norm estimate
and the dimension ``n`` in ``lambda*`` all live on the free coordinates, so ``alpha`` measures how well the prior
predicts the gradient where the attack can still move, and at most ``#free - 1`` random directions are drawn.
Without it, examples driven into a corner of the linf ball kept a cosine of ~0.6 over the whole space, so
``lambda* = 1``, and spent thousands of queries on prior steps that the projection undid. The norm is measured on
the free set of its step and rescaled by the share of the prior's energy still free at later steps.

Which faces are free (``face_decay``): a coordinate on a face is free when the step would move it inward, and
that is decided by the sign of a running average of the TARGET's own estimates (each step's estimate scaled to a
largest coordinate of 1, plus ``face_decay`` times the average so far; reset on a restart), the prior's sign only
where that average is still zero. Judged by the prior's sign, the faces left free are mostly those on which the
surrogates disagree with the ascent that pushed the iterate there: on the MNIST benchmark's hardest examples the
prior's cosine with the target's gradient on them was -0.2 to -0.5, lambda fell to ~0.02, and P-RGF crawled
(``p-rgf-transfer``, 78 examples, 4 seeds: 11 failures in 312 runs); with the estimates' average
(``face_decay`` 0.5) none, and 22% fewer queries. In a first version without the reset on restarts, decay 0.25
also gave none, 0 (the last estimate alone) 8 and 0.9 37 (old signs lock faces in). ``face_decay=None``: the
prior's sign alone.

Restarts (``restarts``, 0 by default as in the reference): an example whose loss has not gained ``min_gain`` for
``patience`` steps since its (re)start sits near a local maximum of the loss in the ball (a sign-step ascent with
noisy estimates stops there; a random search such as Square's does not), or on faces its running average keeps
blocked, and starts again at a random point of the ball, with one query there; ``p-rgf-transfer`` restarts first in
place (the average cleared), then at the clean input. The gradient-norm schedule follows each example's steps since
its (re)start.

Queries per example: one at the first iterate (the clean input; ``p-rgf-transfer`` in
:mod:`robustlab.attacks.transfer_start` asks its transfer candidates), then per step ``10`` (norm steps only)
``+ 1`` (alpha) ``+ q`` (unless ``lambda* = 1``; fewer when fewer coordinates are free) ``+ 1`` (the check), and
one per restart, each charged by the oracle to its example. An example goes on only while it can afford a whole
step at its worst (``11 + q + 1``), so the budget is never exceeded. Without any surrogate the attack is plain
RGF (``lambda = 0``, no alpha query, every coordinate free). Probes are clipped to the box as in every robustlab
score attack (:func:`robustlab.zeroth_order.estimate_with_oracle`).

Two more departures from the reference: the loss defaults to the margin of the log-probabilities (``loss="margin"``),
because the float32 cross-entropy of a confident model rounds to exactly 0 and every finite difference vanishes (the
reference doubles ``sigma`` until they do not, spending queries; here that fallback is not implemented); and the
step size is ``rel_lr * eps`` (with sign steps 0.1, the reference's 0.005 at its linf eps 0.05).

:func:`estimate_gradient_norm` and :func:`prior_guided_estimate` are the estimator alone, on any function of a
batch of points, so that its statistics can be checked against the true gradient.

Example:
    >>> result = robustlab.attack(target_oracle, x, y, ThreatModel("linf", 0.3), method="p-rgf",
    ...                           surrogate=[cnn_a, cnn_b], queries=10_000)
    >>> result.extras["alpha"], result.extras["fallback_steps"]
"""

from __future__ import annotations

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
from robustlab.losses import AttackLoss, attack_loss, rival_margin_loss
from robustlab.oracles import Access, ScoreOracle
from robustlab.threat import Norm, ThreatModel
from robustlab.zeroth_order import ScoreObjective

__all__ = [
    "PRGF",
    "PRGFConfig",
    "PriorEstimate",
    "estimate_gradient_norm",
    "free_coordinates",
    "optimal_lambda",
    "prior_guided_estimate",
]

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
        rel_lr: the step as a fraction of eps when ``lr`` is None; None: 2.0 with scaled linf steps and a
            surrogate, 1.0 with them and none (plain RGF), else 0.1 (the reference's 0.005 at its linf eps 0.05).
        linf_step: ``"scaled"`` (default): the estimate divided by its largest coordinate, so that each pixel moves
            in proportion to its estimated slope; ``"sign"``: its sign, as in the reference (see the module
            docstring).
        loss: ``"margin"`` (default, see the module docstring), ``"ce"`` or ``"dlr"``, on log-probabilities.
        ensemble: how several surrogates make one prior: ``"logits"`` or ``"loss"`` averaging.
        prior_loss: ``"rival"`` (default, with the margin loss): the prior is the surrogates' gradient of ``z_r -
            z_y`` with ``r`` the target's strongest other class at the iterate (known from the last query);
            ``"loss"``: the surrogates' gradient of the attack's loss, their own strongest other class included.
        restarts: times an example that stalls may start again (0, the reference's): at a random point of the ball
            (``p-rgf-transfer``: first in place, then at the clean input).
        patience: steps without a gain of ``min_gain`` in the loss after which an example has stalled.
        min_gain: the gain that counts as progress, in the loss's units (log-probabilities).
        face_decay: the weight of the running average of past estimates that decides which faces are free (see the
            module docstring); None: the prior's sign decides.
    """

    queries: int = 10_000
    q: int = 50
    sigma: float = 1e-4
    norm_samples: int = 10
    norm_every: int = 10
    lr: float | None = None
    rel_lr: float | None = None
    linf_step: str = "scaled"
    loss: str = "margin"
    ensemble: str = "logits"
    prior_loss: str = "rival"
    restarts: int = 0
    patience: int = 10
    min_gain: float = 1e-2
    face_decay: float | None = 0.5

    def validate(self) -> None:
        check_estimate_options(self.queries, self.q, self.sigma, self.loss, mu_meaning="sigma, the probe scale")
        check_positive_int("norm_samples", self.norm_samples)
        check_positive_int("norm_every", self.norm_every)
        if self.lr is not None:
            check_number("lr", self.lr, low=0, low_open=True)
        if self.rel_lr is not None:
            check_number("rel_lr", self.rel_lr, low=0, low_open=True)
        check_choice("linf_step", self.linf_step, ("scaled", "sign"))
        check_choice("ensemble", self.ensemble, ("logits", "loss"))
        check_choice("prior_loss", self.prior_loss, ("rival", "loss"))
        check_positive_int("restarts", self.restarts, minimum=0)
        check_positive_int("patience", self.patience)
        check_number("min_gain", self.min_gain, low=0.0)
        if self.face_decay is not None:
            check_number("face_decay", self.face_decay, low=0.0, high=1.0, high_open=True)

    def step_fraction(self, threat: ThreatModel, with_prior: bool = True) -> float:
        """``rel_lr``, or its default for the threat model's norm, the linf step and whether there is a prior:
        scaled linf steps of 2 eps with a surrogate's prior, eps without one (plain RGF: on the MNIST benchmark
        2 eps lowered its success from 88.8% to 76.0%), 0.1 eps otherwise."""
        if self.rel_lr is not None:
            return self.rel_lr
        if threat.norm is Norm.LINF and self.linf_step == "scaled":
            return 2.0 if with_prior else 1.0
        return 0.1


def optimal_lambda(alpha: Tensor, dim: int | Tensor, q: int | Tensor) -> Tensor:
    """The paper's optimal ``lambda`` for cosines ``alpha`` (absolute values), ``dim`` dimensions and ``q``
    directions (numbers, or one per row): 0 when ``alpha^2 (dim + 2q - 2) < 1``, 1 when the closed form reaches 1
    (or ``alpha >= 1``)."""
    a2 = alpha.double().clamp(0.0, 1.0) ** 2
    dim = torch.as_tensor(dim, dtype=torch.float64, device=a2.device)
    q = torch.as_tensor(q, dtype=torch.float64, device=a2.device)
    width = dim + 2 * q - 2
    denominator = a2**2 * dim * width - 2 * a2 * dim * q + 1
    closed = (1 - a2) * (1 - a2 * width) / torch.where(denominator == 0, torch.ones_like(a2), denominator)
    inside = (closed > 0) & (closed < 1) & (denominator != 0)
    edge = torch.where(a2 * width < 1, torch.zeros_like(a2), torch.ones_like(a2))
    lam = torch.where(inside, closed, edge)
    return torch.where(a2 >= 1, torch.ones_like(lam), lam)


def _rms_unit(directions: Tensor, free: Tensor | None = None) -> Tensor:
    """Rows scaled to RMS 1 over their free coordinates (norm ``sqrt(#free)``) along the last dimension; the other
    coordinates are zero. ``free`` is ``(m, d)`` (one mask per example) or None (every coordinate)."""
    if free is None:
        rms = directions.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
        return directions / rms
    mask = free[:, None, :].to(directions.dtype)
    directions = directions * mask
    count = mask.sum(dim=-1, keepdim=True).clamp_min(1)
    rms = (directions.pow(2).sum(dim=-1, keepdim=True) / count).sqrt().clamp_min(1e-12)
    return directions / rms


def _prior_share(prior: Tensor, free: Tensor) -> Tensor:
    """The fraction of each prior row's squared norm on its free coordinates."""
    p = prior.reshape(free.shape).pow(2)
    return (p * free).sum(dim=1) / p.sum(dim=1).clamp_min(1e-30)


def free_coordinates(x_adv: Tensor, x: Tensor, prior: Tensor, threat: ThreatModel) -> Tensor:
    """``(n, d)`` masks of the coordinates a step along ``prior`` can move: not those where ``x_adv`` sits on a face
    of the feasible set (the box, and in linf the ball's faces too) and the prior points out through it. A row with
    every coordinate blocked keeps them all (nothing to restrict to).

    A signed step pointing out is projected away, so without this restriction an example in a corner spends its
    budget on steps along the blocked part of the prior that never move it (the estimate and its cosine are then
    measured where the attack cannot go)."""
    n = int(x.shape[0])
    if threat.norm is Norm.LINF:
        low, high = threat.linf_bounds(x)
    else:
        low, high = torch.full_like(x, threat.lower), torch.full_like(x, threat.upper)
    tolerance = 1e-6 * max(1.0, threat.eps)
    flat, p = x_adv.reshape(n, -1), prior.reshape(n, -1)
    blocked = ((flat >= high.reshape(n, -1) - tolerance) & (p > 0)) | (
        (flat <= low.reshape(n, -1) + tolerance) & (p < 0)
    )
    free = ~blocked
    return free | ~free.any(dim=1, keepdim=True)


def _probe(evaluate: Evaluate, flat: Tensor, directions: Tensor, sigma: float, shape: tuple[int, ...]) -> Tensor:
    """``(f(x + sigma u) - f(x))``-ready values: ``f`` at ``x + sigma u`` for ``directions`` ``(m, k, d)``."""
    m, k, _ = directions.shape
    points = (flat[:, None, :] + sigma * directions).reshape((m * k, *shape))
    owners = torch.arange(m, device=flat.device).repeat_interleave(k)
    return evaluate(points, owners).reshape(m, k).to(flat.dtype)


def estimate_gradient_norm(
    evaluate: Evaluate,
    x: Tensor,
    value: Tensor,
    *,
    samples: int,
    sigma: float,
    generator: torch.Generator | None,
    free: Tensor | None = None,
) -> Tensor:
    """``||grad f||^2`` at each row of ``x`` (where ``f = value``) from ``samples`` queries each: the mean squared
    directional derivative along Gaussian directions of RMS 1. With ``free`` masks, the directions live on the free
    coordinates and the estimate is that of the gradient's free part."""
    n = int(x.shape[0])
    flat = x.reshape(n, -1)
    u = torch.randn((n, samples, flat.shape[1]), generator=generator, dtype=x.dtype, device=x.device)
    values = _probe(evaluate, flat, _rms_unit(u, free), sigma, tuple(x.shape[1:]))
    return (((values - value[:, None]) / sigma) ** 2).mean(dim=1)


@dataclass(frozen=True)
class PriorEstimate:
    """One P-RGF estimate per row: the direction ``grad`` (unnormalized), the estimated cosine ``alpha`` of the
    prior with the true gradient, the ``lam`` used, the queries each row made, and how many of them were random
    directions (0 where ``lam = 1``)."""

    grad: Tensor
    alpha: Tensor
    lam: Tensor
    queries: Tensor
    directions: Tensor


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
    free: Tensor | None = None,
) -> PriorEstimate:
    """Steps 3-5 of the module docstring at each row of ``x`` (``f(x) = value``, ``||grad f||^2 ~ norm_square``).

    ``prior`` None (or a zero row): plain RGF with ``q`` Gaussian directions of RMS 1, no alpha query. ``free``
    ``(n, d)`` masks restrict everything to a subspace per row (the prior, the random directions, the dimension in
    ``lambda*``; ``norm_square`` should then be that of the gradient's free part): the estimate is of the gradient's
    projection on it.
    """
    n = int(x.shape[0])
    shape = tuple(x.shape[1:])
    flat = x.reshape(n, -1)
    if free is None:
        free = torch.ones_like(flat, dtype=torch.bool)
    dim = free.sum(dim=1)
    root = dim.to(flat.dtype).sqrt()
    queries = torch.zeros(n, dtype=torch.long, device=x.device)
    alpha = torch.zeros(n, dtype=torch.float64, device=x.device)
    v = torch.zeros_like(flat)
    has_prior = torch.zeros(n, dtype=torch.bool, device=x.device)
    if prior is not None:
        p = prior.reshape(n, -1).to(flat.dtype) * free
        length = p.norm(dim=1)
        has_prior = length > 0
        v = p / length.clamp_min(1e-30)[:, None]
    rows = has_prior.nonzero().flatten()
    if rows.numel():
        along_prior = root[rows, None, None] * v[rows, None, :]
        along = _probe(lambda pts, own: evaluate(pts, rows[own]), flat[rows], along_prior, sigma, shape)
        queries[rows] += 1
        slope = (along[:, 0] - value[rows]) / sigma
        scale = root[rows].double() * norm_square[rows].double().clamp_min(0).sqrt()
        alpha[rows] = (slope.double() / scale).nan_to_num(0.0)
        flip = alpha < 0
        v = torch.where(flip[:, None], -v, v)
        alpha = alpha.abs()
    # No more random directions than the free subspace orthogonal to the prior has dimensions: beyond that they
    # add queries, not information (a corner of the linf ball can leave a handful of coordinates free).
    directions = (dim - has_prior.long()).clamp(1, q)
    lam = torch.where(has_prior, optimal_lambda(alpha, dim, directions), torch.zeros_like(alpha))
    lam = torch.where(has_prior & (dim <= 1), torch.ones_like(lam), lam)  # the prior spans a 1-d free subspace
    grad = v.clone()  # lambda = 1: the prior itself
    mixed = (lam < 1).nonzero().flatten()
    if mixed.numel():
        xi = torch.randn((mixed.numel(), q, flat.shape[1]), generator=generator, dtype=flat.dtype, device=flat.device)
        xi = xi * free[mixed][:, None, :]
        vm = v[mixed][:, None, :]
        xi = _rms_unit(xi - (xi * vm).sum(dim=-1, keepdim=True) * vm, free[mixed])
        weight = lam[mixed].to(flat.dtype)[:, None, None]
        u = weight.sqrt() * root[mixed, None, None] * vm + (1 - weight).sqrt() * xi
        used = torch.arange(q, device=x.device)[None, :] < directions[mixed][:, None]
        points = (flat[mixed][:, None, :] + sigma * u)[used]
        owners = mixed[:, None].expand(-1, q)[used]
        values = torch.zeros(used.shape, dtype=flat.dtype, device=flat.device)
        values[used] = evaluate(points.reshape((-1, *shape)), owners).to(flat.dtype)
        queries[mixed] += directions[mixed]
        slopes = torch.where(used, (values - value[mixed][:, None]) / sigma, torch.zeros_like(values))
        count = directions[mixed].to(flat.dtype)[:, None]
        grad[mixed] = torch.einsum("mk,mkd->md", slopes, u) / count
    used_directions = torch.where(lam < 1, directions, torch.zeros_like(directions))
    return PriorEstimate(grad.reshape(x.shape), alpha, lam, queries, used_directions)


def _tally(stats: dict[str, Tensor], rows: Tensor, estimate: PriorEstimate, *, with_prior: bool) -> None:
    """Add one step's estimate to the per-example statistics of ``rows``."""
    stats["steps"][rows] += 1
    if with_prior:
        stats["fallback_steps"][rows] += (estimate.lam == 0).long()
        stats["prior_steps"][rows] += (estimate.lam == 1).long()
        stats["alpha_sum"][rows] += estimate.alpha
    stats["directions"][rows] += estimate.directions


@dataclass
class _Progress:
    """Per example: steps since its (re)start (the gradient-norm schedule follows them), the best loss since then and
    the step that last gained ``min_gain`` on it, the restarts made, the last gradient-norm estimate, and the running
    average of the estimates (flattened) that decides which faces are free."""

    local: Tensor
    best: Tensor
    best_at: Tensor
    restarts: Tensor
    norm_square: Tensor  # the last estimate of ||grad f||^2 on the free coordinates of its step
    measured_share: Tensor  # the share of the prior's energy that was free at that step
    trend: Tensor

    @classmethod
    def begin(cls, value: Tensor, dim: int) -> _Progress:
        zeros = torch.zeros(value.shape, dtype=torch.long, device=value.device)
        trend = torch.zeros((value.shape[0], dim), dtype=value.dtype, device=value.device)
        return cls(
            zeros.clone(), value.clone(), zeros.clone(), zeros.clone(), torch.zeros_like(value), torch.ones_like(value),
            trend,
        )  # fmt: skip

    def remember(self, rows: Tensor, grad: Tensor, decay: float) -> None:
        """Add the estimates ``grad`` of ``rows``, each scaled to a largest coordinate of 1, to their running
        average (``decay`` times the old one)."""
        flat = grad.reshape(rows.numel(), -1).to(self.trend.dtype)
        flat = flat / flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        self.trend[rows] = decay * self.trend[rows] + flat

    def face_guide(self, rows: Tensor, prior: Tensor) -> Tensor:
        """The direction whose signs decide which faces are free for ``rows``: the running average of the estimates,
        the prior where the average is zero (never estimated since the (re)start)."""
        trend = self.trend[rows]
        flat = prior.reshape(trend.shape)
        return torch.where(trend != 0, trend.to(flat.dtype), flat).reshape(prior.shape)

    def norm_step(self, rows: Tensor, every: int) -> Tensor:
        """Whether each example of ``rows`` re-estimates the gradient norm at this step (0, 3, then every
        ``every`` steps of its current start, as in the reference)."""
        local = self.local[rows]
        return (local % every == 0) | (local == 3)

    def observe(self, rows: Tensor, value: Tensor, min_gain: float) -> None:
        self.local[rows] += 1
        gained = value > self.best[rows] + min_gain
        self.best[rows] = torch.maximum(self.best[rows], value)
        self.best_at[rows] = torch.where(gained, self.local[rows], self.best_at[rows])

    def stalled(self, rows: Tensor, patience: int, restarts: int) -> Tensor:
        """Which examples of ``rows`` gained nothing for ``patience`` steps and may still restart."""
        return (self.local[rows] - self.best_at[rows] >= patience) & (self.restarts[rows] < restarts)

    def restart(self, rows: Tensor, value: Tensor) -> None:
        self.restarts[rows] += 1
        self.best[rows] = value
        self.local[rows] = 0
        self.best_at[rows] = 0
        self.trend[rows] = 0


@dataclass
class _Run:
    """What one P-RGF run's helpers share: the search, the clean inputs, the iterates and their losses (updated in
    place), the per-example progress, and the run's fixed context."""

    search: ScoreSearch
    x: Tensor
    x_adv: Tensor
    value: Tensor
    progress: _Progress
    threat: ThreatModel
    generator: torch.Generator
    loss: AttackLoss
    ensemble: Ensemble | None

    def on(self, rows: Tensor) -> Evaluate:
        """The attack's loss at points owned by ``rows[owners]`` (each point one query of the target, clipped to
        the box as in every robustlab score attack)."""
        threat, search = self.threat, self.search

        def evaluate(points: Tensor, owners: Tensor) -> Tensor:
            examples = rows[owners]
            scores = search.oracle.scores(points.clamp(threat.lower, threat.upper), examples)
            return search.objective(scores, examples)

        return evaluate


@register_attack
class PRGF(SurrogateAttack, Attack[ScoreOracle]):
    """P-RGF (Cheng et al. 2019): RGF estimates biased toward a surrogate's gradient, lambda from queries."""

    name = "p-rgf"
    access = Access.SCORES
    norms = frozenset({Norm.LINF, Norm.L2})
    Config = PRGFConfig
    config: PRGFConfig

    def _start(
        self, search: ScoreSearch, x: Tensor, value: Tensor, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """The first iterates, queried (their losses written to ``value``), and the examples that go on: the clean
        input, one query (``p-rgf-transfer``: transfer examples)."""
        return x.clone(), search.start(x, value)

    def _direction(self, grad: Tensor, threat: ThreatModel) -> Tensor:
        """The step's direction for estimates ``grad``: in linf their sign (``linf_step="sign"``) or the estimates
        scaled so that their largest coordinate is 1 (``"scaled"``); in l2 the unit estimate."""
        if threat.norm is not Norm.LINF or self.config.linf_step == "sign":
            return threat.steepest_ascent(grad)
        largest = grad.abs().reshape(grad.shape[0], -1).amax(dim=1).clamp_min(1e-30)
        return grad / largest.reshape(-1, *([1] * (grad.dim() - 1)))

    def _restart(
        self, x: Tensor, x_adv: Tensor, done: Tensor, threat: ThreatModel, generator: torch.Generator
    ) -> Tensor:
        """Where an example (clean input ``x``, stalled at ``x_adv``) restarts after ``done`` restarts: a uniform
        random point of the ball (in the box)."""
        return threat.random_start(x, generator)

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
        lr = c.lr if c.lr is not None else c.step_fraction(threat, ensemble is not None) * threat.eps
        value = torch.zeros(n, dtype=x.dtype, device=x.device)
        stats = {
            "steps": torch.zeros(n, dtype=torch.long, device=x.device),
            "fallback_steps": torch.zeros(n, dtype=torch.long, device=x.device),
            "prior_steps": torch.zeros(n, dtype=torch.long, device=x.device),
            "alpha_sum": torch.zeros(n, dtype=torch.float64, device=x.device),
            "directions": torch.zeros(n, dtype=torch.long, device=x.device),
        }
        x_adv, active = self._start(search, x, value, threat, generator)
        run = _Run(search, x, x_adv, value, _Progress.begin(value, x[0].numel()), threat, generator, loss, ensemble)

        number = 0
        while active.numel() > 0:
            # An example goes on only while it can pay a whole step at its worst (its norm steps cost more).
            cost = int(ensemble is not None) + c.q + 1
            norm_step = run.progress.norm_step(active, c.norm_every) & (ensemble is not None)
            measuring = search.affordable(active[norm_step], cost + c.norm_samples)
            active = torch.cat([measuring, search.affordable(active[~norm_step], cost)]).sort().values
            if active.numel() == 0:
                break
            here = x_adv[active]
            prior, free, gradient_norm = self._prior(run, active, run.progress.norm_step(active, c.norm_every))
            estimate = prior_guided_estimate(
                run.on(active), here, value[active], prior, gradient_norm, q=c.q, sigma=c.sigma, generator=generator,
                free=free,
            )  # fmt: skip
            _tally(stats, active, estimate, with_prior=ensemble is not None)
            if c.face_decay is not None and ensemble is not None:  # without a prior every coordinate is free
                run.progress.remember(active, estimate.grad, c.face_decay)
            candidate = threat.project(here + lr * self._direction(estimate.grad, threat), x[active])
            success, new_value = search.evaluate(candidate, active)
            new_value = new_value.to(x.dtype)
            x_adv[active] = candidate
            value[active] = new_value
            run.progress.observe(active, new_value, c.min_gain)
            active = search.record(candidate, active, success, new_value, number + 1)
            number += 1
            active = self._restart_stalled(run, active, number)
        steps = stats["steps"]
        extras = {
            "iterations": search.iterations,
            "steps": steps,
            "fallback_steps": stats["fallback_steps"],
            "prior_steps": stats["prior_steps"],
            "directions": stats["directions"],
            "alpha": stats["alpha_sum"] / steps.clamp_min(1),
            "prior": torch.full((n,), ensemble is not None, dtype=torch.bool, device=x.device),
            "restarts": run.progress.restarts,
        }
        return search.best.x, extras

    def _prior(self, run: _Run, active: Tensor, norm_step: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """Steps 1-2 for the examples ``active``: the prior (None without surrogates), the free coordinates, and
        ``||grad f||^2`` on them (measured with queries on ``norm_step`` examples, else rescaled)."""
        c, progress = self.config, run.progress
        if run.ensemble is None:
            return None, None, progress.norm_square[active]
        here = run.x_adv[active]
        # Margin loss: the surrogates' gradient of the target's own pair of classes at the iterate.
        rival = c.loss == "margin" and c.prior_loss == "rival"
        prior_loss = rival_margin_loss(run.search.rival[active]) if rival else run.loss
        _, prior = run.ensemble.loss_and_grad(here, run.search.goal.subset(active), prior_loss)
        # The faces a step may leave are judged by the target's own recent estimates (see the module docstring).
        guide = prior if c.face_decay is None else progress.face_guide(active, prior)
        free = free_coordinates(here, run.x[active], guide, run.threat)
        share = _prior_share(prior, free)
        measure = norm_step.nonzero().flatten()
        if measure.numel():
            rows = active[measure]
            progress.norm_square[rows] = estimate_gradient_norm(
                run.on(rows), here[measure], run.value[rows], samples=c.norm_samples, sigma=c.sigma,
                generator=run.generator, free=free[measure],
            ).to(here.dtype)  # fmt: skip
            progress.measured_share[rows] = share[measure]
        # The norm was measured on the free set of the last norm step; the free set shrinks as the iterate reaches
        # faces, so scale it by the share of the prior's energy still free (exact when the prior is the gradient)
        # instead of paying norm_samples queries at every step.
        gradient_norm = progress.norm_square[active] * share / progress.measured_share[active].clamp_min(1e-12)
        return prior, free, gradient_norm

    def _restart_stalled(self, run: _Run, active: Tensor, number: int) -> Tensor:
        """Restart the examples of ``active`` that stalled (one query at the new point, which may succeed);
        returns the examples that go on."""
        stalled = active[run.progress.stalled(active, self.config.patience, self.config.restarts)]
        stalled = run.search.affordable(stalled, 1)
        if stalled.numel() == 0:
            return active
        restart = self._restart(
            run.x[stalled], run.x_adv[stalled], run.progress.restarts[stalled], run.threat, run.generator
        )
        run.x_adv[stalled] = restart
        fooled, restart_value = run.search.evaluate(restart, stalled)
        run.value[stalled] = restart_value.to(run.value.dtype)
        run.progress.restart(stalled, run.value[stalled])
        run.search.record(restart, stalled, fooled, restart_value, number)
        return active[~torch.isin(active, stalled[fooled])]
