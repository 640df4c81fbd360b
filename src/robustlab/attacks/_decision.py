"""Running per-example decision-based (hard-label) searches together, one batched oracle call per round.

Algorithms such as HopSkipJump and Sign-OPT are sequential per example: the next query depends on the answers
to the previous ones, and their loops run a different number of times for every example. Each example's search is
written here as a plain generator (a *program*) that yields the points it wants labelled, as a ``(k, n)`` batch of
flattened inputs, and receives back a boolean mask: which of them meet the attack's goal. :func:`run_programs`
advances every live program by one request per round, sends all requests of a round to the oracle together
(split into chunks of at most ``max_rows`` rows) with ``index`` naming the example of each row, and hands the
answers back. Each example's sequence of queries is thus the one it would make alone, while the model sees large
batches.

Budgets: a program reads ``track.remaining`` before sizing a request; a request the example can no longer afford
ends its program (nothing is charged), so the oracle's budget is never hit. Programs report every adversarial
point they learn of with :meth:`Track.offer`; with ``stop_at`` set, a program is closed as soon as it has found
one within that distance (evaluation at a fixed eps).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from robustlab.errors import ConfigError
from robustlab.goals import Goal
from robustlab.oracles import LabelOracle
from robustlab.threat import ThreatModel

__all__ = ["MODES", "Program", "Track", "check_mode", "finish", "make_tracks", "run_programs"]

MODES = ("eps", "adbd")

# A program yields a (k, n) batch of flattened points and is sent back a (k,) boolean mask (goal met).
Program = Generator[Tensor, Tensor, None]


def check_mode(mode: str, name: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown {name} mode {mode!r}: choose 'eps' (stop within eps) or 'adbd' (use the budget)")


@dataclass
class Track:
    """What the scheduler and one example's program share.

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
    clean_correct: bool = True
    done: bool = field(default=False)

    def distance(self, points: Tensor) -> Tensor:
        """Distances of ``points`` (``(k, n)``) from the clean input in the threat model's norm."""
        return self.threat.distance(points, self.x[None].expand_as(points))

    def offer(self, points: Tensor, adversarial: Tensor) -> None:
        """Record the nearest of ``points`` (``(k, n)``) whose mask entry is True, if it beats the best so far."""
        if points.dim() == 1:
            points, adversarial = points[None], adversarial.reshape(1)
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


def make_tracks(x: Tensor, threat: ThreatModel) -> list[Track]:
    """One track per example of the batch ``x``, stopping at ``threat.eps``."""
    flat = x.reshape(x.shape[0], -1)
    return [Track(flat[i], threat, threat.eps) for i in range(int(x.shape[0]))]


def run_programs(
    oracle: LabelOracle,
    goal: Goal,
    tracks: list[Track],
    programs: list[Program],
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

    def left() -> list[int]:
        return [int(v) for v in torch.minimum(oracle.remaining(), budget - oracle.queries).tolist()]

    pending: dict[int, Tensor] = {}
    remaining = left()
    for i, program in enumerate(programs):
        tracks[i].remaining = remaining[i]
        request = _advance(program, None)
        if request is not None:
            pending[i] = request
    while pending:
        remaining = left()
        for i in list(pending):
            rows = int(pending[i].shape[0])
            if (stop_at_eps and tracks[i].success_queries >= 0) or rows > remaining[i] or rows == 0:
                programs[i].close()
                del pending[i]
        if not pending:
            break
        owners = list(pending)
        sizes = [int(pending[i].shape[0]) for i in owners]
        device = tracks[owners[0]].x.device
        index = torch.repeat_interleave(torch.tensor(owners, device=device), torch.tensor(sizes, device=device))
        points = torch.cat([pending[i] for i in owners])
        answers = []
        for start in range(0, int(points.shape[0]), max_rows):
            chunk = points[start : start + max_rows]
            rows_index = index[start : start + max_rows]
            labels = oracle.labels(chunk.reshape((-1, *shape)), rows_index)
            answers.append(goal.subset(rows_index).is_success(labels))
        adversarial = torch.cat(answers).split(sizes)
        remaining = left()
        used = oracle.queries.tolist()
        for i, answer in zip(owners, adversarial):
            tracks[i].remaining = remaining[i]
            tracks[i].used = int(used[i])
            request = _advance(programs[i], answer)
            if request is None:
                del pending[i]
            else:
                pending[i] = request


def _advance(program: Program, answer: Tensor | None) -> Tensor | None:
    try:
        return next(program) if answer is None else program.send(answer)
    except StopIteration:
        return None


def finish(x: Tensor, tracks: list[Track], threat: ThreatModel, stop_at: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Candidate ``x_adv`` (the best point if within ``stop_at``, else the clean input) and the extras."""
    x_adv = x.clone()
    for i, track in enumerate(tracks):
        if track.best is not None and track.best_distance <= stop_at:
            x_adv[i] = track.best.reshape(x.shape[1:])
    device = x.device
    extras = {
        "boundary_distance": torch.tensor([t.best_distance for t in tracks], dtype=torch.float64, device=device),
        "clean_correct": torch.tensor([t.clean_correct for t in tracks], dtype=torch.bool, device=device),
        "success_queries": torch.tensor([t.success_queries for t in tracks], dtype=torch.long, device=device),
    }
    return x_adv, extras
