"""FAB, the Fast Adaptive Boundary attack, and FAB-T, its targeted version in AutoAttack; linf, l2 and l1.

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary attack", ICML 2020
(reference code: ``fra31/auto-attack``, ``autoattack/fab_base.py``, ``fab_pt.py``, ``fab_projections.py``). FAB
looks for the smallest perturbation that changes the prediction. Each iteration linearizes the model at the
current point ``x_k`` and takes the decision boundary nearest to it:

- untargeted: of the hyperplanes ``f_j - f_y = 0`` (all ``j != y``), the nearest (one gradient per class and
  iteration);
- FAB-T (``"fab-t"``, untargeted overall): the hyperplane ``f_t - f_y = 0`` of a target class ``t``, for each of
  the ``n_target_classes`` classes ranked highest by the clean logits; one gradient per iteration;
- an explicit target ``t`` (``targets=``): ``f_t - max_{j != t} f_j = 0``, the constraint the target violates most.
  It reaches the target, but the target's region is an intersection of half-spaces, and this is a heuristic for
  it: the distances are minimal for two classes, not in general (the reference has no explicit-target mode).

It then projects both ``x_k`` and the clean ``x`` onto that hyperplane *inside the input box*, with the smallest
perturbation in the norm (:func:`boundary_projection`: exact, by sorting; when the box cannot reach the hyperplane,
the box corner nearest to it), and moves to ``(1 - a) (x_k + eta d_k) + a (x + eta d_0)`` with
``a = min(|d_k| / (|d_k| + |d_0|), alpha_max)`` (extrapolating by ``eta`` to cross the boundary, biased toward the
clean input by ``a``), clipped to the box. An iterate that is adversarial is recorded if it is the nearest so far
and pulled back toward the clean input, ``x + beta (x_k - x)``. The first run starts at the clean input, every
further restart at a random point at half the radius ``min(best so far, eps)``: ``eps / 2`` for every example an
evaluation still attacks (the reference's radius; its ``min`` takes the new run's empty record, so it is always
``eps / 2``), and half the smallest perturbation found so far in a search without eps.

Defaults are the reference's and standard AutoAttack's: 100 iterations, ``alpha_max = 0.1``, ``eta = 1.05``,
``beta = 0.9``, 1 restart; FAB-T with 9 target classes. An example counts as broken when the smallest perturbation
found is within the threat model's eps (see :mod:`robustlab.attacks.minimum_norm` for the minimum-norm view). On a
linear model these defaults settle about 0.5% beyond the boundary (the pull-back by ``beta`` and the extrapolation
by ``eta`` balance there): FAB's distances are that close to minimal, not closer.

Differences from the reference, on purpose: untargeted FAB measures a hyperplane's distance by the smallest step
reaching it inside the box (the reference's ``|f_j - f_y| / ||grad (f_j - f_y)||_*``, ``*`` the dual norm, ignores
the box, and picks a hyperplane the box keeps far, above all in l1); the box is the threat model's, not [0, 1]; the
projections are exact sort-based solutions rather than the reference's bisection (same minimizers, except where
rounding misleads the reference's l2 bisection: :func:`reference_l2_projection` reproduces it, chosen by
``projection="reference"``, as ``--suite autoattack`` does); an untargeted
iteration takes its per-class gradients as one batched forward and backward pass over copies of the inputs (counted
as one gradient evaluation per class and example); examples already meeting the goal are recorded at distance 0
and not attacked; with ``early_stop`` an example leaves once it is broken within eps (the reference only skips it
at the next restart: the outcome is the same).

Example:
    >>> result = robustlab.attack(model, x, y, ThreatModel("linf", 0.3), method="fab-t")
    >>> smallest = robustlab.minimum_norm(model, x, y, "l2", method="fab", restarts=3).distance
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks.minimum_norm import MinimumNormAttack, MinimumNormConfig, SmallestAdversarial
from robustlab.attacks.registry import register_attack
from robustlab.checks import check_number, check_positive_int
from robustlab.errors import ConfigError
from robustlab.goals import Goal
from robustlab.losses import margin_loss
from robustlab.oracles import GradientOracle
from robustlab.threat import Norm, ThreatModel
from robustlab.utils import rows_like

__all__ = ["FAB", "FABConfig", "FABTargeted", "FABTargetedConfig", "boundary_projection", "reference_l2_projection"]

PROJECTIONS = ("exact", "reference")
ROWS_PER_CALL = 4096  # an untargeted iteration batches its per-class copies up to this many rows per call

# The linearized boundary at a point: per row, the value of a function whose zero set is the boundary, and its
# input gradient.
Boundary = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
# A step onto a linearized boundary: (w, target, lower, upper, norm) -> d (see boundary_projection).
Projection = Callable[[Tensor, Tensor, Tensor, Tensor, Norm], Tensor]


@dataclass(frozen=True)
class FABConfig(MinimumNormConfig):
    """Options of :class:`FAB`. Defaults are the reference's.

    Attributes:
        steps: iterations per run (100).
        restarts: runs per example (1); the first starts at the clean input, the others at random points.
        alpha_max: the largest weight of the step from the clean input (0.1).
        eta: extrapolation beyond the linearized boundary (1.05).
        beta: how far an adversarial iterate is pulled back toward the clean input (0.9).
        projection: ``"exact"`` (default) or ``"reference"``: the reference code's l2 projection arithmetic, for
            ``--suite autoattack`` (see :func:`reference_l2_projection`; linf and l1 are exact either way).
        early_stop: see :class:`~robustlab.attacks.minimum_norm.MinimumNormConfig`.
    """

    steps: int = 100
    restarts: int = 1
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    projection: str = "exact"

    def validate(self) -> None:
        super().validate()
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {', '.join(PROJECTIONS)} (got {self.projection!r})")
        check_positive_int("steps", self.steps)
        check_positive_int("restarts", self.restarts)
        check_number("alpha_max", self.alpha_max, low=0.0, high=1.0)
        check_number("eta", self.eta, low=1.0)
        check_number("beta", self.beta, low=0.0, high=1.0, low_open=True, high_open=True)


@dataclass(frozen=True)
class FABTargetedConfig(FABConfig):
    """Options of :class:`FABTargeted` (FAB-T): those of :class:`FABConfig` and ``n_target_classes`` (9), the
    number of classes ranked highest by the clean logits to take as targets in turn (capped at classes - 1)."""

    n_target_classes: int = 9

    def validate(self) -> None:
        super().validate()
        check_positive_int("n_target_classes", self.n_target_classes)


# ------------------------------------------------------------------------------------------------ projection
def boundary_projection(w: Tensor, target: Tensor, lower: Tensor, upper: Tensor, norm: Norm) -> Tensor:
    """Per row, the perturbation ``d`` of smallest ``norm`` with ``<w, d> = target`` and ``lower <= d <= upper``.

    ``lower <= 0 <= upper`` elementwise (the box around the current point). Moving coordinate ``i`` by ``e_i >= 0``
    in the direction of ``sign(target) * w_i`` gains ``|w_i| e_i``, up to ``e_i <= cap_i`` (the room left in the box
    on that side), and the gains must add up to ``|target|``:

    - l1: a fractional knapsack: fill coordinates by decreasing ``|w_i|``;
    - linf: ``e_i = min(r, cap_i)`` with the smallest ``r`` that gains enough;
    - l2: ``e_i = min(lam |w_i|, cap_i)`` (the KKT conditions), with the smallest such ``lam``.

    The gain of the last two is piecewise linear and increasing in ``r`` (``lam``), with kinks where a coordinate
    saturates: sorting the kinks gives the segment and the exact value. When even the whole box cannot gain enough,
    every coordinate moves to its cap (the corner nearest the hyperplane). Rows are flat ``(n, d)``.
    """
    if norm is Norm.L0:
        raise ConfigError("FAB minimizes linf, l2 or l1 distances, not l0")
    need = target.abs()
    oriented = w * torch.where(target >= 0, 1.0, -1.0).to(w.dtype)[:, None]
    weight = oriented.abs()
    moves = weight > 0
    cap = torch.where(moves, torch.where(oriented > 0, upper, -lower).clamp_min(0), torch.zeros_like(weight))
    if norm is Norm.L1:
        amount = _fill_by_weight(weight, cap, need)
    else:
        rate = torch.ones_like(weight) if norm is Norm.LINF else weight
        amount = _fill_by_level(weight, rate, cap, need) * moves
    return oriented.sign() * amount


def _fill_by_weight(weight: Tensor, cap: Tensor, need: Tensor) -> Tensor:
    """l1: take whole caps by decreasing weight until the gain reaches ``need``; the last one partly."""
    order = weight.argsort(dim=1, descending=True)
    w_sorted, cap_sorted = weight.gather(1, order), cap.gather(1, order)
    gain = w_sorted * cap_sorted
    reached = gain.cumsum(dim=1)
    before = reached - gain
    partial = (need[:, None] - before) / w_sorted.clamp_min(torch.finfo(weight.dtype).tiny)
    need_col = need[:, None]
    sorted_amount = torch.where(
        reached <= need_col, cap_sorted, torch.where(before < need_col, partial.clamp(min=0), torch.zeros_like(gain))
    )
    return torch.zeros_like(weight).scatter(1, order, torch.minimum(sorted_amount, cap_sorted))


def _fill_by_level(weight: Tensor, rate: Tensor, cap: Tensor, need: Tensor) -> Tensor:
    """linf (rate 1) and l2 (rate |w|): ``e_i = min(level * rate_i, cap_i)`` with the level that gains ``need``."""
    positive = rate > 0
    safe_rate = torch.where(positive, rate, torch.ones_like(rate))
    kink = torch.where(positive, cap / safe_rate, torch.full_like(cap, math.inf))
    kink_sorted, order = kink.sort(dim=1)
    saturated_gain = (weight * cap).gather(1, order).cumsum(dim=1)
    slope = (weight * rate).gather(1, order)
    # The slope left after each kink as a suffix sum: never negative. (A total minus a running sum can be, by
    # rounding, and times a huge kink, a coordinate of tiny weight, that broke the search for the segment.)
    suffix = slope.flip(1).cumsum(dim=1).flip(1)
    zero = torch.zeros_like(saturated_gain[:, :1])
    slope_after = torch.cat([suffix[:, 1:], zero], dim=1)
    finite = torch.isfinite(kink_sorted)
    gain_at_kink = torch.where(
        finite, saturated_gain + torch.where(finite, kink_sorted, torch.zeros_like(kink_sorted)) * slope_after, math.inf
    )
    gain_at_kink = gain_at_kink.cummax(dim=1).values  # increasing in exact arithmetic; rounding must not break that
    count = (gain_at_kink < need[:, None]).sum(dim=1, keepdim=True)
    gain_before = torch.cat([zero, saturated_gain], dim=1).gather(1, count)
    slope_from = torch.cat([suffix[:, :1], slope_after], dim=1).gather(1, count)
    feasible = slope_from > 0  # else even the whole box gains too little: every coordinate goes to its cap
    safe_slope = torch.where(feasible, slope_from, torch.ones_like(slope_from))
    level = ((need[:, None] - gain_before) / safe_slope).clamp_min(0)
    return torch.where(feasible, torch.minimum(level * rate, cap), cap)


FROZEN_WEIGHT = 1e-8  # the reference code never moves a coordinate whose |w| is below this
KINK_SENTINEL = 1e12  # and gives it this kink, which also caps every other kink


def reference_l2_projection(w: Tensor, target: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """The l2 step of :func:`boundary_projection` computed as the reference code computes it (``projection_l2`` in
    ``fra31/auto-attack``, ``autoattack/fab_projections.py``), for ``--suite autoattack``.

    Same problem, ``e_i = min(lam |w_i|, cap_i)``, solved by a bisection over the sorted kinks ``cap_i / |w_i|``,
    with two numerical choices that matter on images: a coordinate with ``|w_i| < 1e-8`` never moves and its kink,
    a sentinel, counts as 0 once sorted; and the slope after each kink is ``||w||^2`` minus a running sum in the
    input's precision. Near a saturated box (pixels at 0 or 1, tiny gradient entries, kinks up to ``1e8``) that
    slope's rounding error (about ``1e-7 ||w||^2``) times the kink gaps makes the cumulative gain non-monotone;
    the bisection, which assumes it monotone, can then land on a wrong segment and the step goes past the
    hyperplane, sometimes far. Where the gain is monotone this is the exact step. On nonlinear models such long
    steps cross boundaries that the exact step approaches without crossing, and the published AutoAttack numbers
    include them (on robustlab's PGD-AT SmallCNN at l2 eps 2 they account for the reference's lead over exact
    FAB-T; docs/benchmarks.md, "autoattack_parity"). The reference's linf and l1 projections agree with the exact
    ones, so only l2 has this twin. Rows are flat ``(n, d)``; the box is ``lower <= d <= upper`` as above.
    """
    need = target.abs()[:, None]
    oriented = w * torch.where(target >= 0, 1.0, -1.0).to(w.dtype)[:, None]
    weight = oriented.abs()
    frozen = weight < FROZEN_WEIGHT
    cap = torch.where(oriented > 0, upper, -lower).clamp_min(0)
    kink = torch.where(frozen, KINK_SENTINEL, (cap / weight.clamp_min(FROZEN_WEIGHT)).clamp_max(KINK_SENTINEL))
    sorted_kink, order = kink.sort(dim=1)
    squares = (oriented**2).gather(1, order)
    total = squares.sum(dim=1, keepdim=True)
    slope_after = total - squares.cumsum(dim=1)  # the reference's rounding, on purpose
    following = torch.nn.functional.pad(sorted_kink[:, 1:], (0, 1))
    at, following = (k.masked_fill(k == KINK_SENTINEL, 0) for k in (sorted_kink, following))
    start = -total * at[:, :1]
    # Minus the gain at each sorted kink (index j: the level at kink j; one more entry than kinks).
    minus_gain = torch.cat([start, ((at - following) * slope_after).cumsum(dim=1) + start], dim=1)
    saturated = torch.where(frozen, torch.zeros_like(kink), kink * weight)
    before_first_kink = (minus_gain[:, :1] + need < 0)[:, 0]
    box_too_small = (need[:, 0] - (saturated * weight).sum(dim=1)) > 0
    low = torch.zeros_like(need, dtype=torch.long)
    high = torch.full_like(low, w.shape[1] - 1)
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        middle = (low + high) // 2
        short = minus_gain.gather(1, middle) + need > 0
        low, high = torch.where(short, middle, low), torch.where(short, high, middle)
    slope = slope_after.gather(1, low)
    level = (minus_gain.gather(1, low) + need) / torch.where(slope == 0, 1.0, slope) + at.gather(1, low)
    level = torch.where(slope == 0, 0.0, level)
    amount = torch.where(level > kink, saturated, level * weight)
    amount = torch.where(box_too_small[:, None], saturated, amount)
    amount = torch.where(before_first_kink[:, None], need / total * weight, amount)
    return oriented.sign() * amount * (weight > FROZEN_WEIGHT)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _norm_of(d: Tensor, norm: Norm) -> Tensor:
    if norm is Norm.LINF:
        return d.abs().amax(dim=1)
    if norm is Norm.L2:
        return d.norm(dim=1)
    return d.abs().sum(dim=1)


# --------------------------------------------------------------------------------------------- boundaries
def _difference(logits: Tensor, goal: Goal) -> Tensor:
    """``f_target - f_label`` per row (the goal carries one label and one class per row)."""
    assert goal.targets is not None
    return logits.gather(1, goal.targets[:, None])[:, 0] - logits.gather(1, goal.labels[:, None])[:, 0]


def _closest_class_boundary(oracle: GradientOracle, labels: Tensor, threat: ThreatModel) -> Boundary:
    """Untargeted FAB: of the boundaries ``f_j - f_y = 0``, the nearest in the linear approximation, measured by the
    smallest step reaching it inside the box."""

    def boundary(x1: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        num_classes = int(oracle.num_classes or 0)
        m = int(x1.shape[0])
        y = labels[index]
        values, grads = [], []
        per_call = max(1, ROWS_PER_CALL // max(m, 1))
        for first in range(0, num_classes, per_call):
            classes = torch.arange(first, min(first + per_call, num_classes), device=x1.device)
            k = int(classes.numel())
            copies = x1.repeat((k,) + (1,) * (x1.dim() - 1))
            goal = Goal(y.repeat(k), classes.repeat_interleave(m))
            value, _, grad = oracle.loss_and_grad(copies, goal, _difference, index.repeat(k))
            values.append(value.reshape(k, m).T)
            grads.append(_flat(grad).reshape(k, m, -1).transpose(0, 1))
        difference, gradient = torch.cat(values, dim=1), torch.cat(grads, dim=1)
        point = _flat(x1).repeat_interleave(num_classes, dim=0)
        step = boundary_projection(
            gradient.reshape(m * num_classes, -1), -difference.reshape(-1), threat.lower - point, threat.upper - point,
            threat.norm,
        )  # fmt: skip
        distance = _norm_of(step, threat.norm).reshape(m, num_classes)
        distance = distance.scatter(1, y[:, None], math.inf)  # the label's own "boundary" is not one
        nearest = distance.argmin(dim=1)
        rows = torch.arange(m, device=x1.device)
        return difference[rows, nearest], gradient[rows, nearest]

    return boundary


def _goal_boundary(oracle: GradientOracle, goal: Goal, loss: Callable[[Tensor, Goal], Tensor]) -> Boundary:
    """A boundary given by one function of the logits and a goal (FAB-T's ``f_t - f_y``, or the targeted margin)."""

    def boundary(x1: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        value, _, grad = oracle.loss_and_grad(x1, goal.subset(index), loss, index)
        return value, _flat(grad)

    return boundary


# ------------------------------------------------------------------------------------------------- attacks
class _FABBase(MinimumNormAttack):
    norms = frozenset({Norm.LINF, Norm.L2, Norm.L1})
    config: FABConfig

    def _run(
        self,
        oracle: GradientOracle,
        index: Tensor,
        boundary: Boundary,
        success_goal: Goal,
        threat: ThreatModel,
        generator: torch.Generator,
        record: SmallestAdversarial,
        random_start: bool,
    ) -> None:
        """One FAB run on the examples ``index``; ``success_goal`` (whole batch) says what counts as adversarial."""
        config, norm = self.config, threat.norm
        project: Projection = boundary_projection
        if config.projection == "reference" and norm is Norm.L2:
            project = _reference_l2_step
        x0 = record.x[index]
        x1 = x0.clone()
        if random_start:
            radius = torch.minimum(record.distance[index], torch.full_like(record.distance[index], threat.eps))
            x1 = threat.clip_to_box(x0 + _random_direction(x0, norm, generator) * rows_like(radius / 2, x0))
        for _ in range(config.steps):
            difference, gradient = boundary(x1, index)
            x1_flat, x0_flat = _flat(x1), _flat(x0)
            lower, upper = threat.lower, threat.upper
            d1 = project(gradient, -difference, lower - x1_flat, upper - x1_flat, norm)
            offset = difference + (gradient * (x0_flat - x1_flat)).sum(dim=1)
            d0 = project(gradient, -offset, lower - x0_flat, upper - x0_flat, norm)
            size1, size0 = _norm_of(d1, norm).clamp_min(1e-8), _norm_of(d0, norm).clamp_min(1e-8)
            alpha = (size1 / (size1 + size0)).clamp(0.0, config.alpha_max)[:, None]
            moved = (x1_flat + config.eta * d1) * (1 - alpha) + (x0_flat + config.eta * d0) * alpha
            x1 = threat.clip_to_box(moved.reshape(x0.shape))
            success = success_goal.subset(index).is_success(oracle.logits(x1, index))
            record.offer(x1, success, index)
            x1 = torch.where(rows_like(success, x1), x0 + config.beta * (x1 - x0), x1)
            leave = self._stops(record, index)
            if bool(leave.any()):
                keep = ~leave
                if not bool(keep.any()):
                    return
                index, x0, x1 = index[keep], x0[keep], x1[keep]

    def _pending(self, record: SmallestAdversarial, clean_success: Tensor) -> Tensor:
        """Examples a run still attacks: not meeting the goal unperturbed, and not stopped early."""
        everyone = torch.arange(record.x.shape[0], device=record.x.device)
        return everyone[~clean_success & ~self._stops(record, everyone)]

    def _start(self, oracle: GradientOracle, goal: Goal, record: SmallestAdversarial) -> tuple[Tensor, Tensor]:
        """Clean logits; examples already meeting the goal are recorded at distance 0."""
        everyone = torch.arange(record.x.shape[0], device=record.x.device)
        logits = oracle.logits(record.x, everyone)
        clean_success = goal.is_success(logits)
        record.offer(record.x, clean_success)
        return logits, clean_success


def _reference_l2_step(w: Tensor, target: Tensor, lower: Tensor, upper: Tensor, norm: Norm) -> Tensor:
    return reference_l2_projection(w, target, lower, upper)


def _random_direction(x: Tensor, norm: Norm, generator: torch.Generator) -> Tensor:
    """A random direction of unit norm, drawn as the reference: uniform signs-and-sizes for linf, Gaussian else."""
    if norm is Norm.LINF:
        t = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    else:
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    size = _norm_of(_flat(t), norm).clamp_min(1e-12)
    return t / rows_like(size, t)


@register_attack
class FAB(_FABBase):
    """FAB (Croce & Hein 2020): the nearest linearized decision boundary, projected onto within the box."""

    name = "fab"
    Config = FABConfig
    summary_line = "FAB: minimal-norm adversarial examples by projections onto linearized boundaries"

    def _search(
        self,
        oracle: GradientOracle,
        x: Tensor,
        goal: Goal,
        threat: ThreatModel,
        generator: torch.Generator,
        record: SmallestAdversarial,
    ) -> dict[str, Any]:
        if oracle.num_classes is None or oracle.num_classes < 2:
            raise ConfigError(f"FAB needs a model with at least 2 classes (got {oracle.num_classes})")
        _, clean_success = self._start(oracle, goal, record)
        if goal.targeted:
            boundary = _goal_boundary(oracle, goal, margin_loss)
        else:
            boundary = _closest_class_boundary(oracle, goal.labels, threat)
        for restart in range(self.config.restarts):
            index = self._pending(record, clean_success)
            if index.numel() == 0:
                break
            self._run(oracle, index, boundary, goal, threat, generator, record, random_start=restart > 0)
        return {"clean_success": clean_success}


@register_attack
class FABTargeted(_FABBase):
    """FAB-T (Croce & Hein 2020, AutoAttack): FAB toward each of the top classes in turn, untargeted success."""

    name = "fab-t"
    Config = FABTargetedConfig
    config: FABTargetedConfig
    supports_targeted = False
    summary_line = "FAB-T: FAB toward the most likely other classes in turn (AutoAttack's FAB)"

    def _search(
        self,
        oracle: GradientOracle,
        x: Tensor,
        goal: Goal,
        threat: ThreatModel,
        generator: torch.Generator,
        record: SmallestAdversarial,
    ) -> dict[str, Any]:
        num_classes = oracle.num_classes
        if num_classes is None or num_classes < 2:
            raise ConfigError(f"FAB-T needs a model with at least 2 classes (got {num_classes})")
        clean_logits, clean_success = self._start(oracle, goal, record)
        # Other classes by decreasing clean logit (the label is never a target).
        ranked = clean_logits.scatter(1, goal.labels[:, None], -math.inf).argsort(dim=1, descending=True, stable=True)
        for k in range(min(self.config.n_target_classes, num_classes - 1)):
            boundary = _goal_boundary(oracle, Goal(goal.labels, ranked[:, k]), _difference)
            for restart in range(self.config.restarts):
                index = self._pending(record, clean_success)
                if index.numel() == 0:
                    break
                self._run(oracle, index, boundary, goal, threat, generator, record, random_start=restart > 0)
        return {"clean_success": clean_success}
