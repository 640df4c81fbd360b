"""Auto-PGD (APGD) and its targeted-DLR variant APGD-T, in the linf, l2 and l1 norms.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks",
ICML 2020 (reference code: ``fra31/auto-attack``, ``autoattack/autopgd_base.py``). APGD is PGD with momentum and
a step size that needs no tuning:

- start at a random point of the ball (``threat.random_start``), step size ``eta = 2 * eps`` per example;
- each step: ``z = P(x_k + eta * s(g_k))`` with ``s`` the steepest-ascent direction of the norm (sign for linf,
  normalized gradient for l2) and ``x_{k+1} = P(x_k + alpha * (z - x_k) + (1 - alpha) * (x_k - x_{k-1}))``,
  ``alpha = 0.75`` (no momentum on the first step); ``P`` is the exact projection onto ball and box;
- at the checkpoints ``w_j`` (see :func:`apgd_checkpoints`), halve ``eta`` of an example when at most a fraction
  ``rho`` of its steps since the previous checkpoint increased the loss (``<=`` as in the reference; the paper
  writes ``<``), or when its step size was not halved at the previous checkpoint and its best loss has not
  improved since; an example whose step is halved restarts from its best point (highest loss) with the gradient
  there.

``steps`` steps cost ``steps + 1`` gradient evaluations per restart (the start point is evaluated too), and the
logits of every evaluation tell for free whether an example is already broken. With ``early_stop`` (the default:
this is an evaluation attack) an example leaves the batch the moment it is broken, each restart runs only on the
examples no earlier one broke, and a clean pass first removes examples that are misclassified already (one query
each, no gradient), like the reference. Per example the best point over all runs is kept: any success, else the
highest loss. ``result.extras`` holds, per example, ``run`` (the run that first broke it: the restart, or for
APGD-T ``target * restarts + restart``; -1 if none did), ``iterations`` (the iteration of that run, 0 being its
start point; -1 if none) and ``clean_success`` (met the goal before any perturbation; always False without
early stop). With early stop, an example first broken at iteration ``i`` of run ``r`` costs exactly
``r * (steps + 1) + i + 1`` gradient evaluations, one never broken ``runs * (steps + 1)`` (runs: ``restarts``,
or ``min(n_target_classes, classes - 1) * restarts`` for APGD-T), one misclassified from the start none.

APGD-T (``"apgd-t"``) is untargeted overall: for each of the ``n_target_classes`` classes ranked highest by the clean
logits (true class excluded), it runs APGD on the targeted DLR loss toward that class on the examples still
unbroken; success means any misclassification. Standard AutoAttack runs APGD-CE then APGD-T (9 targets).

l1 (Croce & Hein, "Mind the box: l1-APGD for sparse adversarial attacks on image classifiers", ICML 2021; the
reference's ``L1`` branch): the exact maximizer of a linear function over the l1 ball is one vertex, which makes poor
progress, and a dense step wastes the budget on coordinates the box blocks. Each l1 step moves ``eta`` (l1 length,
``eta = eps`` at first) along the signs of the gradient's largest coordinates — a fraction ``topk`` of them, 20% at
first — and projects exactly onto the l1 ball intersected with the box; no momentum. Every ``max(int(0.04 * steps),
1)`` steps, ``topk`` becomes the sparsity of the best point so far divided by 1.5; an example whose best point got
sparser restarts from it with ``eta = eps``, the others divide ``eta`` by 1.5 (down to ``eps / 10``). The random
start is a Gaussian draw projected onto ball and box (the reference's). ``eps_schedule`` adds the paper's (and
AutoAttack's) schedule over 3 eps, 2 eps and eps.

Differences from the reference code, on purpose:

- the linf start is uniform in the ball (the reference rescales a uniform draw so one coordinate is at +-eps) and
  the l2 start uniform in the ball (the reference draws on the sphere): both come from ``threat.random_start``;
- l2 steps use the exact projection onto ball and box (the reference projects on the ball, then clips);
- the first checkpoint compares the loss after the first step with the loss at the start point, as the paper
  states (the reference compares it with an unfilled zero entry of its loss history);
- examples stop early, and the generator passed in draws the random starts (no global seeding);
- the l1 projection onto ball and box is ``ThreatModel.project``'s exact one (the reference's is exact too).

Example:
    >>> result = robustlab.attack(model, x, y, ThreatModel("linf", 8 / 255), method="apgd", loss="dlr")
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from robustlab.attacks.base import Attack, AttackConfig, BestTracker
from robustlab.attacks.registry import register_attack
from robustlab.checks import check_flag, check_number, check_positive_int
from robustlab.errors import ConfigError
from robustlab.goals import Goal
from robustlab.losses import AttackLoss, attack_loss
from robustlab.oracles import Access, GradientOracle
from robustlab.threat import Norm, ThreatModel
from robustlab.utils import rows_like

__all__ = ["APGD", "APGDConfig", "APGDTargeted", "APGDTargetedConfig", "apgd_checkpoints"]

_LOSSES = ("ce", "dlr")


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations ``w_0 = 0 < w_1 < ...`` (at most ``steps``) at which APGD may halve its step size.

    The paper defines ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``. The reference code (which AutoAttack's numbers come from)
    rounds the three fractions to whole iterations first: the first interval is ``max(int(0.22 * steps), 1)``,
    each next one ``max(previous - max(int(0.03 * steps), 1), max(int(0.06 * steps), 1))``. Both give
    ``[0, 22, 41, 57, 70, 80, 87, 93, 99]`` for 100 steps (and agree for multiples of 100), but not in general:
    for 50 steps the reference gives ``[0, 11, 21, 30, 38, 45]`` and the paper ``[0, 11, 21, 29, 35, 40, 44, 47,
    50]``; for 10 steps the reference checks at every step from the second on. This function follows the
    reference.
    """
    check_positive_int("steps", steps)
    interval = max(int(0.22 * steps), 1)
    decrease = max(int(0.03 * steps), 1)
    shortest = max(int(0.06 * steps), 1)
    points = [0]
    point = interval
    while point <= steps:
        points.append(point)
        interval = max(interval - decrease, shortest)
        point += interval
    return points


