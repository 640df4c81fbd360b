"""Square Attack: random search with square-shaped updates (score-based black box), linf, l2 and l1.

Andriushchenko, Croce, Flammarion, Hein. "Square Attack: a query-efficient black-box adversarial attack via random
search", ECCV 2020 (reference code: ``max-andr/square-attack``, ``attack.py``; the same algorithm in
``fra31/auto-attack``, ``autoattack/square.py``). No gradient estimate: each iteration proposes one random change
of the current best point and keeps it if the loss improves, so every query is both a probe and a success check.

linf: start at vertical stripes ``x + eps * s_w`` (one random sign per channel and column); each iteration picks a
square window of side ``round(sqrt(p * h * w))`` at a uniformly random position and sets it to ``x +- eps`` (one
random sign per channel), redrawing the signs while the proposal would not change the current point.

l2: start from a 5 x 5 grid of "pseudo-Gaussian" bumps with random signs, rescaled to norm eps; each iteration moves
the perturbation's mass from a second random window into the first one, which receives a fresh bump (odd side, at
least 3) plus its old content, with the norms of the reference (per channel), and rescales to norm eps.

l1 (Croce & Hein, "Mind the box", ICML 2021; the reference's ``L1`` branch, which AutoAttack's l1 version runs): the
l2 scheme with l1 in place of l2 — bumps weighted ``1 / (k + 1)^4`` with unit l1 norm, window contents measured in
l1, the new window's mass ``c * ((eps - ||delta||_1) / c + window mass)`` for ``c`` channels (the reference's
formula) — and, instead of a rescaling, the exact projection onto the l1 ball intersected with the box.

The fraction ``p`` of pixels changed follows the reference's piecewise-constant schedule: ``p_init`` for the first
0.1% of the budget, then halved at 0.5%, 2%, 5%, 10%, 20%, 40%, 60% and 80% of it (the schedule is written for
10,000 queries and rescaled to the budget, as in the reference). The loss is the margin of the log-probabilities
(equal to the margin of the logits; ``"ce"`` for cross-entropy), minimized by the reference and maximized here with
the sign of the goal.

Queries per example: one at the initial point, then one per iteration. Differences from the reference: window
positions are uniform over all valid positions (the reference never picks the last row or column); each example
draws its own window position (the l2 reference shares one position across the batch) and its own bump
orientation.

Inputs must be images ``(n, c, h, w)`` or ``(n, h, w)``; a flat input ``(n, d)`` is treated as a one-row image
``(n, 1, 1, d)`` whose "squares" are segments. Extra trailing dimensions are folded into the width.

Example:
    >>> result = robustlab.attack(model, x, y, ThreatModel("linf", 0.3), method="square", queries=10_000)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks.base import Attack, AttackConfig
from robustlab.attacks.registry import register_attack
from robustlab.attacks.zo_engine import ScoreSearch
from robustlab.checks import check_choice, check_number, check_positive_int
from robustlab.goals import Goal
from robustlab.losses import attack_loss
from robustlab.oracles import Access, ScoreOracle
from robustlab.threat import Norm, ThreatModel
from robustlab.zeroth_order import ScoreObjective

__all__ = ["Square", "SquareConfig", "p_schedule"]

# Fractions of the 10,000-query schedule after which p is halved again (the reference's breakpoints).
_BREAKPOINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, iteration: int, span: int) -> float:
    """The reference's fraction of pixels changed at ``iteration`` (0-based) of a run spanning ``span`` queries."""
    it = int(iteration / span * 10000)
    halvings = sum(1 for b in _BREAKPOINTS if it > b)
    return p_init / 2**halvings


