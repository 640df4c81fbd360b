"""Zeroth-order gradient estimation: gradients of a black-box function from its values alone.

Two estimators, with the exact scalings of the ZO primer (Liu, Chen, Chen, Hero, Varshney, "A Primer on Zeroth-Order
Optimization in Signal Processing and Machine Learning", IEEE SPM 2020) and Alg. 3 of Chen et al. ("A Frank-Wolfe
Framework for Efficient and Effective Adversarial Attacks", AAAI 2020). For a function ``f`` of ``d`` variables,
smoothing radius ``mu`` and ``q`` random directions ``u_i``:

- :class:`RGE` (random gradient estimate):

  forward, unit sphere:    ``g = (d / q)        sum_i [f(x + mu u_i) - f(x)] / mu        u_i``
  symmetric, unit sphere:  ``g = (d / (2 mu q)) sum_i [f(x + mu u_i) - f(x - mu u_i)]    u_i``
  forward, Gaussian:       ``g = (1 / q)        sum_i [f(x + mu u_i) - f(x)] / mu        u_i``
  symmetric, Gaussian:     ``g = (1 / (2 mu q)) sum_i [f(x + mu u_i) - f(x - mu u_i)]    u_i``

  with ``u_i`` uniform on the unit sphere, or ``u_i ~ N(0, I)``. Costs ``q + 1`` (forward: the value at ``x``
  itself counts) or ``2q`` evaluations. For a linear ``f(x) = a.x`` (and, with symmetric differences, any
  quadratic) each estimate is unbiased, with ``E||g - a||^2 = (d - 1) ||a||^2 / q`` on the sphere and
  ``(d + 1) ||a||^2 / q`` for Gaussian directions. The symmetric Gaussian estimate with ``q`` antithetic pairs is
  exactly NES (Ilyas, Engstrom, Athalye, Lin, "Black-box Adversarial Attacks with Limited Queries and
  Information", ICML 2018).

- :class:`CGE` (coordinate-wise gradient estimate, as in ZOO, Chen et al., AISec 2017):

  ``g = sum_j [f(x + mu e_j) - f(x - mu e_j)] / (2 mu) e_j``

  over all ``d`` coordinates (``2d`` evaluations) or a subset of them (the other coordinates of ``g`` are 0).
  Exact for linear and quadratic functions.

Every estimator works in two stages so that all evaluations of a step form *one* batch across examples and
directions: :meth:`~GradientEstimator.probes` lays out the points to evaluate, a caller evaluates them in one call,
and :meth:`~GradientEstimator.combine` turns the values into gradients. :func:`estimate_gradient` does both for any
function ``f(points) -> values``; :func:`estimate_with_oracle` does both through a
:class:`~robustlab.oracles.ScoreOracle`, which counts every evaluation against the example it belongs to.

Example:
    >>> estimator = RGE(q=20, mu=0.005, directions="gaussian")
    >>> est = estimate_gradient(lambda p: (p.flatten(1) ** 2).sum(1), x, estimator, generator=g)
    >>> est.grad.shape == x.shape
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from robustlab.checks import check_choice, check_number, check_positive_int
from robustlab.errors import ConfigError, InvalidInputError
from robustlab.goals import Goal
from robustlab.losses import AttackLoss
from robustlab.oracles import ScoreOracle, looks_like_probabilities

__all__ = [
    "CGE",
    "RGE",
    "Estimate",
    "GradientEstimator",
    "Probes",
    "ScoreObjective",
    "cge",
    "estimate_gradient",
    "estimate_with_oracle",
    "log_probabilities",
    "rge",
    "sample_directions",
]

DirectionKind = Literal["sphere", "gaussian"]
DifferenceKind = Literal["forward", "symmetric"]


@dataclass(frozen=True)
class Probes:
    """The points at which to evaluate ``f`` for one estimate, laid out example by example.

    Attributes:
        points: ``(n * k, *shape)``; rows ``i * k`` to ``(i + 1) * k - 1`` belong to example ``i`` of ``x``.
        owner: ``(n * k,)`` the example (row of ``x``) each point belongs to.
        per_example: ``k``, the number of evaluations per example.
        center: whether the first row of each example's block is ``x`` itself.
        directions: RGE: the directions ``(n, q, d)`` (flattened); CGE: the coordinates ``(n, k)``.
        x: the points the gradient is estimated at.
    """

    points: Tensor
    owner: Tensor
    per_example: int
    center: bool
    directions: Tensor
    x: Tensor


@dataclass(frozen=True)
class Estimate:
    """A gradient estimate for a batch.

    Attributes:
        grad: ``(n, *shape)`` the estimated gradients.
        values: ``(n, k)`` every value of ``f`` the estimate used, in the probe layout.
        value: ``(n,)`` ``f(x)`` when the probes included ``x`` itself (forward differences, or ``center=True``).
        center_scores: through an oracle with ``center=True``: the scores of ``x`` itself, ``(n, classes)``.
    """

    grad: Tensor
    values: Tensor
    value: Tensor | None = None
    center_scores: Tensor | None = None


def sample_directions(
    n: int,
    q: int,
    dim: int,
    kind: DirectionKind,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """``(n, q, dim)`` random directions: uniform on the unit sphere, or standard Gaussian."""
    u = torch.randn((n, q, dim), generator=generator, dtype=dtype, device=device)
    if kind == "sphere":
        u = u / u.norm(dim=2, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    return u


class GradientEstimator(ABC):
    """A zeroth-order gradient estimator in two stages: lay out probes, then combine their values."""

    mu: float

    @abstractmethod
    def queries_per_example(self, dim: int, *, center: bool = False) -> int:
        """Evaluations one estimate costs per example of dimension ``dim`` (``center``: also ``f(x)``)."""

    @abstractmethod
    def probes(self, x: Tensor, generator: torch.Generator | None = None, *, center: bool = False) -> Probes:
        """The points to evaluate for estimates at every row of ``x`` (``center``: include ``x`` itself)."""

    @abstractmethod
    def combine(self, probes: Probes, values: Tensor) -> Estimate:
        """Gradients from the values ``(n * k,)`` of ``f`` at ``probes.points``."""


def _layout(x: Tensor, blocks: list[Tensor]) -> tuple[Tensor, Tensor, int]:
    """Stack per-example blocks ``(n, k_j, d)`` into points ``(n * k, *shape)`` ordered example by example."""
    n = x.shape[0]
    stacked = torch.cat(blocks, dim=1)
    k = int(stacked.shape[1])
    points = stacked.reshape((n * k, *x.shape[1:]))
    owner = torch.arange(n, device=x.device).repeat_interleave(k)
    return points, owner, k


def _split_values(probes: Probes, values: Tensor) -> Tensor:
    n = probes.x.shape[0]
    expected = n * probes.per_example
    if not isinstance(values, Tensor) or values.shape != (expected,):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise InvalidInputError(f"f must return one value per probe point, shape ({expected},), got {shape}")
    if not bool(torch.isfinite(values).all()):
        raise InvalidInputError("f returned NaN or Inf values at some probe points")
    return values.reshape(n, probes.per_example).to(probes.x.dtype)


@dataclass(frozen=True)
class RGE(GradientEstimator):
    """Random gradient estimate with ``q`` directions (see the module docstring for the formulas).

    Attributes:
        q: number of random directions (symmetric differences evaluate ``2q`` points, forward ``q + 1``).
        mu: smoothing radius: the probes lie at distance ``mu * ||u||`` from ``x`` (``mu`` on the unit sphere,
            about ``mu * sqrt(d)`` for Gaussian directions).
        directions: ``"sphere"`` (uniform on the unit sphere, scaled by ``d``) or ``"gaussian"`` (``N(0, I)``).
        difference: ``"symmetric"`` (antithetic pairs ``x +- mu u``) or ``"forward"`` (``x + mu u`` and ``x``).
    """

    q: int = 20
    mu: float = 0.005
    directions: DirectionKind = "sphere"
    difference: DifferenceKind = "symmetric"

    def __post_init__(self) -> None:
        check_positive_int("q (the number of directions)", self.q)
        check_number("mu (the smoothing radius)", self.mu, low=0.0, low_open=True)
        check_choice("directions", self.directions, ("sphere", "gaussian"))
        check_choice("difference", self.difference, ("forward", "symmetric"))

    def queries_per_example(self, dim: int, *, center: bool = False) -> int:
        if self.difference == "forward":
            return self.q + 1
        return 2 * self.q + int(center)

    def probes(self, x: Tensor, generator: torch.Generator | None = None, *, center: bool = False) -> Probes:
        n = x.shape[0]
        flat = x.reshape(n, 1, -1)
        u = sample_directions(
            n, self.q, flat.shape[2], self.directions, generator=generator, dtype=x.dtype, device=x.device
        )
        blocks = []
        with_center = center or self.difference == "forward"
        if with_center:
            blocks.append(flat)
        blocks.append(flat + self.mu * u)
        if self.difference == "symmetric":
            blocks.append(flat - self.mu * u)
        points, owner, k = _layout(x, blocks)
        return Probes(points, owner, k, with_center, u, x)

    def combine(self, probes: Probes, values: Tensor) -> Estimate:
        v = _split_values(probes, values)
        offset = int(probes.center)
        plus = v[:, offset : offset + self.q]
        if self.difference == "forward":
            slopes = (plus - v[:, :1]) / self.mu
        else:
            minus = v[:, offset + self.q : offset + 2 * self.q]
            slopes = (plus - minus) / (2.0 * self.mu)
        u = probes.directions
        scale = float(u.shape[2]) if self.directions == "sphere" else 1.0
        grad = torch.einsum("nq,nqd->nd", slopes, u) * (scale / self.q)
        value = v[:, 0] if probes.center else None
        return Estimate(grad.reshape(probes.x.shape), v, value)


@dataclass(frozen=True)
class CGE(GradientEstimator):
    """Coordinate-wise gradient estimate by symmetric differences along the coordinate axes.

    Attributes:
        mu: the step along each axis.
        subset: estimate along this many coordinates per example, drawn uniformly without replacement at every
            call (ZOO's stochastic coordinate selection); None: all coordinates. Explicit coordinates can be passed
            to :meth:`probes` instead. Coordinates outside the subset get 0 (no rescaling).
    """

    mu: float = 0.005
    subset: int | None = None

    def __post_init__(self) -> None:
        check_number("mu (the smoothing radius)", self.mu, low=0.0, low_open=True)
        check_positive_int("subset (coordinates per estimate)", self.subset, allow_none=True)

    def queries_per_example(self, dim: int, *, center: bool = False) -> int:
        k = dim if self.subset is None else min(self.subset, dim)
        return 2 * k + int(center)

    def probes(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        *,
        center: bool = False,
        coordinates: Tensor | None = None,
    ) -> Probes:
        """Probes along ``coordinates``: flat indices, shared ``(k,)`` or per example ``(n, k)``.

        Without ``coordinates``: all of them, or a random ``subset`` per example.
        """
        n = x.shape[0]
        flat = x.reshape(n, -1)
        dim = flat.shape[1]
        if coordinates is not None:
            index = torch.as_tensor(coordinates, device=x.device)
            if index.dtype.is_floating_point or index.dtype == torch.bool or index.dim() not in (1, 2):
                raise InvalidInputError("coordinates must be integer flat indices of shape (k,) or (n, k)")
            if index.dim() == 1:
                index = index.expand(n, -1)
            if index.shape[0] != n or index.numel() == 0:
                raise InvalidInputError(f"coordinates must have shape (k,) or ({n}, k), got {tuple(index.shape)}")
            if int(index.min()) < 0 or int(index.max()) >= dim:
                raise InvalidInputError(f"coordinates must lie in [0, {dim - 1}]")
            index = index.to(torch.long)
        elif self.subset is None or self.subset >= dim:
            index = torch.arange(dim, device=x.device).expand(n, -1)
        else:
            keys = torch.rand((n, dim), generator=generator, device=x.device)
            index = keys.topk(self.subset, dim=1).indices
        k = index.shape[1]
        step = torch.zeros((n, k, dim), dtype=x.dtype, device=x.device)
        step.scatter_(2, index[:, :, None], self.mu)
        base = flat[:, None, :]
        blocks = [base] if center else []
        blocks += [base + step, base - step]
        points, owner, per_example = _layout(x, blocks)
        return Probes(points, owner, per_example, center, index, x)

    def combine(self, probes: Probes, values: Tensor) -> Estimate:
        v = _split_values(probes, values)
        offset = int(probes.center)
        index = probes.directions
        k = index.shape[1]
        slopes = (v[:, offset : offset + k] - v[:, offset + k : offset + 2 * k]) / (2.0 * self.mu)
        n = probes.x.shape[0]
        grad = torch.zeros((n, probes.x[0].numel()), dtype=probes.x.dtype, device=probes.x.device)
        grad.scatter_(1, index, slopes)
        value = v[:, 0] if probes.center else None
        return Estimate(grad.reshape(probes.x.shape), v, value)


def estimate_gradient(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    estimator: GradientEstimator,
    *,
    generator: torch.Generator | None = None,
    center: bool = False,
) -> Estimate:
    """Estimate the gradient of ``f`` at every row of ``x`` with one call ``f(points)``.

    Args:
        f: maps a batch of points ``(m, *shape)`` to one value per point ``(m,)``. Points of example ``i`` are
            rows ``i * k`` to ``(i + 1) * k - 1`` (``k = estimator.queries_per_example(d, center=center)``), so a
            function whose value depends on the example (a label, say) can recover it as ``row // k``.
        x: ``(n, *shape)`` the points to estimate at.
        estimator: :class:`RGE` or :class:`CGE`.
        generator: randomness of the directions.
        center: also evaluate ``f(x)`` in the same call (returned as ``Estimate.value``).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise InvalidInputError("x must be a floating-point batch (n, ...) of points")
    probes = estimator.probes(x, generator, center=center)
    values = f(probes.points)
    return estimator.combine(probes, values)


def rge(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    q: int = 20,
    mu: float = 0.005,
    directions: DirectionKind = "sphere",
    difference: DifferenceKind = "symmetric",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The :class:`RGE` estimate of the gradient of ``f`` at each row of ``x`` (one call to ``f``)."""
    return estimate_gradient(f, x, RGE(q, mu, directions, difference), generator=generator).grad


def cge(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    mu: float = 0.005,
    coordinates: Tensor | None = None,
) -> Tensor:
    """The :class:`CGE` estimate of the gradient of ``f`` at each row of ``x`` (all or ``coordinates``)."""
    estimator = CGE(mu)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise InvalidInputError("x must be a floating-point batch (n, ...) of points")
    probes = estimator.probes(x, coordinates=coordinates)
    return estimator.combine(probes, f(probes.points)).grad


# --------------------------------------------------------------------------------------------- through an oracle
def log_probabilities(scores: Tensor, probabilities: bool) -> Tensor:
    """Log-probabilities from a model's scores: ``log_softmax`` of logits, or the log of probabilities.

    Losses on log-probabilities are the same whichever the model returns: the margin of the log-probabilities
    equals the margin of the logits, and cross-entropy is ``-log p_y``.
    """
    if probabilities:
        return scores.clamp_min(torch.finfo(scores.dtype).tiny).log()
    return torch.log_softmax(scores, dim=1)


class ScoreObjective:
    """The per-example attack loss of a black-box model's scores, for zeroth-order attacks.

    The loss (maximized; targeted variants follow from the goal) is computed on log-probabilities, so that it is
    the same for a model that returns logits and for one that ends in a softmax. Which of the two the model returns
    is decided once, from the first scores seen, and kept for the whole attack: the finite differences must all
    see the same function.
    """

    def __init__(self, loss: AttackLoss, goal: Goal) -> None:
        self.loss = loss
        self.goal = goal
        self.probabilities: bool | None = None

    def __call__(self, scores: Tensor, examples: Tensor) -> Tensor:
        """Loss of each row of ``scores``; row ``i`` belongs to example ``examples[i]`` of the goal."""
        if self.probabilities is None:
            self.probabilities = looks_like_probabilities(scores)
        return self.loss(log_probabilities(scores, self.probabilities), self.goal.subset(examples))


def estimate_with_oracle(
    oracle: ScoreOracle,
    x: Tensor,
    estimator: GradientEstimator,
    objective: Callable[[Tensor, Tensor], Tensor],
    *,
    index: Tensor | None = None,
    generator: torch.Generator | None = None,
    center: bool = False,
    decode: Callable[[Tensor], Tensor] | None = None,
    bounds: tuple[float, float] | None = None,
    known_value: Tensor | None = None,
) -> Estimate:
    """Estimate gradients of ``objective(model(decode(z)))`` at each row ``z`` of ``x`` with ONE oracle call.

    Every probe is charged by the oracle to the example it belongs to; the oracle refuses the whole call, before
    evaluating anything, if some example cannot afford ``estimator.queries_per_example(d, center=center)`` more
    queries (check ``oracle.remaining(index)`` first to drop such examples).

    Args:
        oracle: a bound :class:`~robustlab.oracles.ScoreOracle`.
        x: ``(n, *shape)`` points to estimate at (inputs, or latent codes when ``decode`` is given).
        estimator: :class:`RGE` or :class:`CGE`.
        objective: ``objective(scores, examples) -> (m,)``: the value to differentiate for each row of scores,
            where ``examples[i]`` is the example (an index of the bound batch) row ``i`` belongs to; e.g. a
            :class:`ScoreObjective`.
        index: ``(n,)`` the example of the bound batch each row of ``x`` belongs to (None: row ``i`` is example
            ``i``).
        generator: randomness of the directions.
        center: also query ``x`` itself in the same call (``Estimate.value`` and ``Estimate.center_scores``).
        decode: maps points to the model's inputs (e.g. a decoder from a latent code); part of the black box.
        bounds: ``(lower, upper)`` of the model's input box. Probes are clipped into it before they are queried:
            a deployed model only accepts valid inputs (a model server rejects the rest), and an attack must not
            learn from the model's behaviour outside the domain it will be judged on. A probe clipped at the box
            face measures a one-sided difference along the face, a small bias only at saturated pixels.
        known_value: ``(n,)`` the objective at each row of ``x``, already paid for (an attack's success check at its
            iterate). With an estimator whose probes include ``x`` itself (forward differences), that point is not
            queried again: the estimate costs one query less per example.
    """
    n = x.shape[0]
    if index is None:
        index = torch.arange(n, device=x.device)
    elif index.shape != (n,):
        raise InvalidInputError(f"index must have shape ({n},), got {tuple(index.shape)}")
    probes = estimator.probes(x, generator, center=center)
    reuse = known_value is not None and probes.center
    if reuse and center:
        raise ConfigError("center=True asks for the scores at x, which known_value does not carry")
    if known_value is not None and known_value.shape != (n,):
        raise InvalidInputError(f"known_value must have shape ({n},), got {tuple(known_value.shape)}")
    points, owner = probes.points, probes.owner
    if reuse:  # the first row of each example's block is x itself, whose value is known: do not query it
        k = probes.per_example
        points = points.reshape(n, k, *points.shape[1:])[:, 1:].reshape(n * (k - 1), *points.shape[1:])
        owner = owner.reshape(n, k)[:, 1:].reshape(-1)
    inputs = points if decode is None else decode(points)
    if bounds is not None:
        inputs = inputs.clamp(bounds[0], bounds[1])
    examples = index[owner]
    scores = oracle.scores(inputs, examples)
    values = objective(scores, examples)
    if reuse and known_value is not None:
        block = values.reshape(n, probes.per_example - 1)
        values = torch.cat([known_value.to(values.dtype).reshape(n, 1), block], dim=1).reshape(-1)
    estimate = estimator.combine(probes, values)
    if not probes.center or reuse:
        return estimate
    center_scores = scores.reshape(n, probes.per_example, -1)[:, 0]
    return Estimate(estimate.grad, estimate.values, estimate.value, center_scores)
