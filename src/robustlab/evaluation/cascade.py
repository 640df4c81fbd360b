"""``robustlab.evaluate``: how robust is a model, really?

The evaluation runs a suite of attacks as a cascade — each attack only on the examples every earlier attack
failed to break — and keeps, per example, the first adversarial example found (the per-example worst case). Attacks
target the model's *clean prediction*, so one pass gives both metrics of Wu et al. (2021): perturbation stability
(the prediction did not change under attack) and robust accuracy (correct and stable). The cascade also keeps, per
example, the smallest margin (clean prediction's logit minus the best other logit) at any point an attack
returned: a focused step (:class:`SuiteStep` ``focus``) spends its budget on the examples with the smallest
margins.

Before attacking, diagnostics look for the ways a model can look robust without being so (probabilities instead
of logits, train mode, randomness, broken gradients); when one fires, the evaluation adapts — log-outputs, eval
mode, expectation over transformation, BPDA for named layers, more gradient-free budget — and says so. After the
cascade it checks that gradient-free attacks did not beat gradient attacks and that robust accuracy collapses at
a large eps. Every reported adversarial example is re-verified by a fresh forward pass at the end.

State is checkpointed after every attack batch: an evaluation killed and restarted with the same checkpoint file
resumes where it stopped and ends with the same numbers (each batch's randomness depends only on its position).

:func:`evaluate` runs these phases in order, each a named function or method:

1. diagnose and adapt (:func:`robustlab.evaluation.adapt.diagnose_and_adapt`): the checks, and the active suite;
2. the cascade (:class:`Cascade`): each stage attacks its selected examples in batches, saving a
   :class:`~robustlab.evaluation.state.CascadeState` after each; across torchrun ranks the batches are shared out;
3. black-box escalation (:func:`_escalate_black_box`): Square restarts or widening, then RayS, when gradient-free
   attacks beat the gradient ones;
4. final verification (:meth:`Cascade.verify`): a fresh forward pass re-checks every claimed success;
5. extras (:mod:`robustlab.evaluation.extras`): ADBD and the eps curve; then the result (:meth:`Cascade.result`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.api import attack as run_attack
from robustlab.checks import check_integer, check_positive_int
from robustlab.data import ArrayDataset
from robustlab.errors import ConfigError, InvalidInputError
from robustlab.evaluation.adapt import diagnose_and_adapt, restrict_to_access
from robustlab.evaluation.diagnostics import (
    Diagnostic,
    check_black_box_beats_white_box,
    check_large_eps,
    check_train_mode,
)
from robustlab.evaluation.extras import average_boundary_distance, robust_accuracy_curve
from robustlab.evaluation.state import STATE_FORMAT, BatchOutcome, CascadeState, StepReport
from robustlab.evaluation.suites import FOCUS_MINIMUM, Suite, SuiteStep, get_suite
from robustlab.oracles import LabelOracle
from robustlab.threat import Norm, ThreatModel
from robustlab.utils import model_device, model_mode, process_group, rows_like

__all__ = ["STATE_FORMAT", "Cascade", "CascadeState", "EvaluationResult", "StepReport", "evaluate"]

SQUARE_RESTARTS = 3  # at most, when a gradient-free attack beat the gradient attacks
ADBD_QUERIES_FULL = 10_000  # the full suite's RayS budget for the average decision-boundary distance


@dataclass
class EvaluationResult:
    """The outcome of :func:`evaluate`. Per-example tensors are on the CPU, in data order.

    Attributes:
        clean_correct: the clean prediction is right.
        broken: the prediction changed under attack (re-verified at the end).
        robust: correct and not broken (robust accuracy is its mean).
        x: the clean inputs evaluated; clean_pred and adv_pred: predictions on ``x`` and ``x_adv``.
        x_adv: the first adversarial example found per example, or the clean input where none was.
        broken_by: index of the cascade step that broke each example (-1: none).
        distance: distance of ``x_adv`` to the clean input in the threat model's norm.
        steps: per-attack reports in cascade order; diagnostics: every check's verdict.
        eps_curve: (eps values, robust accuracy) from the quick suite, when requested.
        adbd: average decision-boundary distance from RayS over correctly classified examples (full suite).
    """

    threat: ThreatModel
    suite: str
    x: Tensor
    clean_pred: Tensor
    adv_pred: Tensor
    labels: Tensor
    clean_correct: Tensor
    broken: Tensor
    robust: Tensor
    x_adv: Tensor
    broken_by: Tensor
    distance: Tensor
    steps: list[StepReport]
    diagnostics: list[Diagnostic]
    eps_curve: tuple[list[float], list[float]] | None
    adbd: float | None
    wall_time: float

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_correct.float().mean())

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.float().mean())

    @property
    def stability(self) -> float:
        """Fraction of examples whose prediction the attacks could not change."""
        return float((~self.broken).float().mean())

    def summary(self) -> dict[str, Any]:
        broken = self.broken & self.clean_correct
        return {
            "suite": self.suite,
            "norm": self.threat.norm.value,
            "eps": self.threat.eps,
            "examples": int(self.labels.shape[0]),
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "perturbation_stability": self.stability,
            "attack_success_rate": float(broken.sum()) / max(int(self.clean_correct.sum()), 1),
            "mean_distance_broken": float(self.distance[broken].mean()) if bool(broken.any()) else None,
            "adbd": self.adbd,
            "cascade": [dataclasses.asdict(s) | {"queries_to_success": None} for s in self.steps],
            "diagnostics": [d.as_dict() for d in self.diagnostics],
            "eps_curve": None if self.eps_curve is None else {"eps": self.eps_curve[0], "robust": self.eps_curve[1]},
            "wall_time_s": self.wall_time,
        }


def evaluate(
    model: nn.Module | LabelOracle,
    data: ArrayDataset | tuple[Tensor, Tensor],
    threat: ThreatModel,
    suite: str | Suite = "standard",
    *,
    batch_size: int = 256,
    seed: int = 0,
    limit: int | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = True,
    diagnostics: bool = True,
    bpda: Sequence[str] = (),
    eot_samples: int = 10,
    eps_curve: Sequence[float] | None = None,
    adbd_queries: int | None = None,
    adbd_examples: int = 200,
    extra_queries: int = 5000,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> EvaluationResult:
    """Evaluate ``model``'s robustness on ``data`` inside ``threat`` with an attack suite.

    Args:
        model: a classifier returning logits (probabilities are detected and handled), or a black-box oracle
            (e.g. :func:`robustlab.remote.connect` to a URL): then only the suite's attacks that its access level
            allows run, and the gradient-based diagnostics are skipped.
        data: an :class:`ArrayDataset` or ``(x, y)`` tensors inside the threat model's box.
        threat: the threat model, e.g. ``ThreatModel("linf", 8 / 255)``.
        suite: "quick", "standard" (default), "full", or a :class:`Suite` built from the registry.
        batch_size: examples per attack call. seed: base seed; results are reproducible.
        limit: evaluate only the first ``limit`` examples.
        checkpoint: a file to keep the state in; an existing state of the same evaluation is resumed.
        diagnostics: run the masking checks and adapt the suite (strongly recommended).
        bpda: names of non-differentiable submodules to bypass in the backward pass (identity BPDA).
        eot_samples: forward passes averaged per query when the model is randomized.
        eps_curve: also measure robust accuracy at these eps values with the quick suite (a curve for reports).
        extra_queries: query budget of the gradient-free attacks a diagnostic adds (RayS gets twice as many).
        adbd_queries: also run RayS to this budget on up to ``adbd_examples`` correctly classified examples and
            report the average decision-boundary distance (Linf only; the full suite sets 10,000).
        progress: show progress bars. device: where to run (default: the model's device).
    """
    started = time.perf_counter()
    x_all, y_all = _evaluation_data(data, threat, limit)
    _check_options(batch_size, seed, eot_samples, extra_queries, adbd_queries, adbd_examples)
    base_suite = get_suite(suite, threat.norm)
    if not isinstance(model, nn.Module):  # a black box: the attacks its access allows, no gradient checks
        base_suite, diagnostics = restrict_to_access(model, base_suite), False
    if adbd_queries is None and base_suite.name == "full":
        adbd_queries = ADBD_QUERIES_FULL
    run_device = torch.device(device) if device is not None else _default_device(model)
    train_mode = check_train_mode(model) if isinstance(model, nn.Module) else None
    with model_mode(model, "eval") if isinstance(model, nn.Module) else contextlib.nullcontext():
        adapted = diagnose_and_adapt(
            model, x_all, y_all, threat, base_suite, device=run_device, train_mode=train_mode,
            diagnostics=diagnostics, bpda=bpda, eot_samples=eot_samples, extra_queries=extra_queries,
        )  # fmt: skip
        cascade = Cascade.start(
            model, adapted.model, x_all, y_all, threat, adapted.suite, batch_size=batch_size, seed=seed,
            device=run_device, checkpoint=checkpoint, resume=resume, progress=progress,
        )  # fmt: skip
        cascade.run()
        if diagnostics:
            adapted.report.append(_escalate_black_box(cascade, extra_queries))
            adapted.report.append(check_large_eps(adapted.model, x_all, cascade.clean_pred, threat, run_device, seed))
        broken, final_pred = cascade.verify()
        adbd = None
        if adbd_queries is not None and threat.norm is Norm.LINF:
            adbd = average_boundary_distance(
                adapted.model, x_all, y_all, threat, adbd_queries, adbd_examples, batch_size, run_device, seed
            )
        curve = None
        if eps_curve:
            curve = robust_accuracy_curve(
                adapted.model, x_all, y_all, cascade.clean_pred, threat, eps_curve, batch_size, run_device, seed
            )
    cascade.finish()
    return cascade.result(adapted.report, broken, final_pred, curve, adbd, time.perf_counter() - started)


def _evaluation_data(
    data: ArrayDataset | tuple[Tensor, Tensor], threat: ThreatModel, limit: int | None
) -> tuple[Tensor, Tensor]:
    """The inputs (checked against the threat model's box) and integer labels to evaluate, on the CPU."""
    if not isinstance(threat, ThreatModel):
        raise ConfigError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
    if isinstance(data, ArrayDataset):
        x_all, y_all = data.x, data.y
    elif isinstance(data, tuple) and len(data) == 2:
        x_all, y_all = data
    else:
        raise InvalidInputError("data must be an ArrayDataset or an (x, y) pair of tensors")
    if limit is not None:
        x_all, y_all = x_all[:limit], y_all[:limit]
    threat.check_inputs(x_all, name="evaluation data")
    return x_all.cpu(), y_all.long().cpu()


def _check_options(
    batch_size: int, seed: int, eot_samples: int, extra_queries: int, adbd_queries: int | None, adbd_examples: int
) -> None:
    check_positive_int("batch_size", batch_size)
    check_integer("seed", seed)
    check_positive_int("eot_samples", eot_samples)
    check_positive_int("extra_queries", extra_queries)
    check_positive_int("adbd_queries", adbd_queries, allow_none=True)
    check_positive_int("adbd_examples", adbd_examples)


def _default_device(model: nn.Module | LabelOracle) -> torch.device:
    """A module's device (the CPU for one without weights); the CPU for an oracle."""
    found = model_device(model) if isinstance(model, nn.Module) else None
    return found if found is not None else torch.device("cpu")


def _fingerprint(model: nn.Module | LabelOracle, x: Tensor, threat: ThreatModel, suite: Suite, seed: int) -> str:
    """The identity of an evaluation: a saved state is resumed only by the same model, data, threat, suite, seed."""
    digest = hashlib.sha256()
    if isinstance(model, nn.Module):
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(f"{float(tensor.double().sum()):.10e}".encode())
    else:
        digest.update(repr(getattr(model.model, "url", type(model.model).__name__)).encode())
    digest.update(f"{x.shape}{float(x.double().sum()):.10e}{threat}{suite}{seed}".encode())
    return digest.hexdigest()[:16]


def _predict(model: nn.Module | LabelOracle, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Predicted labels of ``x`` in batches, on the CPU."""
    if isinstance(model, LabelOracle):  # a black box: its labels, each row counted as an audit query
        out = []
        for i in range(0, len(x), batch_size):
            chunk = x[i : i + batch_size].to(device)
            out.append(model.bind(len(chunk), device).audit_labels(chunk).cpu())
        return torch.cat(out)
    with torch.no_grad():
        return torch.cat(
            [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
        )


def _margins(model: nn.Module, x: Tensor, labels: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Per-example logit of ``labels`` minus the largest other logit (negative: misclassified), on the CPU."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size].to(device)).float()
            label = labels[start : start + batch_size].to(logits.device)[:, None]
            own = logits.gather(1, label)[:, 0]
            other = logits.scatter(1, label, -math.inf).amax(1)
            parts.append((own - other).cpu())
    return torch.cat(parts) if parts else torch.empty(0)


def _select(step: SuiteStep, index: int, unbroken: Tensor, state: CascadeState, margins_known: bool) -> Tensor:
    """The examples step ``index`` attacks: the unbroken ones, narrowed by its ``fresh_examples`` and ``focus``."""
    eligible = unbroken
    if step.fresh_examples:
        seen = [
            state.remaining_at_start[j]
            for j, earlier in enumerate(state.steps[:index])
            if earlier.method == step.method and j in state.remaining_at_start
        ]
        if seen:
            eligible = eligible[~torch.isin(eligible, torch.cat(seen))]
    if step.focus >= 1.0 or not margins_known:
        return eligible
    count = min(len(eligible), max(math.ceil(step.focus * len(unbroken)), FOCUS_MINIMUM))
    weakest = torch.argsort(state.margin[eligible], stable=True)[:count]
    return eligible[weakest].sort().values  # data order: batches do not depend on the margins' ties


@dataclass
class Cascade:
    """One evaluation's cascade: what every stage shares (the model as attacks see it, the data, the clean
    predictions), and the :class:`CascadeState` the stages update and checkpoint.

    Under torchrun (an initialized process group), each process attacks every ``world``-th batch of a stage with
    the seeds one process would use, and the outcomes are merged in batch order: every process ends with the
    single-process state.
    """

    model: Any  # nn.Module (possibly wrapped by the diagnostics) or a LabelOracle
    x: Tensor
    labels: Tensor
    clean_pred: Tensor
    threat: ThreatModel
    suite: Suite
    state: CascadeState
    state_path: Path | None
    batch_size: int
    seed: int
    device: torch.device
    progress: bool
    world: int = 1
    rank: int = 0

    @classmethod
    def start(
        cls,
        model: nn.Module | LabelOracle,
        attack_model: Any,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        suite: Suite,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        checkpoint: str | Path | None,
        resume: bool,
        progress: bool,
    ) -> Cascade:
        """Predict the clean labels, then resume the state saved at ``checkpoint`` for this evaluation (``model``'s
        weights, the data, threat, suite and seed) or start a fresh one."""
        world, rank = process_group()
        clean_pred = _predict(attack_model, x, batch_size, device)
        margins_known = isinstance(attack_model, nn.Module)
        state_path = Path(checkpoint) if checkpoint is not None else None
        identity = _fingerprint(model, x, threat, suite, seed)
        # stacklevel 3 from here: the warning names the line that called evaluate().
        state = CascadeState.load(state_path, identity, stacklevel=3) if state_path is not None and resume else None
        if state is None:
            margin = (
                _margins(attack_model, x, clean_pred, batch_size, device)
                if margins_known
                else torch.full((len(x),), math.inf)  # an oracle's scores would cost counted queries
            )
            reports = [StepReport(s.label, s.method, dict(s.options)) for s in suite.steps]
            state = CascadeState.start(identity, x, margin, reports)
        return cls(
            attack_model, x, y, clean_pred, threat, suite, state, state_path, batch_size, seed, device,
            progress=progress and rank == 0, world=world, rank=rank,
        )  # fmt: skip

    @property
    def margins_known(self) -> bool:
        """Whether the margins may be looked at: free for a module, counted queries for an oracle."""
        return isinstance(self.model, nn.Module)

    @property
    def clean_correct(self) -> Tensor:
        return self.clean_pred == self.labels

    def run(self) -> None:
        """Run the suite's steps as the first stages, in order (each resumes where the state says it stopped)."""
        for index, step in enumerate(self.suite.steps):
            self.run_stage(step, index)

    def run_stage(self, step: SuiteStep, index: int, added_by: str = "") -> StepReport:
        """Attack the examples stage ``index`` selects (fixed when it first starts) in batches, from the first batch
        not merged yet, saving the state after each; returns the stage's report."""
        from tqdm.auto import tqdm

        state = self.state
        if index >= len(state.steps):
            state.steps.append(StepReport(step.label, step.method, dict(step.options), added_by=added_by))
        record = state.steps[index]
        if index not in state.remaining_at_start:
            unbroken = (~state.broken).nonzero().flatten()
            record.candidates = len(unbroken)
            state.remaining_at_start[index] = _select(step, index, unbroken, state, self.margins_known)
        remaining = state.remaining_at_start[index]
        batches = [remaining[i : i + self.batch_size] for i in range(0, len(remaining), self.batch_size)]
        numbers = range(state.done.get(index, 0), len(batches))
        mine: list[BatchOutcome] = []
        for number in tqdm(numbers, desc=step.label, unit="batch", disable=not self.progress, leave=False):
            if number % self.world != self.rank:
                continue  # another process attacks this batch
            outcome = self._attack_batch(step, index, number, batches[number])
            if self.world == 1:
                state.merge(index, outcome)
                state.save(self.state_path)
            else:
                mine.append(outcome)
        if self.world > 1:
            self._merge_shards(index, mine)
        record.robust_accuracy_after = float((self.clean_correct & ~state.broken).float().mean())
        return record

    def _attack_batch(self, step: SuiteStep, index: int, number: int, rows: Tensor) -> BatchOutcome:
        """Attack batch ``number`` of stage ``index``; its seed depends only on that position (exact resumes)."""
        started = time.perf_counter()
        clean_pred = self.clean_pred[rows]
        result = run_attack(
            self.model, self.x[rows].to(self.device), clean_pred.to(self.device), self.threat, step.method,
            seed=self.seed + 1000 * index + number, **dict(step.options),
        )  # fmt: skip
        success = result.success.cpu()
        margin = torch.full((len(rows),), math.inf)
        if self.margins_known and not bool(success.all()):
            # The attack's best point for each example it failed on: how close it came.
            failed = result.x_adv[~result.success]
            margin[~success] = _margins(self.model, failed, clean_pred[~success], self.batch_size, self.device)
        return BatchOutcome(
            number=number,
            rows=rows,
            success=success,
            margin=margin,
            x_adv=result.x_adv.cpu()[success],
            seconds=time.perf_counter() - started,
            queries=result.queries.cpu(),
            gradients=int(result.gradients.sum()) if result.gradients is not None else 0,
        )

    def _merge_shards(self, index: int, mine: list[BatchOutcome]) -> None:
        """Merge every process's batches of stage ``index`` in batch order; rank 0 saves the state."""
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, mine)
        for outcome in sorted((o for part in gathered for o in part), key=lambda o: o.number):
            self.state.merge(index, outcome)
        if self.rank == 0:
            self.state.save(self.state_path)

    def verify(self) -> tuple[Tensor, Tensor]:
        """Final re-verification: (broken, predictions on ``x_adv``). Only adversarial examples a fresh forward pass
        confirms count as broken."""
        final_pred = _predict(self.model, self.state.x_adv, self.batch_size, self.device)
        claimed = self.state.broken
        lost = claimed & ~(final_pred != self.clean_pred)
        if bool(lost.any()):
            warnings.warn(
                f"{int(lost.sum())} adversarial example(s) did not survive the final re-check (a randomized model?); "
                "they are counted as robust",
                stacklevel=3,  # the line that called evaluate()
            )
        return claimed & ~lost, final_pred

    def finish(self) -> None:
        """A finished evaluation leaves nothing to resume: remove the state file (rank 0)."""
        if self.state_path is not None and self.state_path.exists() and self.rank == 0:
            self.state_path.unlink()

    def result(
        self,
        diagnostics: list[Diagnostic],
        broken: Tensor,
        final_pred: Tensor,
        curve: tuple[list[float], list[float]] | None,
        adbd: float | None,
        wall_time: float,
    ) -> EvaluationResult:
        """The :class:`EvaluationResult`: verified ``broken`` examples keep their adversarial example, the others
        the clean input."""
        x_adv = torch.where(rows_like(broken, self.x), self.state.x_adv, self.x)
        broken_by = self.state.broken_by
        return EvaluationResult(
            threat=self.threat,
            suite=self.suite.name,
            x=self.x,
            clean_pred=self.clean_pred,
            adv_pred=torch.where(broken, final_pred, self.clean_pred),
            labels=self.labels,
            clean_correct=self.clean_correct,
            broken=broken,
            robust=self.clean_correct & ~broken,
            x_adv=x_adv,
            broken_by=torch.where(broken, broken_by, torch.full_like(broken_by, -1)),
            distance=self.threat.distance(x_adv, self.x),
            steps=self.state.steps,
            diagnostics=diagnostics,
            eps_curve=curve,
            adbd=adbd,
            wall_time=wall_time,
        )


def _escalate_black_box(cascade: Cascade, extra_queries: int) -> Diagnostic:
    """The black-box-beats-white-box check, and its answer when it fires.

    AutoAttack's advice for this signature: more Square iterations and restarts. A focused Square widens to the
    next-weakest examples it has not attacked; an unfocused one restarts with fresh seeds. Either continues (the
    suite's Square budget) while the last round still broke something, at most :data:`SQUARE_RESTARTS` rounds; only
    if the last allowed round still did does RayS (label-only, a different search) get the larger budget.
    """
    suite = cascade.suite
    verdict = check_black_box_beats_white_box(cascade.state.steps, suite)
    if not verdict.fired:
        return verdict
    squares = [s for s in suite.steps if s.method == "square"]  # ran, so the access allows it
    square_budget = int(squares[-1].options.get("queries", extra_queries)) if squares else 0
    focus = squares[-1].focus if squares and cascade.margins_known else 1.0
    added_by = "black_box_beats_white_box"
    actions: list[str] = []
    index = len(suite.steps)  # the next stage
    rounds, still_finding = 0, True
    while squares and still_finding and rounds < SQUARE_RESTARTS:
        rounds += 1
        step = _square_round(rounds, square_budget, focus)
        record = cascade.run_stage(step, index, added_by)
        still_finding = record.broken > 0
        actions.append(f"{step.label}: {record.broken} more broken")
        index += 1
    has_rays = any(s.method == "rays" for s in suite.steps)
    if still_finding and not has_rays and cascade.threat.norm is Norm.LINF:
        budget = 2 * extra_queries
        step = SuiteStep(f"RayS ({budget:,} queries)", "rays", {"queries": budget})
        actions.append(f"{step.label}: {cascade.run_stage(step, index, added_by).broken} more broken")
    stops = "widening stops" if focus < 1.0 else "restarts stop"
    verdict.action = (
        "ran " + "; ".join(actions) + f" ({stops} at the first that breaks nothing)"
        if actions
        else "nothing to add: the suite has no Square to restart and RayS already ran (or the norm is not linf)"
    )
    return verdict


def _square_round(number: int, budget: int, focus: float) -> SuiteStep:
    """Square's ``number``-th extra round: widened to the next-weakest examples when focused, else a restart."""
    if focus < 1.0:
        label = f"Square widened {number} ({budget:,} queries, next-weakest {100 * focus:g}%)"
        return SuiteStep(label, "square", {"queries": budget}, focus, fresh_examples=True)
    return SuiteStep(f"Square restart {number} ({budget:,} queries)", "square", {"queries": budget})
