"""Shared engine of first-order iterative attacks: steps, restarts, per-example early stop, best iterate.

An attack built on :class:`IterativeAttack` says only how a run starts (:meth:`~IterativeAttack._start`) and how
one step moves its state given the gradient (:meth:`~IterativeAttack._step`). The engine owns the loop:

- every gradient evaluation's logits tell, for free, whether the current iterate already meets the goal; the best
  iterate per example (any success, else the highest loss) is kept across steps and restarts;
- with ``early_stop`` (evaluation), examples leave the batch the moment they succeed, and each restart runs only
  on examples no earlier restart broke;
- without it (the classic fixed-step attack), the loop touches the whole batch and adds no forward pass: the last
  iterate is returned for examples no earlier iterate broke, and the final audit in :class:`Attack` decides.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks.base import Attack, BestTracker
from robustlab.goals import Goal
from robustlab.losses import AttackLoss, attack_loss
from robustlab.oracles import Access, GradientOracle
from robustlab.threat import ThreatModel
from robustlab.utils import rows_like

__all__ = ["IterativeAttack", "State"]

State = dict[str, Tensor]


class IterativeAttack(Attack[GradientOracle]):
    """A white-box attack made of gradient steps; see the module docstring for what the engine provides."""

    access = Access.GRADIENT

    # ---------------------------------------------------------------- hooks
    @abstractmethod
    def _start(self, x: Tensor, threat: ThreatModel, generator: torch.Generator) -> State:
        """Initial state for a restart on the examples ``x``; must hold the iterate under ``"x_adv"``."""

    @abstractmethod
    def _step(self, state: State, grad: Tensor, x: Tensor, threat: ThreatModel, step: int) -> State:
        """The state after one step, given the loss gradient at ``state["x_adv"]``."""

    def _loss(self) -> AttackLoss:
        """The attack loss named by the config's ``loss``."""
        return attack_loss(self._options.loss)

    def _schedule(self) -> tuple[int, int, bool]:
        """(steps, restarts, early_stop) from the config; one run when it has no ``restarts`` (a deterministic
        attack would repeat the same run)."""
        options = self._options
        return options.steps, getattr(options, "restarts", 1), options.early_stop

    @property
    def _options(self) -> Any:
        """The config, whose ``steps``, ``loss`` and ``early_stop`` every iterative attack has."""
        return self.config

    # ---------------------------------------------------------------- engine
    def _perturb(
        self, oracle: GradientOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        steps, restarts, early_stop = self._schedule()
        loss_fn = self._loss()
        best = BestTracker(x)
        # Step at which each example was first seen to succeed (-1: never), for "mean iterations" figures.
        iterations = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        unevaluated_last: Tensor | None = None

        for restart in range(restarts):
            index: Tensor | None = None
            if early_stop:
                index = (~best.success).nonzero().flatten()
                if index.numel() == 0:
                    break
            xs = x if index is None else x[index]
            goal_s = goal if index is None else goal.subset(index)
            state: State | None = self._start(xs, threat, generator)

            for step in range(steps):
                assert state is not None
                loss, logits, grad = oracle.loss_and_grad(state["x_adv"], goal_s, loss_fn, index)
                success = goal_s.is_success(logits)
                best.update(state["x_adv"], success, loss, index)
                if restart == 0:
                    _record_first(iterations, success, index, step)
                if early_stop:
                    assert index is not None
                    keep = ~success
                    if not bool(keep.all()):
                        if not bool(keep.any()):
                            state = None
                            break
                        index, xs, goal_s = index[keep], xs[keep], goal_s.subset(keep)
                        state = {name: value[keep] for name, value in state.items()}
                        grad = grad[keep]
                state = self._step(state, grad, xs, threat, step)

            if state is None:
                continue
            if restarts == 1 and not early_stop:
                unevaluated_last = state["x_adv"]
                continue
            logits = oracle.logits(state["x_adv"], index)
            success = goal_s.is_success(logits)
            best.update(state["x_adv"], success, loss_fn(logits, goal_s), index)
            if restart == 0:
                _record_first(iterations, success, index, steps)

        extras = {"iterations": iterations}
        if unevaluated_last is None:
            return best.x, extras
        return torch.where(rows_like(best.success, x), best.x, unevaluated_last), extras


def _record_first(iterations: Tensor, success: Tensor, index: Tensor | None, step: int) -> None:
    """Set ``iterations`` to ``step`` for examples succeeding now and never before."""
    if index is None:
        fresh = success & (iterations < 0)
        iterations.masked_fill_(fresh, step)
        return
    rows = index[success]
    current = iterations[rows]
    iterations[rows] = torch.where(current < 0, torch.full_like(current, step), current)