@dataclass(frozen=True)
class SquareConfig(AttackConfig):
    """Options of :class:`Square`.

    Attributes:
        queries: query budget per example, every query included (10000, the reference's).
        p_init: initial fraction of pixels changed per iteration, in (0, 1] (0.8: the paper's MNIST value and
            AutoAttack's default).
        loss: ``"margin"`` (the reference's) or ``"ce"``, on log-probabilities.
        schedule_queries: the budget the p schedule is stretched over; None: ``queries`` (the reference's
            rescaling).
    """

    queries: int = 10_000
    p_init: float = 0.8
    loss: str = "margin"
    schedule_queries: int | None = None

    def validate(self) -> None:
        check_positive_int("queries (the budget per example)", self.queries)
        check_positive_int("schedule_queries", self.schedule_queries, allow_none=True)
        check_number("p_init", self.p_init, low=0.0, high=1.0, low_open=True)
        check_choice("loss", self.loss, ("margin", "ce"))


def _as_images(x: Tensor) -> Tensor:
    """View a batch as ``(n, c, h, w)``."""
    n = x.shape[0]
    if x.dim() == 2:
        return x.reshape(n, 1, 1, x.shape[1])
    if x.dim() == 3:
        return x.reshape(n, 1, x.shape[1], x.shape[2])
    return x.reshape(n, x.shape[1], x.shape[2], -1)


def _window_sides(p: float, h: int, w: int, *, minimum: int, odd: bool, below_edge: bool) -> tuple[int, int]:
    """Sides of the update window covering a fraction ``p`` of the ``h x w`` pixels."""
    area = p * h * w
    if h == 1 or w == 1:  # a row or column: the window is a segment
        length = min(max(round(area), 1), max(h, w))
        return (1, length) if h == 1 else (length, 1)
    side = max(round(math.sqrt(area)), minimum)
    if odd and side % 2 == 0:
        side += 1
    cap = min(h, w) - 1 if below_edge else min(h, w)
    return min(side, max(cap, 1)), min(side, max(cap, 1))


def _window_masks(
    n: int, h: int, w: int, sides: tuple[int, int], generator: torch.Generator, device: torch.device
) -> Tensor:
    """``(n, 1, h, w)`` masks of one window per example at uniformly random valid positions."""
    sh, sw = sides
    top = torch.randint(0, h - sh + 1, (n, 1, 1, 1), generator=generator, device=device)
    left = torch.randint(0, w - sw + 1, (n, 1, 1, 1), generator=generator, device=device)
    rows = torch.arange(h, device=device).reshape(1, 1, h, 1)
    cols = torch.arange(w, device=device).reshape(1, 1, 1, w)
    return (rows >= top) & (rows < top + sh) & (cols >= left) & (cols < left + sw)


