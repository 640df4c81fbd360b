"""Shared engine of score-based attacks that step along zeroth-order gradient estimates (NES-PGD, ZO-FW).

An attack built on :class:`ZerothOrderAttack` says how one step moves the iterate given the estimated gradient
(:meth:`~ZerothOrderAttack._step`) and, optionally, what it learns from the loss at the new iterate
(:meth:`~ZerothOrderAttack._observe`). The engine owns the rest, once:

- query accounting: one query at the clean input (is it already adversarial?), then per step one batch of probes
  for all remaining examples and directions (``estimate_with_oracle``) and one query at the new iterate, which is
  the success check. Every one of them is charged by the oracle to its example. An estimator with forward
  differences needs the loss at the iterate itself: it reuses the check's answer instead of asking again;
- the budget: the attack's ``queries`` and the oracle's own budget, whichever is smaller. Before every step, each
  example must afford the whole step (probes + check), else it leaves the batch; the oracle is never asked for a
  query past the budget;
- per-example early stop at the first success, and the best iterate (any success, else the highest loss).

:class:`ScoreSearch` is that bookkeeping (budget, success checks, best point, iteration of the first success); the
Square attack, a random search without gradient estimates, uses it too. The hooks have tools for what NES and ZO-FW
both do: a momentum of the estimates, and a window of the last few losses per example for their step-size schedules
(plateaus, stalls).

Apart from the random directions, which come from one generator for the whole batch, an example's run does not
depend on the other examples of its batch.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks.base import Attack, BestTracker, budget_left
from robustlab.checks import check_number, check_positive_int
from robustlab.goals import Goal
from robustlab.losses import attack_loss
from robustlab.oracles import Access, ScoreOracle
from robustlab.threat import ThreatModel
from robustlab.zeroth_order import RGE, GradientEstimator, ScoreObjective, estimate_with_oracle

__all__ = ["ScoreSearch", "State", "Step", "ZerothOrderAttack", "check_estimate_options"]

State = dict[str, Tensor]


def check_estimate_options(queries: int, q: int, mu: float, loss: str, *, mu_meaning: str) -> None:
    """The options every zeroth-order attack has: budget, direction pairs, probe radius and loss."""
    check_positive_int("queries (the budget per example)", queries)
    check_positive_int("q (direction pairs per estimate)", q)
    check_number(f"mu ({mu_meaning})", mu, low=0, low_open=True)
    attack_loss(loss)


class ScoreSearch:
    """Per-example bookkeeping of a score-based attack: budget, success checks, the best point (any success, else
    the highest loss) and the iteration at which each example first succeeded (-1: never; 0: at its start)."""

    def __init__(self, oracle: ScoreOracle, goal: Goal, objective: ScoreObjective, queries: int, x: Tensor) -> None:
        self.oracle = oracle
        self.goal = goal
        self.objective = objective
        self.queries = queries
        self.best = BestTracker(x)
        self.iterations = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        # The target's strongest class other than the label (targeted: than the target) at each example's last
        # evaluated point; -1 until one is evaluated.
        self.rival = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)

    def affordable(self, rows: Tensor, cost: int) -> Tensor:
        """The examples of ``rows`` that can still pay ``cost`` queries."""
        return rows[budget_left(self.oracle, self.queries, rows) >= cost]

    def evaluate(self, points: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """One query per point (``points[i]`` belongs to example ``rows[i]``): (goal met, loss)."""
        success, loss, _ = self.evaluate_scores(points, rows)
        return success, loss

    def evaluate_scores(self, points: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`evaluate`, and the scores the target answered."""
        scores = self.oracle.scores(points, rows)
        goal = self.goal.subset(rows)
        keep = goal.targets if goal.targets is not None else goal.labels
        self.rival[rows] = scores.scatter(1, keep[:, None], float("-inf")).argmax(dim=1)
        return goal.is_success(scores), self.objective(scores, rows), scores

    def record(self, points: Tensor, rows: Tensor, success: Tensor, loss: Tensor, iteration: int) -> Tensor:
        """Offer ``points`` as the best of ``rows``; returns the examples that go on (not yet successful)."""
        self.best.update(points, success, loss, rows)
        self.iterations[rows[success]] = iteration
        return rows[~success]

    def start(self, points: Tensor, loss: Tensor) -> Tensor:
        """One query at every example's starting point it can afford, its loss written to ``loss`` (in that
        tensor's dtype); returns the examples that go on."""
        rows = self.affordable(torch.arange(points.shape[0], device=points.device), 1)
        if rows.numel() == 0:
            return rows
        success, value = self.evaluate(points[rows], rows)
        loss[rows] = value.to(loss.dtype)
        return self.record(points[rows], rows, success, loss[rows], 0)


