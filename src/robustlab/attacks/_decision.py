"""What the decision-based (hard-label) attacks share: HopSkipJump, Sign-OPT and RayS.

These attacks see only the predicted label and measure, per example, how far the nearest adversarial point they
can find lies. :class:`DecisionAttack` owns what they do alike, once:

1. the options every one of them has (:class:`DecisionConfig`): a per-example query budget ``queries`` (the clean
   check included) and the ``mode``: ``"eps"`` stops an example once it has an adversarial point within eps
   (robust accuracy), ``"adbd"`` spends the whole budget measuring the decision-boundary distance;
2. the clean check: the first query of every example is its clean input, all of them in one batched call; a
   misclassified example is done at distance 0 (``clean_correct = False``);
3. the record (:class:`BoundaryRecord`): per example, the best adversarial point found so far, its distance,
   whether it is within eps, and the queries made when the first point within eps was found. Which point is best
   is the attack's call: the nearest one queried for HopSkipJump and Sign-OPT (:meth:`Track.offer`), the boundary
   point of the ray with the smallest radius for RayS (its search compares rays, not the clipped points);
4. the answer: ``x_adv`` is the best point where it is within eps (a point the attack queried and saw
   adversarial, so the final audit only confirms it), else the clean input; ``extras`` holds
   ``boundary_distance``, ``clean_correct`` and ``success_queries``.

An attack implements :meth:`DecisionAttack._search` for the examples left after the clean check. RayS does so
for the whole batch at once (its search is a small state machine over tensors). HopSkipJump and Sign-OPT are
sequential per example: the next query depends on the answers to the previous ones, and their loops run a
different number of times for every example. They subclass :class:`WalkAttack`: each example's search is a
:class:`Walk`, a generator that yields the points it wants labelled (a ``(k, n)`` batch of flattened inputs) and
receives back a boolean mask of which meet the goal. :func:`run_programs` advances every live walk by one request
per round and sends all requests of a round to the oracle together, with ``index`` naming the example of each
row. Each example's sequence of queries is thus the one it would make alone, while the model sees large batches.

Budgets: an example's budget is the attack's ``queries`` or what its oracle has left, whichever is smaller. A walk
reads ``track.remaining`` before sizing a request; a request the example can no longer afford ends its walk
(nothing is charged), so the oracle's budget is never hit. Walks report every adversarial point they learn of to
their :class:`Track`; in ``"eps"`` mode a walk is closed as soon as it has found one within eps.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from robustlab.attacks.base import Attack, AttackConfig, budget_left
from robustlab.checks import check_positive_int
from robustlab.errors import ConfigError
from robustlab.goals import Goal
from robustlab.oracles import Access, LabelOracle
from robustlab.threat import ThreatModel
from robustlab.utils import rows_like

__all__ = [
    "MODES",
    "BoundaryRecord",
    "DecisionAttack",
    "DecisionBatch",
    "DecisionConfig",
    "Program",
    "Search",
    "Track",
    "Walk",
    "WalkAttack",
    "check_mode",
    "run_programs",
]

MODES = ("eps", "adbd")

# A program yields a (k, n) batch of flattened points and is sent back a (k,) boolean mask (goal met).
Program = Generator[Tensor, Tensor, None]
# A step of a program that ends with a number (a boundary distance, a blend factor).
Search = Generator[Tensor, Tensor, float]


def check_mode(mode: str, name: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown {name} mode {mode!r}: choose 'eps' (stop within eps) or 'adbd' (use the budget)")


@dataclass(frozen=True)
class DecisionConfig(AttackConfig):
    """Options every decision-based attack has (subclasses add theirs after these two).

    Attributes:
        queries: query budget per example, including the clean check.
        mode: ``"eps"`` stops each example once it has an adversarial point within eps; ``"adbd"`` uses the
            whole budget to measure the decision-boundary distance.
    """

    title: ClassVar[str] = "decision-based attack"  # names the attack in error messages

    queries: int = 10000
    mode: str = "eps"

    def validate(self) -> None:
        check_positive_int("queries", self.queries)
        check_mode(self.mode, self.title)


@dataclass
class BoundaryRecord:
    """Per example of a batch: the nearest adversarial point found so far (see the module docstring).

    Attributes:
        best: ``(n, d)`` the best points, flattened (the clean input until one is found).
        distance: ``(n,)`` float64 distance of the best point (``inf``: none found; 0: misclassified).
        within: ``(n,)`` the best point is within eps (it is the answer).
        clean_correct: ``(n,)`` the clean input is classified correctly.
        success_queries: ``(n,)`` queries made when a point within eps was first found (-1: never).
    """

    best: Tensor
    distance: Tensor
    within: Tensor
    clean_correct: Tensor
    success_queries: Tensor

    @classmethod
    def start(cls, x: Tensor) -> BoundaryRecord:
        """Nothing found yet for any example of the batch ``x``."""
        n = int(x.shape[0])
        device = x.device
        return cls(
            best=x.reshape(n, -1).clone(),
            distance=torch.full((n,), math.inf, dtype=torch.float64, device=device),
            within=torch.zeros(n, dtype=torch.bool, device=device),
            clean_correct=torch.ones(n, dtype=torch.bool, device=device),
            success_queries=torch.full((n,), -1, dtype=torch.long, device=device),
        )

    def misclassified(self, rows: Tensor, queries: Tensor) -> None:
        """The clean inputs of ``rows`` already meet the goal: done at distance 0 after ``queries`` queries."""
        self.clean_correct[rows] = False
        self.distance[rows] = 0.0
        self.within[rows] = True
        self.success_queries[rows] = queries

    def improve(self, rows: Tensor, points: Tensor, distance: Tensor, within: Tensor, queries: Tensor) -> None:
        """New best ``points`` (``(k, d)``) for ``rows`` at ``distance``; ``within`` marks those within eps, and
        a row's first such point records ``queries`` (its entry for that row) as its success query count."""
        self.best[rows] = points
        self.distance[rows] = distance.to(self.distance.dtype)
        self.within[rows] = within
        fresh = within & (self.success_queries[rows] < 0)
        self.success_queries[rows[fresh]] = queries[fresh]

    def answer(self, x: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Candidate ``x_adv`` (the best point where within eps, else the clean input) and the extras."""
        x_adv = torch.where(rows_like(self.within, x), self.best.reshape(x.shape), x)
        extras: dict[str, Any] = {
            "boundary_distance": self.distance,
            "clean_correct": self.clean_correct,
            "success_queries": self.success_queries,
        }
        return x_adv, extras


@dataclass(frozen=True)
class DecisionBatch:
    """The batch a decision-based attack searches: its oracle, inputs, goal, threat model, randomness and record."""

    oracle: LabelOracle
    x: Tensor
    goal: Goal
    threat: ThreatModel
    generator: torch.Generator
    record: BoundaryRecord


class DecisionAttack(Attack[LabelOracle]):
    """Base of the decision-based attacks: clean check, record and answer (see the module docstring)."""

    access = Access.LABELS
    config: DecisionConfig

    def _perturb(
        self, oracle: LabelOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        self._check_threat(threat)
        record = BoundaryRecord.start(x)
        rows = self._clean_check(oracle, x, goal, record)
        if rows.numel() > 0:
            self._search(DecisionBatch(oracle, x, goal, threat, generator, record), rows)
        return record.answer(x)

    # ---------------------------------------------------------------- hooks
    def _check_threat(self, threat: ThreatModel) -> None:
        """Raise :class:`ConfigError` for a threat model the attack cannot start in (checked before any query)."""

    @abstractmethod
    def _search(self, batch: DecisionBatch, rows: Tensor) -> None:
        """Search the examples ``rows`` (classified correctly; the others are done) and fill in ``batch.record``."""

    # ---------------------------------------------------------------- shared steps
    @property
    def stop_at_eps(self) -> bool:
        """Whether an example stops at its first adversarial point within eps (``mode="eps"``)."""
        return self.config.mode == "eps"

    def _clean_check(self, oracle: LabelOracle, x: Tensor, goal: Goal, record: BoundaryRecord) -> Tensor:
        """One query at every clean input the budget allows; returns the examples classified correctly."""
        asked = (budget_left(oracle, self.config.queries) > 0).nonzero().flatten()
        if asked.numel() == 0:
            return asked
        adversarial = goal.subset(asked).is_success(oracle.labels(x[asked], asked))
        wrong = asked[adversarial]
        record.misclassified(wrong, oracle.queries[wrong])
        return asked[~adversarial]


@dataclass
class Track:
    """What the scheduler and one example's walk share.

    Attributes:
        x: the clean input, flattened.
        threat: the threat model (its norm measures distances).
        stop_at: a point within this distance counts as a success (eps).
        remaining: queries this example may still make (updated by the scheduler before each answer).
        used: queries made so far (updated likewise).
        best, best_distance: the nearest adversarial point found so far, and its distance.
        success_queries: queries used when a point within ``stop_at`` was first found (-1: never).
    """

    x: Tensor
    threat: ThreatModel
    stop_at: float
    remaining: int = 0
    used: int = 0
    best: Tensor | None = None
    best_distance: float = math.inf
    success_queries: int = -1

    def distance(self, points: Tensor) -> Tensor:
        """Distances of ``points`` (``(k, n)``) from the clean input in the threat model's norm."""
        return self.threat.distance(points, self.x[None].expand_as(points))

    def offer(self, points: Tensor, adversarial: Tensor) -> None:
        """Record the nearest of ``points`` (``(k, n)``) whose mask entry is True, if it beats the best so far."""
        if not bool(adversarial.any()):
            return
        candidates = points[adversarial]
        distances = self.distance(candidates)
        nearest = int(distances.argmin())
        value = float(distances[nearest])
        if value < self.best_distance:
            self.best, self.best_distance = candidates[nearest].clone(), value
            if value <= self.stop_at and self.success_queries < 0:
                self.success_queries = self.used


class Walk(ABC):
    """One example's search as a generator of label requests, with the steps HopSkipJump and Sign-OPT share.

    Subclasses implement :meth:`run`; every request goes through :meth:`ask`, which records the adversarial
    points it reveals on the track.
    """

    def __init__(self, config: Any, track: Track, threat: ThreatModel, generator: torch.Generator) -> None:
        self.config = config
        self.track = track
        self.x0 = track.x
        self.threat = threat
        self.generator = generator
        self.setup()

    @abstractmethod
    def setup(self) -> None:
        """Derive the walk's constants from the config and the threat model (called once, at construction)."""

    @abstractmethod
    def run(self) -> Program:
        """The walk (``yield from`` the helpers below)."""

    def ask(self, points: Tensor) -> Generator[Tensor, Tensor, Tensor]:
        """Yield ``points`` (``(k, n)``), record the adversarial ones, return the mask."""
        answer = yield points
        self.track.offer(points, answer)
        return answer

    def ask_one(self, point: Tensor) -> Generator[Tensor, Tensor, bool]:
        """Whether the single ``point`` (``(n,)``) meets the goal."""
        answer = yield from self.ask(point[None])
        return bool(answer[0])

    def bisect(self, point_at: Callable[[float], Tensor], low: float, high: float, tol: float) -> Search:
        """Binary search for the boundary on a line of points ``point_at(t)``, between ``low`` (not adversarial)
        and ``high`` (adversarial), until ``high - low <= tol``; returns the adversarial end."""
        while high - low > tol:
            mid = (high + low) / 2.0
            if (yield from self.ask_one(point_at(mid))):
                high = mid
            else:
                low = mid
        return high


class WalkAttack(DecisionAttack):
    """A decision-based attack whose per-example search is a :class:`Walk` (class attribute ``walk``)."""

    walk: ClassVar[type[Walk]]

    def _walk(self, index: int, track: Track, batch: DecisionBatch) -> Walk:
        """The walk of example ``index`` (a hook: an attack with a per-example start overrides it)."""
        return self.walk(self.config, track, batch.threat, batch.generator)

    def _search(self, batch: DecisionBatch, rows: Tensor) -> None:
        x, threat = batch.x, batch.threat
        flat = x.reshape(x.shape[0], -1)
        tracks = {i: Track(flat[i], threat, threat.eps) for i in rows.tolist()}
        programs = {i: self._walk(i, track, batch).run() for i, track in tracks.items()}
        run_programs(batch.oracle, batch.goal, tracks, programs, shape=tuple(x.shape[1:]),
                     budget=self.config.queries, stop_at_eps=self.stop_at_eps)  # fmt: skip
        found = [i for i, track in tracks.items() if track.best is not None]
        if not found:
            return
        kept = [tracks[i] for i in found]
        device = x.device
        batch.record.improve(
            torch.tensor(found, dtype=torch.long, device=device),
            torch.stack([track.best for track in kept if track.best is not None]),
            torch.tensor([track.best_distance for track in kept], dtype=torch.float64, device=device),
            torch.tensor([track.best_distance <= track.stop_at for track in kept], dtype=torch.bool, device=device),
            torch.tensor([track.success_queries for track in kept], dtype=torch.long, device=device),
        )


def run_programs(
    oracle: LabelOracle,
    goal: Goal,
    tracks: dict[int, Track],
    programs: dict[int, Program],
    *,
    shape: tuple[int, ...],
    budget: int,
    stop_at_eps: bool,
    max_rows: int = 8192,
) -> None:
    """Drive ``programs[i]`` (whose example is ``i``) until each ends, runs out of budget or succeeds.

    ``shape`` is the shape of one input: flattened rows are reshaped to it for the oracle. ``budget`` is the
    attack's own per-example budget; an oracle with a smaller one (or queries already spent) lowers it.
    """
    pending: dict[int, Tensor] = {}
    remaining = budget_left(oracle, budget).tolist()
    for i, program in programs.items():
        tracks[i].remaining = int(remaining[i])
        request = _advance(program, None)
        if request is not None:
            pending[i] = request
    while pending:
        remaining = budget_left(oracle, budget).tolist()
        for i in list(pending):
            rows = int(pending[i].shape[0])
            if (stop_at_eps and tracks[i].success_queries >= 0) or rows > remaining[i] or rows == 0:
                programs[i].close()
                del pending[i]
        if not pending:
            break
        owners = list(pending)
        answers = _label_requests(oracle, goal, owners, [pending[i] for i in owners], shape, max_rows)
        remaining = budget_left(oracle, budget).tolist()
        used = oracle.queries.tolist()
        for i, answer in zip(owners, answers):
            tracks[i].remaining = int(remaining[i])
            tracks[i].used = int(used[i])
            request = _advance(programs[i], answer)
            if request is None:
                del pending[i]
            else:
                pending[i] = request


def _label_requests(
    oracle: LabelOracle, goal: Goal, owners: list[int], requests: list[Tensor], shape: tuple[int, ...], max_rows: int
) -> tuple[Tensor, ...]:
    """Ask the oracle about all ``requests`` (of examples ``owners``) at once, in chunks of at most ``max_rows``
    rows; returns each request's goal mask."""
    sizes = [int(request.shape[0]) for request in requests]
    device = requests[0].device
    index = torch.repeat_interleave(torch.tensor(owners, device=device), torch.tensor(sizes, device=device))
    points = torch.cat(requests)
    answers = []
    for start in range(0, int(points.shape[0]), max_rows):
        chunk = points[start : start + max_rows]
        rows_index = index[start : start + max_rows]
        labels = oracle.labels(chunk.reshape((-1, *shape)), rows_index)
        answers.append(goal.subset(rows_index).is_success(labels))
    return torch.cat(answers).split(sizes)


def _advance(program: Program, answer: Tensor | None) -> Tensor | None:
    try:
        return next(program) if answer is None else program.send(answer)
    except StopIteration:
        return None