def _random_signs(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1


def _bump_rectangle(rows: int, cols: int, dtype: torch.dtype, device: torch.device, norm: Norm = Norm.L2) -> Tensor:
    """The reference's ``eta_rectangles``: nested centred rectangles weighted 1 / (k + 1)^2 (l2; 1 / (k + 1)^4 for
    l1), unit norm."""
    delta = torch.zeros((rows, cols), dtype=dtype, device=device)
    if rows == 0 or cols == 0:
        return delta
    power = 4 if norm is Norm.L1 else 2
    r, c = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        delta[max(r, 0) : min(r + 2 * k + 1, rows), max(c, 0) : min(c + 2 * k + 1, cols)] += 1.0 / (k + 1) ** power
        r, c = r - 1, c - 1
    return delta / _norm(delta, (0, 1), norm).clamp_min(1e-12)


@functools.lru_cache(maxsize=64)
def _bump(rows: int, cols: int, dtype: torch.dtype, device: torch.device, norm: Norm = Norm.L2) -> Tensor:
    """The reference's ``eta``: a positive bump over the top half, a negative one below, unit norm (l2 or l1)."""
    delta = torch.zeros((rows, cols), dtype=dtype, device=device)
    delta[: rows // 2] = _bump_rectangle(rows // 2, cols, dtype, device, norm)
    delta[rows // 2 :] = -_bump_rectangle(rows - rows // 2, cols, dtype, device, norm)
    return delta / _norm(delta, (0, 1), norm).clamp_min(1e-12)  # cached: never modified in place


def _norm(t: Tensor, dims: tuple[int, ...], norm: Norm = Norm.L2) -> Tensor:
    """The l2 norm (l1 when ``norm`` is l1) over ``dims``, kept as size-1 dimensions."""
    if norm is Norm.L1:
        return t.abs().sum(dim=dims, keepdim=True)
    return (t**2).sum(dim=dims, keepdim=True).sqrt()


@register_attack
class Square(Attack[ScoreOracle]):
    """Square Attack (Andriushchenko et al. 2020): random search with square updates at the ball's vertices."""

    name = "square"
    access = Access.SCORES
    norms = frozenset({Norm.LINF, Norm.L2, Norm.L1})
    Config = SquareConfig
    config: SquareConfig

    def _perturb(
        self, oracle: ScoreOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        c = self.config
        search = ScoreSearch(oracle, goal, ScoreObjective(attack_loss(c.loss), goal), c.queries, x)
        span = c.schedule_queries if c.schedule_queries is not None else c.queries
        n = x.shape[0]

        loss_best = torch.full((n,), -math.inf, dtype=x.dtype, device=x.device)
        x_best, active = self._begin(search, x, loss_best, threat, generator)

        iteration = 0
        while active.numel() > 0:
            active = search.affordable(active, 1)
            if active.numel() == 0:
                break
            x_rows = x[active]
            proposal = self._proposal(x_rows, x_best[active], p_schedule(c.p_init, iteration, span), threat, generator)
            proposal = threat.project(proposal.reshape(x_rows.shape), x_rows)
            success, loss = search.evaluate(proposal, active)
            loss = loss.to(x.dtype)
            accept = (loss > loss_best[active]) | success
            accepted = active[accept]
            x_best[accepted] = proposal[accept]
            loss_best[accepted] = loss[accept]
            active = search.record(proposal, active, success, loss, iteration + 1)
            iteration += 1
        return search.best.x, {"iterations": search.iterations}

    def _begin(
        self, search: ScoreSearch, x: Tensor, loss: Tensor, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """The initial points, queried once each (their losses written to ``loss``), and the examples that go on."""
        start = self._start(_as_images(x), threat, generator)
        x_best = threat.project(start.reshape(x.shape), x)
        return x_best, search.start(x_best, loss)

    @classmethod
    def _start(cls, images: Tensor, threat: ThreatModel, generator: torch.Generator) -> Tensor:
        """The initial point of the norm's variant, as images."""
        if threat.norm is Norm.LINF:
            return cls._linf_start(images, threat, generator)
        return cls._bumps_start(images, threat, generator)

    @classmethod
    def _proposal(cls, x: Tensor, current: Tensor, p: float, threat: ThreatModel, generator: torch.Generator) -> Tensor:
        """One random change of ``current`` (the examples' best points) in the norm's variant, as images."""
        if threat.norm is Norm.LINF:
            return cls._linf_proposal(_as_images(x), _as_images(current), p, threat, generator)
        return cls._bumps_proposal(_as_images(x), _as_images(current), p, threat, generator)

    # -------------------------------------------------------------------- linf
    @staticmethod
    def _linf_start(images: Tensor, threat: ThreatModel, generator: torch.Generator) -> Tensor:
        n, ch, _, w = images.shape
        stripes = threat.eps * _random_signs((n, ch, 1, w), generator, images)
        return threat.clip_to_box(images + stripes)

    @staticmethod
    def _linf_proposal(x: Tensor, current: Tensor, p: float, threat: ThreatModel, generator: torch.Generator) -> Tensor:
        n, ch, h, w = x.shape
        sides = _window_sides(p, h, w, minimum=1, odd=False, below_edge=True)
        mask = _window_masks(n, h, w, sides, generator, x.device)
        signs = _random_signs((n, ch, 1, 1), generator, x)
        proposal = threat.clip_to_box(torch.where(mask, x + threat.eps * signs, current))
        # Redraw the signs of examples whose proposal would not change their current point (no wasted query).
        for _ in range(100):
            unchanged = ((proposal - current).abs() < 1e-7).reshape(n, -1).all(dim=1)
            if not bool(unchanged.any()):
                break
            fresh = _random_signs((n, ch, 1, 1), generator, x)
            signs = torch.where(unchanged[:, None, None, None], fresh, signs)
            proposal = threat.clip_to_box(torch.where(mask, x + threat.eps * signs, current))
        return proposal

    # ----------------------------------------------------------------- l2 and l1
    @staticmethod
    def _bumps_start(images: Tensor, threat: ThreatModel, generator: torch.Generator) -> Tensor:
        """A 5 x 5 grid of bumps with random signs: rescaled to norm eps (l2), or left to the projection onto the
        l1 ball and box that follows (l1, as the reference)."""
        n, ch, h, w = images.shape
        side = max(min(h, w) // 5, 1)
        tiles_h, tiles_w = min(5, h // side), min(5, w // side)
        top0, left0 = (h - side * tiles_h) // 2, (w - side * tiles_w) // 2
        bump = _bump(side, side, images.dtype, images.device, threat.norm)
        delta = torch.zeros_like(images)
        for i in range(tiles_h):
            for j in range(tiles_w):
                top, left = top0 + i * side, left0 + j * side
                signs = _random_signs((n, ch, 1, 1), generator, images)
                delta[:, :, top : top + side, left : left + side] += bump * signs
        if threat.norm is Norm.L1:
            return images + delta
        delta = delta / _norm(delta, (1, 2, 3)).clamp_min(1e-12) * threat.eps
        return threat.clip_to_box(images + delta)

    @staticmethod
    def _bumps_proposal(
        x: Tensor, current: Tensor, p: float, threat: ThreatModel, generator: torch.Generator
    ) -> Tensor:
        """Move the mass of a second window into the first, which gets a fresh bump plus its old content (norms in
        l2 or l1: module docstring)."""
        n, ch, h, w = x.shape
        norm = threat.norm
        sh, sw = _window_sides(p, h, w, minimum=3, odd=True, below_edge=False)
        first = _window_masks(n, h, w, (sh, sw), generator, x.device)
        second = _window_masks(n, h, w, (sh, sw), generator, x.device)
        delta = current - x
        full = first.expand(n, ch, h, w)
        old = delta[full].reshape(n, ch, sh, sw)
        norm_first = _norm(old, (2, 3), norm)
        norm_image = _norm(delta, (1, 2, 3), norm)
        norm_windows = _norm(delta * (first | second), (2, 3), norm)

        bump = _bump(sh, sw, x.dtype, x.device, norm)
        if sh == sw:
            transpose = torch.rand((n, 1, 1, 1), generator=generator, device=x.device) > 0.5
            bumps = torch.where(transpose, bump.T, bump).expand(n, ch, sh, sw)
        else:
            bumps = bump.expand(n, ch, sh, sw)
        new = bumps * _random_signs((n, ch, 1, 1), generator, x) + old / (1e-10 + norm_first)
        if norm is Norm.L1:  # the reference's mass per channel, multiplied by the channel count as it is there
            target_norm = ((threat.eps - norm_image).clamp_min(0) / ch + norm_windows) * ch
        else:
            target_norm = ((threat.eps**2 - norm_image**2).clamp_min(0) / ch + norm_windows**2).sqrt()
        new = new / _norm(new, (2, 3), norm).clamp_min(1e-12) * target_norm

        delta = delta.masked_fill(second, 0.0)
        delta = delta.masked_scatter(full, new.contiguous())
        if norm is Norm.L1:
            return x + delta  # projected onto the l1 ball and the box by the caller
        delta = delta / _norm(delta, (1, 2, 3)).clamp_min(1e-12) * threat.eps
        return threat.clip_to_box(x + delta)