@dataclass(frozen=True)
class _APGDOptions(AttackConfig):
    """The options APGD and APGD-T share (see :class:`APGDConfig`)."""

    steps: int = 100
    restarts: int = 1
    rho: float = 0.75
    momentum: float = 0.75
    initial_step: float | None = None
    random_start: bool = True
    early_stop: bool = True
    eps_schedule: bool = False
    eot_iter: int = 1

    def validate(self) -> None:
        check_positive_int("steps", self.steps)
        check_positive_int("restarts", self.restarts)
        if self.initial_step is not None:
            check_number("initial_step", self.initial_step, low=0, low_open=True)
        check_number("rho", self.rho, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number("momentum (1 means no momentum)", self.momentum, low=0.0, high=1.0, low_open=True)
        check_flag("random_start", self.random_start)
        check_flag("early_stop", self.early_stop)
        check_flag("eps_schedule", self.eps_schedule)
        check_positive_int("eot_iter", self.eot_iter)

    def first_step(self, norm: Norm) -> float:
        """The initial step size as a multiple of eps: ``initial_step``, else the reference's 2 (linf, l2) or 1
        (l1)."""
        if self.initial_step is not None:
            return self.initial_step
        return 1.0 if norm is Norm.L1 else 2.0


@dataclass(frozen=True)
class APGDConfig(_APGDOptions):
    """Options of :class:`APGD`. Defaults are the paper's and the reference code's.

    Attributes:
        steps: iterations per restart (100); each restart costs ``steps + 1`` gradient evaluations.
        restarts: random restarts (1, as in standard AutoAttack); each runs on the examples still unbroken.
        rho: a step size is halved when at most a fraction ``rho`` (0.75) of the steps since the last checkpoint
            increased the loss (the reference tests ``count <= rho * interval``; the paper writes ``<``).
        momentum: alpha, the weight of the new gradient step against the previous move (0.75; l1 steps have none,
            as the reference).
        initial_step: the initial step size as a multiple of eps (None: the reference's 2 for linf and l2, 1 for
            l1).
        random_start: start each restart from a random point (always on in the reference): uniform in the ball
            for linf and l2, a Gaussian draw projected onto ball and box for l1 (the reference's).
        early_stop: stop each example at its first success and skip clean-misclassified ones (evaluation).
        eps_schedule: l1 only (linf and l2 ignore it): the "Mind the box" schedule AutoAttack uses for l1
            (``use_largereps``): 30% of the steps at 3 eps, 30% at 2 eps, the rest at eps, each stage starting
            from the previous stage's best point; only the last stage's successes count.
        eot_iter: gradients averaged per step (expectation over transformation for randomized models; 1). Each
            is counted; the loss and logits are the last draw's, as the reference.
        loss: "ce" (default) or "dlr"; with explicit targets the goal makes them targeted (-CE of the target,
            targeted DLR).
    """

    loss: str = "ce"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.loss, str) or self.loss.lower() not in _LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r} for APGD: choose one of {', '.join(_LOSSES)}")


