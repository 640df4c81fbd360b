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

Apart from the random directions, which come from one generator for the whole batch, an example's run does not
depend on the other examples of its batch.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks.base import Attack, BestTracker
from robustlab.goals import Goal
from robustlab.losses import attack_loss
from robustlab.oracles import Access, ScoreOracle
from robustlab.threat import ThreatModel
from robustlab.zeroth_order import RGE, GradientEstimator, ScoreObjective, estimate_with_oracle

__all__ = ["State", "ZerothOrderAttack", "budget_left"]

State = dict[str, Tensor]


def budget_left(oracle: ScoreOracle, index: Tensor, queries: int) -> Tensor:
    """Queries each example of ``index`` may still make: the attack's ``queries`` and the oracle's budget."""
    own = queries - oracle.queries[index]
    return torch.minimum(oracle.remaining(index), own)


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
    def _step(
        self,
        state: State,
        rows: Tensor,
        grad: Tensor,
        estimate_values: Tensor,
        x: Tensor,
        x_adv: Tensor,
        threat: ThreatModel,
        step: int,
    ) -> Tensor:
        """The next iterates of the examples ``rows`` (state is indexed by ``rows``; ``x``, ``x_adv`` and ``grad``
        are already restricted to them; ``estimate_values`` holds the loss at every probe, ``(len(rows), k)``)."""

    def _observe(self, state: State, rows: Tensor, loss: Tensor, step: int) -> None:
        """Learn from the loss at the new iterates of ``rows`` (e.g. a step-size schedule). Default: nothing."""

    # ---------------------------------------------------------------- engine
    def _perturb(
        self, oracle: ScoreOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        config: Any = self.config
        queries: int = config.queries
        objective = ScoreObjective(attack_loss(config.loss), goal)
        estimator = self._estimator()
        n = x.shape[0]
        # Forward differences need f at the iterate itself: the success check there already paid for it.
        reuse = isinstance(estimator, RGE) and estimator.difference == "forward"
        step_cost = estimator.queries_per_example(x[0].numel()) + 1 - int(reuse)  # the probes, and the check
        best = BestTracker(x)
        last_value = torch.zeros(n, dtype=x.dtype, device=x.device)
        iterations = torch.full((n,), -1, dtype=torch.long, device=x.device)
        x_adv = x.clone()

        # Is the clean input already adversarial? One query each (the first success check).
        active = torch.arange(n, device=x.device)
        active = active[budget_left(oracle, active, queries) >= 1]
        if active.numel() > 0:
            scores = oracle.scores(x[active], active)
            success = goal.subset(active).is_success(scores)
            last_value[active] = objective(scores, active).to(x.dtype)
            best.update(x[active], success, last_value[active], active)
            iterations[active[success]] = 0
            active = active[~success]

        state = self._init_state(x)
        step = 0
        while active.numel() > 0:
            active = active[budget_left(oracle, active, queries) >= step_cost]
            if active.numel() == 0:
                break
            estimate = estimate_with_oracle(
                oracle, x_adv[active], estimator, objective, index=active, generator=generator,
                bounds=(threat.lower, threat.upper), known_value=last_value[active] if reuse else None,
            )  # fmt: skip
            x_rows = x[active]
            candidate = self._step(state, active, estimate.grad, estimate.values, x_rows, x_adv[active], threat, step)
            candidate = threat.project(candidate, x_rows)
            x_adv[active] = candidate
            scores = oracle.scores(candidate, active)
            success = goal.subset(active).is_success(scores)
            loss = objective(scores, active)
            last_value[active] = loss.to(x.dtype)
            best.update(candidate, success, loss, active)
            self._observe(state, active, loss, step)
            iterations[active[success]] = step + 1
            active = active[~success]
            step += 1
        return best.x, {"iterations": iterations}