@dataclass(frozen=True)
class Step:
    """What one step of a zeroth-order attack sees, for the examples still running.

    Attributes:
        rows: the examples (indices into the batch and the per-example state).
        grad: the estimated gradients at ``x_adv``.
        values: the loss at every probe of the estimate, ``(len(rows), k)``.
        x: the clean inputs of ``rows``.
        x_adv: the current iterates of ``rows``.
        threat: the threat model.
        number: the step's number, from 0.
    """

    rows: Tensor
    grad: Tensor
    values: Tensor
    x: Tensor
    x_adv: Tensor
    threat: ThreatModel
    number: int


class ZerothOrderAttack(Attack[ScoreOracle]):
    """A score-based attack stepping along zeroth-order gradient estimates; see the module docstring."""

    access = Access.SCORES

    # ---------------------------------------------------------------- hooks
    @abstractmethod
    def _estimator(self) -> GradientEstimator:
        """The gradient estimator of one step."""

    @abstractmethod
    def _init_state(self, x: Tensor) -> State:
        """Per-example state for the whole batch (tensors with the examples along the first dimension)."""

    @abstractmethod
    def _step(self, state: State, step: Step) -> Tensor:
        """The next iterates of the examples ``step.rows`` (index the state with them)."""

    def _observe(self, state: State, rows: Tensor, loss: Tensor, step: int) -> None:
        """Learn from the loss at the new iterates of ``rows`` (e.g. a step-size schedule). Default: nothing."""

    # ---------------------------------------------------------------- tools for the hooks
    @staticmethod
    def _update_momentum(buffer: Tensor, rows: Tensor, grad: Tensor, beta: float) -> Tensor:
        """``beta * m + (1 - beta) * grad`` for the examples ``rows`` of the momentum ``buffer`` (in place)."""
        momentum = beta * buffer[rows] + (1.0 - beta) * grad
        buffer[rows] = momentum
        return momentum

    @staticmethod
    def _loss_window(x: Tensor, length: int) -> State:
        """State entries for the last ``length`` values of a minimized objective per example, oldest first:
        ``history`` ``(n, length)`` and ``filled`` (how many entries count). Step-size schedules compare the first
        and last entries of a full window (:meth:`_push_loss`) and restart it after acting on it
        (:meth:`_restart_window`)."""
        n = int(x.shape[0])
        return {
            "history": torch.zeros((n, length), dtype=x.dtype, device=x.device),
            "filled": torch.zeros(n, dtype=torch.long, device=x.device),
        }

    @staticmethod
    def _push_loss(state: State, rows: Tensor, objective: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Append one value per example of ``rows`` to their windows; returns the first and last entries, and
        whether each window is full."""
        length = int(state["history"].shape[1])
        history = torch.cat([state["history"][rows, 1:], objective.to(state["history"].dtype)[:, None]], dim=1)
        filled = (state["filled"][rows] + 1).clamp(max=length)
        state["history"][rows] = history
        state["filled"][rows] = filled
        return history[:, 0], history[:, -1], filled == length

    @staticmethod
    def _restart_window(state: State, rows: Tensor, mask: Tensor) -> None:
        """Count the windows of ``rows[mask]`` empty again."""
        filled = state["filled"][rows]
        state["filled"][rows] = torch.where(mask, torch.zeros_like(filled), filled)

    # ---------------------------------------------------------------- engine
    def _perturb(
        self, oracle: ScoreOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        config: Any = self.config
        search = ScoreSearch(oracle, goal, ScoreObjective(attack_loss(config.loss), goal), config.queries, x)
        estimator = self._estimator()
        # Forward differences need f at the iterate itself: the success check there already paid for it.
        reuse = isinstance(estimator, RGE) and estimator.difference == "forward"
        step_cost = estimator.queries_per_example(x[0].numel()) + 1 - int(reuse)  # the probes, and the check
        last_value = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        x_adv = x.clone()

        active = search.start(x, last_value)  # is the clean input already adversarial?
        state = self._init_state(x)
        number = 0
        while active.numel() > 0:
            active = search.affordable(active, step_cost)
            if active.numel() == 0:
                break
            estimate = estimate_with_oracle(
                oracle, x_adv[active], estimator, search.objective, index=active, generator=generator,
                bounds=(threat.lower, threat.upper), known_value=last_value[active] if reuse else None,
            )  # fmt: skip
            x_rows = x[active]
            step = Step(active, estimate.grad, estimate.values, x_rows, x_adv[active], threat, number)
            candidate = threat.project(self._step(state, step), x_rows)
            x_adv[active] = candidate
            success, loss = search.evaluate(candidate, active)
            last_value[active] = loss.to(x.dtype)
            going_on = search.record(candidate, active, success, loss, number + 1)
            self._observe(state, active, loss, number)
            active = going_on
            number += 1
        return search.best.x, {"iterations": search.iterations}
