"""RayS: hard-label Linf attack by hierarchical search over sign directions, vectorized over the batch.

Jinghui Chen and Quanquan Gu. "RayS: A Ray Searching Method for Hard-label Adversarial Attack", KDD 2020
(reference code: ``uclaml/RayS``, ``RayS.py``).

The attack sees only the predicted label. It looks for the ray ``x + r * d / ||d||_2`` with a sign direction
``d in {-1, 1}^n`` whose decision boundary is nearest; the Linf distance of the boundary point is
``r / sqrt(n)``. Starting from ``d_best = (1, ..., 1)`` and ``r_best = inf``, stage ``s`` cuts ``d`` into ``2^s``
contiguous blocks of ``ceil(n / 2^s)`` coordinates (in the flattened C, H, W order; at least one coordinate per
block) and tries, one block at a time, ``d_best`` with that block's signs flipped. Each candidate gets a
decision-boundary radius (DBR) search:

1. the fast check: one query at ``x + r_best * u`` (clipped to the box). If it is not adversarial, the candidate
   cannot beat ``r_best`` and is rejected for this single query;
2. otherwise a binary search of ``r`` in ``[0, min(r_best, r_max)]`` to a tolerance ``tol`` in units of ``r`` (the
   ray length along the L2-normalized direction, as in the reference, whose tolerance is 1e-3, ``1e-3 / sqrt(n)``
   in Linf), keeping the candidate if the adversarial end improves ``r_best``.

``r_max`` is where the search starts while ``r_best`` is infinite: ``sqrt(n)`` times the box width, which along
any sign direction reaches a corner of the box (the reference's ``x + inf * u`` clipped to [0, 1]). Like the
reference, the initial all-ones direction itself is never searched: the first candidate is all minus ones.

Two departures from the reference, both on by default and both switchable off (``start="ones"``, ``tol=1e-3``):

- The box start (``start="box"``): before stage 0, one extra candidate, the direction that moves every
  coordinate toward its farther face of the box (``+1`` where ``x`` is below the box's midpoint, ``-1`` above).
  Along any other sign direction the coordinates that point at their nearer face are clipped sooner (a pixel at 0
  moved by ``-r`` does not move at all), so this ray changes the input most at every radius; on MNIST it is
  often adversarial within eps at once. If its fast check fails, the search goes on exactly as the reference's;
  if it is kept, the stages flip blocks of it (stage 0's full flip then costs one rejected query).
- In ``"eps"`` mode the binary search stops at 1% of eps (``tol=None``): there the radius is only compared
  between rays and against eps, not reported, and the reference's 1e-3 spends about seven more queries per
  accepted ray measuring digits nobody reads. ``"adbd"`` mode keeps 1e-3.

Vectorization: every example runs its own copy of this state machine (clean check -> fast check -> [eps probe]
-> binary search -> next candidate), and each round asks the oracle exactly one question per live example, all of
them in one batched call. Examples therefore never wait for each other, and an example's sequence of queries is
exactly the one it would make alone.

Modes (``mode``):

- ``"eps"`` (robust accuracy): an example stops as soon as its best boundary point is within ``eps``. After a
  passing fast check the ray is probed once at radius ``eps`` (``eps_probe``): if that point is adversarial the
  example is broken with no binary search; if not, the binary search continues on ``[eps, r_best]``, where its
  first midpoint is the only thing the probe replaced. ``eps_probe=False`` with ``start="ones", tol=1e-3`` makes
  the sequence of queries that of the reference (plus the clean check).
- ``"adbd"``: every example runs to its budget, and ``extras["boundary_distance"]`` holds the Linf distance of
  the nearest boundary point found. Its mean over correctly classified examples is the average decision-boundary
  distance (ADBD, see :func:`average_boundary_distance`); the reference code forgets to drop misclassified ones.

Query accounting: the first query of every example is the clean input (misclassified examples stop there with
distance 0 and ``clean_correct = False``); every query counts against the budget, and a binary search cut short
by the budget keeps its adversarial end if that improves ``r_best`` (it was queried and found adversarial).

Output: ``x_adv`` is the best boundary point if it is within ``eps`` (a point the attack queried and saw
misclassified, so the base class's audit only confirms it), else the clean input. The attack never returns a
point it has not queried, so the free audit cannot add successes. Success is untargeted only: the paper's search
from sign directions at ``x`` has no natural targeted form.

Example:
    >>> result = robustlab.attack(model, x, y, ThreatModel("linf", 0.3), method="rays", queries=10000)
    >>> result.summary()["median_queries_successful"]
    >>> average_boundary_distance(robustlab.attack(model, x, y, threat, method="rays", mode="adbd"))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from robustlab.attacks._decision import DecisionAttack, DecisionBatch, DecisionConfig
from robustlab.attacks.base import AttackResult, budget_left
from robustlab.attacks.registry import register_attack
from robustlab.checks import check_flag, check_number
from robustlab.errors import ConfigError
from robustlab.threat import Norm, ThreatModel

__all__ = ["RayS", "RaySConfig", "average_boundary_distance"]

STARTS = ("box", "ones")

# Phases of the per-example state machine (the clean check comes before, in DecisionAttack).
_CHECK, _PROBE, _SEARCH, _DONE = 1, 2, 3, 4


@dataclass(frozen=True)
class RaySConfig(DecisionConfig):
    """Options of :class:`RayS`.

    Attributes:
        queries: query budget per example, including the clean check (paper: 10,000; 40,000 for robust models).
        mode: ``"eps"`` stops each example once its best point is within eps (robust accuracy, success-vs-queries
            curve); ``"adbd"`` spends the whole budget to measure the decision-boundary distance.
        tol: binary-search tolerance on the ray length ``r`` along the L2-normalized sign direction (the Linf
            tolerance is ``tol / sqrt(n)``). None: the reference's 1e-3 in ``"adbd"`` mode, ``sqrt(n) * eps / 100``
            (1% of eps in Linf) in ``"eps"`` mode.
        eps_probe: in ``"eps"`` mode, probe a ray at radius eps right after its fast check passes (see the module
            docstring); no effect in ``"adbd"`` mode.
        max_radius: Linf radius of the first search point while no boundary is known; None means the box width,
            which reaches a corner of the box. Required for an unbounded box.
        start: ``"box"`` tries the direction toward each coordinate's farther box face first (see the module
            docstring; with an unbounded box it is all ones, the reference's own start); ``"ones"`` is the
            reference's start.
    """

    title: ClassVar[str] = "RayS"

    tol: float | None = None
    eps_probe: bool = True
    max_radius: float | None = None
    start: str = "box"

    def validate(self) -> None:
        super().validate()
        if self.tol is not None:
            check_number("tol", self.tol, low=0, low_open=True)
        if self.start not in STARTS:
            raise ConfigError(
                f"unknown RayS start {self.start!r}: choose 'box' (toward the farther box face) or 'ones'"
            )
        if self.max_radius is not None:
            check_number("max_radius", self.max_radius, low=0, low_open=True)
        check_flag("eps_probe", self.eps_probe)


@register_attack
class RayS(DecisionAttack):
    """RayS (Chen & Gu, KDD 2020): hard-label Linf ray search over sign directions, batched, eps or ADBD mode."""

    name = "rays"
    norms = frozenset({Norm.LINF})
    Config = RaySConfig
    config: RaySConfig
    supports_targeted = False

    def _check_threat(self, threat: ThreatModel) -> None:
        if not math.isfinite(_search_width(self.config, threat)):
            raise ConfigError(
                "RayS starts its search at the box corner; with an unbounded box give max_radius (the Linf radius "
                "of the first search point)"
            )

    def _search(self, batch: DecisionBatch, rows: Tensor) -> None:
        _RaySSearch(self.config, batch).run(rows)


def _search_width(config: RaySConfig, threat: ThreatModel) -> float:
    """Linf radius of the first search point while no boundary is known."""
    return config.max_radius if config.max_radius is not None else threat.upper - threat.lower


class _RaySSearch:
    """RayS's per-example state machine (module docstring), one row per example, all rows advanced together.

    Per row: the best sign direction ``sign_best`` and its boundary radius ``r_best``; the candidate
    ``direction`` (stage ``level``, block ``block``; stage -1 is the box start); the bracket ``[lo, hi]`` of its
    binary search; and the ``phase`` (fast check, eps probe, binary search, done). Radii are ray lengths along the
    L2-normalized direction, so a Linf distance is ``r / sqrt(n)``.
    """

    def __init__(self, config: RaySConfig, batch: DecisionBatch) -> None:
        x, threat = batch.x, batch.threat
        self.config, self.threat = config, threat
        self.oracle, self.goal, self.record = batch.oracle, batch.goal, batch.record
        n = int(x.shape[0])
        dim = int(x[0].numel())
        device = x.device
        self.shape = tuple(x.shape[1:])
        self.dim = dim
        self.root = math.sqrt(dim)
        self.r_max = self.root * _search_width(config, threat)
        self.r_eps = self.root * threat.eps
        self.stop_at_eps = config.mode == "eps"
        self.probe = self.stop_at_eps and config.eps_probe
        self.tol = config.tol if config.tol is not None else (self.r_eps / 100 if self.stop_at_eps else 1e-3)
        self.max_level = (dim - 1).bit_length()  # from this stage on every block is one coordinate
        low_ball, high_ball = threat.linf_bounds(x)
        self.flat_x = x.reshape(n, dim)
        self.low_ball, self.high_ball = low_ball.reshape(n, dim), high_ball.reshape(n, dim)
        self.coordinate = torch.arange(dim, device=device)

        float64 = torch.float64
        self.sign_best = torch.ones((n, dim), dtype=x.dtype, device=device)
        self.box_start: Tensor | None = None
        if config.start == "box" and math.isfinite(threat.lower) and math.isfinite(threat.upper):
            middle = (threat.lower + threat.upper) / 2
            self.box_start = torch.where(self.flat_x > middle, -self.sign_best, self.sign_best)
        self.direction = torch.zeros_like(self.sign_best)
        self.level = torch.full((n,), 0 if self.box_start is None else -1, dtype=torch.long, device=device)
        self.block = torch.zeros(n, dtype=torch.long, device=device)
        self.r_best = torch.full((n,), math.inf, dtype=float64, device=device)
        self.lo = torch.zeros(n, dtype=float64, device=device)
        self.hi = torch.zeros(n, dtype=float64, device=device)
        self.phase = torch.full((n,), _DONE, dtype=torch.long, device=device)

    def run(self, rows: Tensor) -> None:
        """Search the examples ``rows`` (clean inputs classified correctly) until done or out of budget."""
        self.direction[rows] = self.candidate(rows)
        self.phase[rows] = _CHECK
        while True:
            remaining = budget_left(self.oracle, self.config.queries)
            rows = ((self.phase != _DONE) & (remaining > 0)).nonzero().flatten()
            if rows.numel() == 0:
                break
            stage = self.phase[rows]
            radius = self.query_radius(rows, stage)
            points = self.ray_point(rows, self.direction[rows], radius)
            labels = self.oracle.labels(points.reshape((-1, *self.shape)), rows)
            adversarial = self.goal.subset(rows).is_success(labels)
            checked, probed, searching = stage == _CHECK, stage == _PROBE, stage == _SEARCH
            self.after_check(rows[checked], radius[checked], adversarial[checked])
            self.after_probe(rows[probed], adversarial[probed])
            self.after_search_step(rows[searching], radius[searching], adversarial[searching])
        # Budget spent in the middle of a search: its adversarial end was queried, keep it if it is better.
        self.accept(((self.phase == _SEARCH) | (self.phase == _PROBE)).nonzero().flatten())

    # ------------------------------------------------------------ geometry
    def query_radius(self, rows: Tensor, stage: Tensor) -> Tensor:
        """This round's radius per row: ``min(r_best, r_max)`` to check, eps to probe, else the bracket's middle."""
        lo, hi = self.lo[rows], self.hi[rows]
        return torch.where(
            stage == _CHECK,
            torch.clamp(self.r_best[rows], max=self.r_max),
            torch.where(stage == _PROBE, torch.full_like(lo, self.r_eps), (lo + hi) / 2),
        )

    def ray_point(self, rows: Tensor, direction: Tensor, radius: Tensor) -> Tensor:
        """``x + radius / sqrt(n) * direction`` in the box; rows with radius <= r_eps also in the ball."""
        step = (radius / self.root).to(self.flat_x.dtype)[:, None]
        point = (self.flat_x[rows] + step * direction).clamp(self.threat.lower, self.threat.upper)
        inside = (radius <= self.r_eps)[:, None]
        ball = point.clamp(self.low_ball[rows], self.high_ball[rows])
        return torch.where(inside, ball, point)

    def block_size(self, rows: Tensor) -> Tensor:
        """Coordinates per block at the rows' stage: ``ceil(dim / 2^stage)`` (the box start counts as stage 0)."""
        stage = self.level[rows].clamp(min=0)
        return (self.dim + (1 << stage) - 1) >> stage

    def candidate(self, rows: Tensor) -> Tensor:
        """``d_best`` of ``rows`` with the signs of their current block flipped (stage -1: the box start)."""
        size = self.block_size(rows)
        start = self.block[rows] * size
        end = torch.clamp(start + size, max=self.dim)
        inside = (self.coordinate >= start[:, None]) & (self.coordinate < end[:, None])
        best = self.sign_best[rows]
        flipped = torch.where(inside, -best, best)
        if self.box_start is None:
            return flipped
        return torch.where((self.level[rows] < 0)[:, None], self.box_start[rows], flipped)

    # ------------------------------------------------------------ transitions
    def advance(self, rows: Tensor) -> None:
        """Move ``rows`` to the next block (and stage) and start its fast check."""
        lvl, blk = self.level[rows], self.block[rows]
        wrap = ((blk + 1) * self.block_size(rows) >= self.dim) | (lvl < 0)
        self.level[rows] = torch.where(wrap, torch.clamp(lvl + 1, max=self.max_level), lvl)
        self.block[rows] = torch.where(wrap, torch.zeros_like(blk), blk + 1)
        self.direction[rows] = self.candidate(rows)
        self.phase[rows] = _CHECK

    def accept(self, rows: Tensor) -> None:
        """Keep the candidates of ``rows`` whose adversarial end ``hi`` improves ``r_best``."""
        better = rows[self.hi[rows] < self.r_best[rows]]
        if better.numel() == 0:
            return
        hi = self.hi[better]
        self.r_best[better] = hi
        self.sign_best[better] = self.direction[better]
        points = self.ray_point(better, self.direction[better], hi)
        distance = self.threat.distance(points, self.flat_x[better])
        # Within eps by construction (clamped to the ball), or because clipping to the box pulled it inside.
        within = (hi <= self.r_eps) | (distance <= self.threat.eps)
        self.record.improve(better, points, distance, within, self.oracle.queries[better])

    def finalize(self, rows: Tensor) -> None:
        """End the DBR search of ``rows``: keep an improving candidate, then stop or move on."""
        if rows.numel() == 0:
            return
        self.accept(rows)
        if self.stop_at_eps:
            finished = self.record.within[rows]
            self.phase[rows[finished]] = _DONE
            rows = rows[~finished]
        if rows.numel():
            self.advance(rows)

    def start_search(self, rows: Tensor) -> None:
        """Binary search where it is still wider than the tolerance; finalize the rest at once."""
        self.phase[rows] = _SEARCH
        self.finalize(rows[self.hi[rows] - self.lo[rows] <= self.tol])

    # ------------------------------------------------------------ answers of one round
    def after_check(self, rows: Tensor, radius: Tensor, adversarial: Tensor) -> None:
        """Fast check at r_best: reject for one query, or search below min(r_best, r_max)."""
        rejected = rows[~adversarial]
        if rejected.numel():
            self.advance(rejected)
        passed = rows[adversarial]
        if passed.numel() == 0:
            return
        self.lo[passed] = 0.0
        self.hi[passed] = radius[adversarial]
        if self.probe:
            # A passing check within eps (eps at least the box width) is itself the answer; the others get the
            # eps probe.
            self.phase[passed[self.hi[passed] > self.r_eps]] = _PROBE
            self.finalize(passed[self.hi[passed] <= self.r_eps])
        else:
            self.start_search(passed)

    def after_probe(self, rows: Tensor, adversarial: Tensor) -> None:
        """Probe at eps: adversarial means broken; otherwise the boundary is beyond eps on this ray."""
        hit = rows[adversarial]
        self.hi[hit] = self.r_eps
        self.finalize(hit)
        missed = rows[~adversarial]
        self.lo[missed] = self.r_eps
        if missed.numel():
            self.start_search(missed)

    def after_search_step(self, rows: Tensor, mid: Tensor, adversarial: Tensor) -> None:
        """One binary-search step: the middle becomes the bracket's adversarial or benign end."""
        self.hi[rows[adversarial]] = mid[adversarial]
        self.lo[rows[~adversarial]] = mid[~adversarial]
        self.finalize(rows[self.hi[rows] - self.lo[rows] <= self.tol])


def average_boundary_distance(result: AttackResult) -> float:
    """ADBD of a RayS result: mean Linf distance of the boundary points found, over correctly classified examples.

    Misclassified examples (distance 0) are excluded, as the paper intends. An example for which no boundary was
    found within its budget has distance ``inf``, and so makes the average ``inf``. NaN if no example was
    classified correctly.
    """
    if "boundary_distance" not in result.extras or "clean_correct" not in result.extras:
        raise ValueError("average_boundary_distance needs a RayS result (extras boundary_distance, clean_correct)")
    distance = result.extras["boundary_distance"]
    correct = result.extras["clean_correct"]
    if not bool(correct.any()):
        return math.nan
    return float(distance[correct].mean())
