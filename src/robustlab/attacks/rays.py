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
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks.base import Attack, AttackConfig, AttackResult, positive
from robustlab.attacks.registry import register_attack
from robustlab.errors import ConfigError
from robustlab.goals import Goal
from robustlab.oracles import Access, LabelOracle
from robustlab.threat import Norm, ThreatModel

__all__ = ["RayS", "RaySConfig", "average_boundary_distance"]

MODES = ("eps", "adbd")
STARTS = ("box", "ones")

# Phases of the per-example state machine.
_CLEAN, _CHECK, _PROBE, _SEARCH, _DONE = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class RaySConfig(AttackConfig):
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

    queries: int = 10000
    mode: str = "eps"
    tol: float | None = None
    eps_probe: bool = True
    max_radius: float | None = None
    start: str = "box"

    def validate(self) -> None:
        positive("queries", self.queries, integer=True)
        if self.mode not in MODES:
            raise ConfigError(f"unknown RayS mode {self.mode!r}: choose 'eps' (robust accuracy) or 'adbd'")
        positive("tol", self.tol, allow_none=True)
        if self.start not in STARTS:
            raise ConfigError(
                f"unknown RayS start {self.start!r}: choose 'box' (toward the farther box face) or 'ones'"
            )
        positive("max_radius", self.max_radius, allow_none=True)
        if not isinstance(self.eps_probe, bool):
            raise ConfigError(f"eps_probe must be True or False, got {self.eps_probe!r}")