@dataclass(frozen=True)
class APGDTargetedConfig(_APGDOptions):
    """Options of :class:`APGDTargeted` (APGD-T). Defaults are standard AutoAttack's.

    Attributes:
        steps: iterations per run (100); each run costs ``steps + 1`` gradient evaluations.
        restarts: runs per target class (1).
        rho, momentum, initial_step, random_start, early_stop, eps_schedule, eot_iter: as in :class:`APGDConfig`.
        n_target_classes: how many target classes to try, in decreasing order of the clean logits (9); capped
            at the number of classes minus one.
    """

    n_target_classes: int = 9

    def validate(self) -> None:
        super().validate()
        check_positive_int("n_target_classes", self.n_target_classes)


State = dict[str, Tensor]


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Per-example ``where``: rows of ``a`` where ``mask``, else rows of ``b``."""
    return torch.where(rows_like(mask, a), a, b)


class _Record:
    """Best point per example over all runs, and where each example was first broken."""

    def __init__(self, x: Tensor) -> None:
        self.best = BestTracker(x)
        self.run = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        self.iteration = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)

    def update(self, x_adv: Tensor, success: Tensor, loss: Tensor, index: Tensor, run: int, iteration: int) -> None:
        self.best.update(x_adv, success, loss, index)
        fresh = index[success]
        fresh = fresh[self.run[fresh] < 0]
        self.run[fresh] = run
        self.iteration[fresh] = iteration

    def mark_clean(self, x: Tensor, success: Tensor) -> None:
        """Examples that meet the goal without any perturbation."""
        self.best.update(x, success, torch.full_like(success, -math.inf, dtype=x.dtype))

    def extras(self, clean: Tensor) -> dict[str, Any]:
        return {"run": self.run, "iterations": self.iteration, "clean_success": clean}


@dataclass
class _Job:
    """What one run needs besides its threat model: the oracle, the batch, the examples ``index``, the goal its loss
    aims at (``loss_goal``) and the one that counts as success (``goal``; both for the rows of ``index``)."""

    oracle: GradientOracle
    x_all: Tensor
    index: Tensor
    loss_goal: Goal
    goal: Goal
    loss_fn: AttackLoss
    record: _Record
    run: int


class _APGDBase(Attack[GradientOracle]):
    """What APGD and APGD-T share: one APGD run on a subset of the batch."""

    access = Access.GRADIENT
    norms = frozenset({Norm.LINF, Norm.L2, Norm.L1})

    config: _APGDOptions

    def _apgd_run(
        self,
        oracle: GradientOracle,
        x_all: Tensor,
        index: Tensor,
        loss_goal: Goal,
        goal: Goal,
        loss_fn: AttackLoss,
        threat: ThreatModel,
        generator: torch.Generator,
        record: _Record,
        run: int,
    ) -> None:
        """APGD on the examples ``index``: ``loss_goal`` defines the loss, ``goal`` (same rows) the success."""
        config = self.config
        if threat.norm is Norm.L1:
            job = _Job(oracle, x_all, index, loss_goal, goal, loss_fn, record, run)
            self._l1_attack(job, threat, generator)
            return
        x = x_all[index]
        x_adv = threat.random_start(x, generator) if config.random_start else x.clone()
        loss, logits, grad = self._gradient(oracle, x_adv, loss_goal, loss_fn, index)
        success = goal.is_success(logits)
        record.update(x_adv, success, loss, index, run, 0)
        state = self._start_state(index, x, x_adv, loss, grad, config.first_step(threat.norm) * threat.eps)
        checkpoints = apgd_checkpoints(config.steps)
        # Each checkpoint w_j (j >= 1) with the number of steps since the previous one.
        intervals = {point: point - previous for previous, point in itertools.pairwise(checkpoints)}

        for i in range(config.steps):
            if config.early_stop and bool(success.any()):
                keep = ~success
                if not bool(keep.any()):
                    return
                state = {name: value[keep] for name, value in state.items()}
                loss_goal, goal = loss_goal.subset(keep), goal.subset(keep)
            x_new = self._momentum_step(state, threat, 1.0 if i == 0 else config.momentum)
            loss, logits, grad = self._gradient(oracle, x_new, loss_goal, loss_fn, state["index"])
            success = goal.is_success(logits)
            record.update(x_new, success, loss, state["index"], run, i + 1)
            self._observe(state, x_new, loss, grad)
            if i + 1 in intervals:
                self._checkpoint(state, intervals[i + 1])

    @staticmethod
    def _start_state(index: Tensor, x: Tensor, x_adv: Tensor, loss: Tensor, grad: Tensor, eta: float) -> State:
        """The per-example state of a run at its start point ``x_adv`` (loss and gradient there)."""
        n = int(index.numel())
        return {
            "index": index,
            "x": x,
            "x_adv": x_adv,
            "x_prev": x_adv,
            "grad": grad,
            "eta": torch.full((n,), eta, dtype=x.dtype, device=x.device),
            # The best point of this run (highest loss), where halving the step size restarts from.
            "x_max": x_adv,
            "loss_max": loss,
            "grad_max": grad,
            # Loss of the previous iterate, and how many steps since the last checkpoint increased it.
            "loss_prev": loss,
            "increases": torch.zeros(n, dtype=torch.long, device=x.device),
            "loss_max_at_check": loss,
            "halved_at_check": torch.ones(n, dtype=torch.bool, device=x.device),
        }

    @staticmethod
    def _momentum_step(state: State, threat: ThreatModel, alpha: float) -> Tensor:
        """``z = P(x_k + eta s(g_k))``, then ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))``."""
        x, x_adv, x_prev = state["x"], state["x_adv"], state["x_prev"]
        eta = rows_like(state["eta"], x)
        z = threat.project(x_adv + eta * threat.steepest_ascent(state["grad"]), x)
        return threat.project(x_adv + alpha * (z - x_adv) + (1.0 - alpha) * (x_adv - x_prev), x)

    @staticmethod
    def _observe(state: State, x_new: Tensor, loss: Tensor, grad: Tensor) -> None:
        """Move to ``x_new``: count a loss increase, keep the run's best point, shift the iterates."""
        state["increases"] = state["increases"] + (loss > state["loss_prev"]).long()
        state["loss_prev"] = loss
        better = loss > state["loss_max"]
        state["x_max"] = _where(better, x_new, state["x_max"])
        state["grad_max"] = _where(better, grad, state["grad_max"])
        state["loss_max"] = torch.where(better, loss, state["loss_max"])
        state["x_prev"], state["x_adv"], state["grad"] = state["x_adv"], x_new, grad

    def _gradient(
        self, oracle: GradientOracle, x: Tensor, goal: Goal, loss_fn: AttackLoss, index: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Loss, logits and gradient at ``x``; with ``eot_iter > 1`` the mean of that many gradients (the loss and
        logits of the last draw, as the reference)."""
        loss, logits, grad = oracle.loss_and_grad(x, goal, loss_fn, index)
        for _ in range(self.config.eot_iter - 1):
            loss, logits, more = oracle.loss_and_grad(x, goal, loss_fn, index)
            grad = grad + more
        return loss, logits, grad / self.config.eot_iter if self.config.eot_iter > 1 else grad

    # ------------------------------------------------------------------------------------------- l1
    def _l1_attack(self, job: _Job, threat: ThreatModel, generator: torch.Generator) -> None:
        """One l1 run ("Mind the box"): from a random start, or through the 3 eps / 2 eps / eps schedule."""
        config = self.config
        x = job.x_all[job.index]
        start = x.clone()
        if config.random_start:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            first = threat.with_eps(3 * threat.eps) if config.eps_schedule else threat
            start = first.project(x + noise, x)  # the reference: a Gaussian draw projected onto ball and box
        if not config.eps_schedule:
            self._l1_run(job, threat, config.steps, start, fresh=True, counts=True)
            return
        stages = [math.ceil(0.3 * config.steps), math.ceil(0.3 * config.steps)]
        stages.append(config.steps - sum(stages))
        for stage, (factor, steps) in enumerate(zip((3.0, 2.0, 1.0), stages, strict=True)):
            stage_threat = threat.with_eps(factor * threat.eps)
            start = stage_threat.project(start, x)
            start = self._l1_run(job, stage_threat, steps, start, fresh=False, counts=stage == 2)

    def _l1_run(
        self, job: _Job, threat: ThreatModel, steps: int, start: Tensor, *, fresh: bool, counts: bool
    ) -> Tensor:
        """``steps`` sparse l1 steps from ``start`` inside ``threat``; successes are recorded when ``counts`` (the
        eps stage). Returns each example's point of highest loss (for the next stage of the schedule).

        Each step moves ``eta`` (l1) along the signs of the gradient's largest coordinates, a fraction ``topk``
        of them (0.2 at a fresh start; else the start's sparsity / 1.5), then projects onto ball and box; no
        momentum. Every ``max(int(0.04 * steps), 1)`` steps, an example whose best point became sparser (its
        number of changed coordinates fell below 95% of the last check's) restarts from its best point with
        ``eta = eps`` (times ``initial_step``, 1 by default); the others divide ``eta`` by 1.5 (not below a tenth of
        that); ``topk`` becomes the best point's sparsity / 1.5.
        """
        x = job.x_all[job.index]
        base = self.config.first_step(Norm.L1) * threat.eps
        loss, logits, grad = self._gradient(job.oracle, start, job.loss_goal, job.loss_fn, job.index)
        success = job.goal.is_success(logits) & counts
        if counts:
            job.record.update(start, success, loss, job.index, job.run, 0)
        dim = float(x[0].numel())
        changed = (start - x).reshape(x.shape[0], -1).ne(0).sum(dim=1).to(x.dtype)
        state: State = {
            "index": job.index, "x": x, "x_adv": start, "grad": grad, "x_max": start, "loss_max": loss,
            "grad_max": grad, "eta": torch.full_like(loss, base),
            "topk": torch.full_like(loss, 0.2) if fresh else changed / dim / 1.5,
            "sparsity": torch.full_like(loss, dim) if fresh else changed,
        }  # fmt: skip
        loss_goal, goal = job.loss_goal, job.goal
        interval = max(int(0.04 * steps), 1)
        for i in range(steps):
            if counts and self.config.early_stop and bool(success.any()):
                keep = ~success
                if not bool(keep.any()):
                    break
                state = {name: value[keep] for name, value in state.items()}
                loss_goal, goal = loss_goal.subset(keep), goal.subset(keep)
            x_new = self._l1_step(state, threat)
            loss, logits, grad = self._gradient(job.oracle, x_new, loss_goal, job.loss_fn, state["index"])
            success = goal.is_success(logits) & counts
            if counts:
                job.record.update(x_new, success, loss, state["index"], job.run, i + 1)
            better = loss > state["loss_max"]
            state["x_max"] = _where(better, x_new, state["x_max"])
            state["grad_max"] = _where(better, grad, state["grad_max"])
            state["loss_max"] = torch.where(better, loss, state["loss_max"])
            state["x_adv"], state["grad"] = x_new, grad
            if (i + 1) % interval == 0:
                self._l1_checkpoint(state, base)
        return state["x_max"]

    @staticmethod
    def _l1_step(state: State, threat: ThreatModel) -> Tensor:
        """``P(x_k + eta * s / ||s||_1)`` with ``s`` the signs of the gradient's top-``topk`` coordinates."""
        grad = state["grad"].reshape(state["grad"].shape[0], -1)
        dim = grad.shape[1]
        position = torch.clamp((1.0 - state["topk"]) * dim, min=0, max=dim - 1).long()
        threshold = grad.abs().sort(dim=1).values.gather(1, position[:, None])
        signs = (grad * (grad.abs() >= threshold)).sign()
        direction = signs / (signs.abs().sum(dim=1, keepdim=True) + 1e-10)
        x_adv = state["x_adv"]
        return threat.project(x_adv + rows_like(state["eta"], x_adv) * direction.reshape(x_adv.shape), state["x"])

    @staticmethod
    def _l1_checkpoint(state: State, base: float) -> None:
        """Adapt ``topk`` and ``eta`` (within ``[base / 10, base]``) to the best point's sparsity (see
        :meth:`_l1_run`)."""
        x = state["x"]
        changed = (state["x_max"] - x).reshape(x.shape[0], -1).ne(0).sum(dim=1).to(x.dtype)
        sparser = changed < 0.95 * state["sparsity"]
        state["topk"] = changed / float(x[0].numel()) / 1.5
        reset = torch.full_like(state["eta"], base)
        state["eta"] = torch.where(sparser, reset, state["eta"] / 1.5).clamp(base / 10, base)
        state["sparsity"] = changed
        state["x_adv"] = _where(sparser, state["x_max"], state["x_adv"])
        state["grad"] = _where(sparser, state["grad_max"], state["grad"])

    def _checkpoint(self, state: State, interval: int) -> None:
        """At a checkpoint ``interval`` steps after the previous one: halve the step size of an example that
        oscillates or stalls (module docstring), and restart it from its best point."""
        oscillating = state["increases"].to(state["x"].dtype) <= self.config.rho * interval
        stalled = ~state["halved_at_check"] & (state["loss_max_at_check"] >= state["loss_max"])
        halve = oscillating | stalled
        state["halved_at_check"] = halve
        state["loss_max_at_check"] = state["loss_max"]
        state["increases"] = torch.zeros_like(state["increases"])
        state["eta"] = torch.where(halve, state["eta"] / 2, state["eta"])
        # Restart from the best point; the momentum term then uses x_max - x_prev, as the reference.
        state["x_adv"] = _where(halve, state["x_max"], state["x_adv"])
        state["grad"] = _where(halve, state["grad_max"], state["grad"])


@register_attack
class APGD(_APGDBase):
    """Auto-PGD (Croce & Hein 2020): PGD with momentum and checkpointed step-size halving, CE or DLR loss."""

    name = "apgd"
    Config = APGDConfig
    config: APGDConfig

    def _perturb(
        self, oracle: GradientOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        loss_fn = attack_loss(self.config.loss)
        record = _Record(x)
        everyone = torch.arange(x.shape[0], device=x.device)
        clean = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if self.config.early_stop:
            clean = goal.is_success(oracle.logits(x, everyone))
            record.mark_clean(x, clean)
        for restart in range(self.config.restarts):
            index = (~record.best.success).nonzero().flatten() if self.config.early_stop else everyone
            if index.numel() == 0:
                break
            subgoal = goal.subset(index)
            self._apgd_run(oracle, x, index, subgoal, subgoal, loss_fn, threat, generator, record, restart)
        return record.best.x, record.extras(clean)


@register_attack
class APGDTargeted(_APGDBase):
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss toward the top classes, untargeted success."""

    name = "apgd-t"
    Config = APGDTargetedConfig
    config: APGDTargetedConfig
    supports_targeted = False

    def _perturb(
        self, oracle: GradientOracle, x: Tensor, goal: Goal, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        num_classes = oracle.num_classes
        if num_classes is None or num_classes < 4:
            raise ConfigError(f"APGD-T uses the targeted DLR loss, which needs at least 4 classes (got {num_classes})")
        loss_fn = attack_loss("dlr")
        record = _Record(x)
        everyone = torch.arange(x.shape[0], device=x.device)
        clean_logits = oracle.logits(x, everyone)
        clean = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if self.config.early_stop:
            clean = goal.is_success(clean_logits)
            record.mark_clean(x, clean)
        # Other classes by decreasing clean logit (the true class is never a target, even when misclassified).
        ranked = clean_logits.scatter(1, goal.labels[:, None], -math.inf).argsort(dim=1, descending=True, stable=True)
        run = 0
        for k in range(min(self.config.n_target_classes, num_classes - 1)):
            for _ in range(self.config.restarts):
                index = (~record.best.success).nonzero().flatten() if self.config.early_stop else everyone
                if index.numel() == 0:
                    break
                subgoal = goal.subset(index)
                loss_goal = Goal(subgoal.labels, ranked[index, k])
                self._apgd_run(oracle, x, index, loss_goal, subgoal, loss_fn, threat, generator, record, run)
                run += 1
        return record.best.x, record.extras(clean)