@register_attack
class RayS(Attack[LabelOracle]):
    """RayS (Chen & Gu, KDD 2020): hard-label Linf ray search over sign directions, batched, eps or ADBD mode."""

    name = "rays"
    access = Access.LABELS
    norms = frozenset({Norm.LINF})
    Config = RaySConfig
    config: RaySConfig
    supports_targeted = False

    def _perturb(
        self, oracle: LabelOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        cfg = self.config
        n = int(x.shape[0])
        dim = int(x[0].numel())
        device = x.device
        width = cfg.max_radius if cfg.max_radius is not None else threat.upper - threat.lower
        if not math.isfinite(width):
            raise ConfigError(
                "RayS starts its search at the box corner; with an unbounded box give max_radius (the Linf radius "
                "of the first search point)"
            )
        root = math.sqrt(dim)
        r_max = root * width
        r_eps = root * threat.eps
        stop_at_eps = cfg.mode == "eps"
        probe = stop_at_eps and cfg.eps_probe
        tol = cfg.tol if cfg.tol is not None else (r_eps / 100 if stop_at_eps else 1e-3)
        max_level = (dim - 1).bit_length()  # from this stage on every block is one coordinate
        low_ball, high_ball = threat.linf_bounds(x)
        flat_x = x.reshape(n, dim)

        def ray_point(rows: Tensor, direction: Tensor, radius: Tensor) -> Tensor:
            """``x + radius / sqrt(n) * direction`` in the box; rows with radius <= r_eps also in the ball."""
            step = (radius / root).to(x.dtype)[:, None]
            point = (flat_x[rows] + step * direction).clamp(threat.lower, threat.upper)
            inside = (radius <= r_eps)[:, None]
            ball = point.clamp(low_ball.reshape(n, dim)[rows], high_ball.reshape(n, dim)[rows])
            return torch.where(inside, ball, point)

        coordinate = torch.arange(dim, device=device)

        def candidate(rows: Tensor) -> Tensor:
            """``d_best`` of ``rows`` with the signs of their current block flipped (stage -1: the box start)."""
            lvl, blk = level[rows], block[rows]
            stage = lvl.clamp(min=0)
            size = (dim + (1 << stage) - 1) >> stage  # ceil(dim / 2^stage)
            start = blk * size
            end = torch.clamp(start + size, max=dim)
            inside = (coordinate >= start[:, None]) & (coordinate < end[:, None])
            best = sign_best[rows]
            flipped = torch.where(inside, -best, best)
            if box_start is None:
                return flipped
            return torch.where((lvl < 0)[:, None], box_start[rows], flipped)

        def advance(rows: Tensor) -> None:
            """Move ``rows`` to the next block (and stage) and start its fast check."""
            lvl, blk = level[rows], block[rows]
            stage = lvl.clamp(min=0)
            size = (dim + (1 << stage) - 1) >> stage
            wrap = ((blk + 1) * size >= dim) | (lvl < 0)
            level[rows] = torch.where(wrap, torch.clamp(lvl + 1, max=max_level), lvl)
            block[rows] = torch.where(wrap, torch.zeros_like(blk), blk + 1)
            direction[rows] = candidate(rows)
            phase[rows] = _CHECK

        def accept(rows: Tensor) -> None:
            """Keep the candidates of ``rows`` whose adversarial end ``hi`` improves ``r_best``."""
            better = rows[hi[rows] < r_best[rows]]
            if better.numel() == 0:
                return
            r_best[better] = hi[better]
            sign_best[better] = direction[better]
            best_point[better] = ray_point(better, direction[better], hi[better])
            # Within eps by construction (clamped to the ball), or because clipping to the box pulled it inside.
            near = threat.distance(best_point[better], flat_x[better]) <= threat.eps
            within[better] = (hi[better] <= r_eps) | near
            fresh = better[within[better] & (success_queries[better] < 0)]
            success_queries[fresh] = oracle.queries[fresh]

        def finalize(rows: Tensor) -> None:
            """End the DBR search of ``rows``: keep an improving candidate, then stop or move on."""
            if rows.numel() == 0:
                return
            accept(rows)
            if stop_at_eps:
                finished = within[rows]
                phase[rows[finished]] = _DONE
                rows = rows[~finished]
            if rows.numel():
                advance(rows)

        def start_search(rows: Tensor) -> None:
            """Binary search where it is still wider than the tolerance; finalize the rest at once."""
            phase[rows] = _SEARCH
            finalize(rows[hi[rows] - lo[rows] <= tol])

        float64 = torch.float64
        sign_best = torch.ones((n, dim), dtype=x.dtype, device=device)
        box_start: Tensor | None = None
        if cfg.start == "box" and math.isfinite(threat.lower) and math.isfinite(threat.upper):
            middle = (threat.lower + threat.upper) / 2
            box_start = torch.where(flat_x > middle, -sign_best, sign_best)
        direction = torch.zeros_like(sign_best)
        level = torch.full((n,), 0 if box_start is None else -1, dtype=torch.long, device=device)
        block = torch.zeros(n, dtype=torch.long, device=device)
        r_best = torch.full((n,), math.inf, dtype=float64, device=device)
        lo = torch.zeros(n, dtype=float64, device=device)
        hi = torch.zeros(n, dtype=float64, device=device)
        phase = torch.full((n,), _CLEAN, dtype=torch.long, device=device)
        best_point = flat_x.clone()
        clean_correct = torch.ones(n, dtype=torch.bool, device=device)
        success_queries = torch.full((n,), -1, dtype=torch.long, device=device)
        within = torch.zeros(n, dtype=torch.bool, device=device)  # the best point is within eps

        while True:
            remaining = torch.minimum(oracle.remaining(), cfg.queries - oracle.queries)
            live = (phase != _DONE) & (remaining > 0)
            rows = live.nonzero().flatten()
            if rows.numel() == 0:
                break
            stage = phase[rows]
            radius = torch.where(
                stage == _CHECK,
                torch.clamp(r_best[rows], max=r_max),
                torch.where(stage == _PROBE, torch.full_like(lo[rows], r_eps), (lo[rows] + hi[rows]) / 2),
            )
            points = torch.where((stage == _CLEAN)[:, None], flat_x[rows], ray_point(rows, direction[rows], radius))
            adversarial = goal.subset(rows).is_success(oracle.labels(points.reshape((-1, *x.shape[1:])), rows))

            # Clean check: a misclassified example is done at distance 0.
            first = stage == _CLEAN
            wrong = rows[first & adversarial]
            clean_correct[wrong] = False
            r_best[wrong] = 0.0
            within[wrong] = True
            phase[wrong] = _DONE
            success_queries[wrong] = oracle.queries[wrong]
            right = rows[first & ~adversarial]
            if right.numel():
                direction[right] = candidate(right)
                phase[right] = _CHECK

            # Fast check at r_best: reject for one query, or search below min(r_best, r_max).
            checked = stage == _CHECK
            rejected = rows[checked & ~adversarial]
            if rejected.numel():
                advance(rejected)
            passed = rows[checked & adversarial]
            if passed.numel():
                lo[passed] = 0.0
                hi[passed] = radius[checked & adversarial]
                if probe:
                    # A passing check within eps (eps at least the box width) is itself the answer; the others
                    # get the eps probe.
                    phase[passed[hi[passed] > r_eps]] = _PROBE
                    finalize(passed[hi[passed] <= r_eps])
                else:
                    start_search(passed)

            # Probe at eps: adversarial means broken; otherwise the boundary is beyond eps on this ray.
            probed = stage == _PROBE
            hit = rows[probed & adversarial]
            hi[hit] = r_eps
            finalize(hit)
            missed = rows[probed & ~adversarial]
            lo[missed] = r_eps
            if missed.numel():
                start_search(missed)

            # Binary search step.
            searching = stage == _SEARCH
            step_rows = rows[searching]
            mid = radius[searching]
            step_adv = adversarial[searching]
            hi[step_rows[step_adv]] = mid[step_adv]
            lo[step_rows[~step_adv]] = mid[~step_adv]
            finalize(step_rows[hi[step_rows] - lo[step_rows] <= tol])

        # Budget spent in the middle of a search: its adversarial end was queried, keep it if it is better.
        accept(((phase == _SEARCH) | (phase == _PROBE)).nonzero().flatten())

        best = best_point.reshape(x.shape)
        found = torch.isfinite(r_best)
        distance = torch.where(found, threat.distance(best, x).to(float64), torch.full_like(r_best, math.inf))
        distance = torch.where(clean_correct, distance, torch.zeros_like(distance))
        x_adv = torch.where(within.reshape((-1,) + (1,) * (x.dim() - 1)), best, x)
        extras: dict[str, Any] = {
            "boundary_distance": distance,
            "clean_correct": clean_correct,
            "success_queries": success_queries,
        }
        return x_adv, extras


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
