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

The data is read by index, batch by batch (:class:`~robustlab.evaluation.examples.Examples`): the evaluation keeps
per-example numbers (predictions, margins, what broke) in memory, and for streamed data (an image folder, an
archive, a memory-mapped array) the adversarial examples go to a row file on disk, so memory does not grow with the
data set. Data in memory and the same data streamed from disk give the same result, bit for bit.

:func:`evaluate` runs these phases in order, each a named function or method:

1. diagnose and adapt (:func:`robustlab.evaluation.adapt.diagnose_and_adapt`): the checks, and the active suite;
2. the cascade (:class:`Cascade`): a pass over the data for the clean predictions, then each stage attacks its
   selected examples in batches, saving a :class:`~robustlab.evaluation.state.CascadeState` after each; across
   torchrun ranks the batches are shared out;
3. black-box escalation (:func:`_escalate_black_box`): Square restarts or widening, then RayS, when gradient-free
   attacks beat the gradient ones;
4. final verification (:meth:`Cascade.verify`): a fresh forward pass re-checks every claimed success;
5. extras (:mod:`robustlab.evaluation.extras`): ADBD and the eps curve; then the result (:meth:`Cascade.result`).
"""

from __future__ import annotations

import contextlib
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
from robustlab.attacks.registry import get_attack
from robustlab.checks import check_integer, check_positive_int
from robustlab.errors import ConfigError
from robustlab.evaluation.adapt import NOT_ADAPTED, diagnose_and_adapt, restrict_to_access
from robustlab.evaluation.diagnostics import (
    Diagnostic,
    check_black_box_beats_white_box,
    check_large_eps,
    check_train_mode,
)
from robustlab.evaluation.examples import Examples, FileStore, MemoryStore, open_store
from robustlab.evaluation.extras import average_boundary_distance, robust_accuracy_curve
from robustlab.evaluation.minimum_norm import minimum_norm_request, run_minimum_norm
from robustlab.evaluation.result import EvaluationResult
from robustlab.evaluation.state import STATE_FORMAT, BatchOutcome, CascadeState, StepReport
from robustlab.evaluation.suites import FOCUS_MINIMUM, Suite, SuiteStep, get_suite, with_surrogate_steps
from robustlab.evaluation.wrappers import draws_per_query
from robustlab.oracles import Access, LabelOracle
from robustlab.threat import Norm, ThreatModel
from robustlab.utils import model_device, model_mode, process_group, rows_like

__all__ = ["STATE_FORMAT", "Cascade", "CascadeState", "EvaluationResult", "StepReport", "evaluate"]

SQUARE_RESTARTS = 3  # at most, when a gradient-free attack beat the gradient attacks
ADBD_QUERIES_FULL = 10_000  # the full suite's RayS budget for the average decision-boundary distance
PROBE_EXAMPLES = 64  # the diagnostics look at the first examples only
LARGE_EPS_EXAMPLES = 100  # examples of the large-eps check


# evaluate() is over 80 lines because its docstring documents each of its options; the body is the phases, in order.
def evaluate(
    model: nn.Module | LabelOracle,
    data: Any,
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
    workers: int = 0,
    adversarial_file: str | Path | None = None,
    minimum_norm: str | tuple[str, dict[str, Any]] | None = None,
    surrogates: Sequence[nn.Module] = (),
) -> EvaluationResult:
    """Evaluate ``model``'s robustness on ``data`` inside ``threat`` with an attack suite.

    Args:
        model: a classifier returning logits (probabilities are detected and handled), or a black-box oracle
            (e.g. :func:`robustlab.remote.connect` to a URL): then only the suite's attacks that its access level
            allows run, and the gradient-based diagnostics are skipped.
        data: ``(x, y)`` tensors or an :class:`~robustlab.data.ArrayDataset` (held in memory), or any data set of
            ``(image, label)`` read by index — an image folder, CIFAR archive or array file from
            :func:`robustlab.data.open_dataset`, or your own ``torch.utils.data.Dataset`` — which is streamed: read
            batch by batch, never whole. Inputs must lie inside the threat model's box.
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
        workers: processes reading streamed data ahead of the attacks (``DataLoader`` workers; 0: none).
        adversarial_file: the ``.npy`` file the adversarial examples go to (one row per example). Default: for
            streamed data, ``<checkpoint>.adversarial.npy`` next to a checkpoint, else a temporary file that lives
            as long as the result; data in memory keeps them in memory. A resume needs the file of the run it
            resumes.
        minimum_norm: also run this minimum-norm attack (``"fmn"``, ``"fab"``, ``"ddn"``, ``"cw-l2"``, or a
            ``(name, options)`` pair) without eps on the correctly classified examples: robust accuracy against eps
            as a curve and the median smallest perturbation, from one run (:mod:`robustlab.evaluation.minimum_norm`).
        surrogates: models the attacker owns (white-box), for a black-box ``model`` only: the cascade then opens
            with a transfer attack (one query per example) and P-RGF (10,000 queries) with them as the prior,
            as the oracle's access allows (:func:`robustlab.evaluation.suites.with_surrogate_steps`).
    """
    started = time.perf_counter()
    _check_options(batch_size, seed, eot_samples, extra_queries, adbd_queries, adbd_examples, workers)
    if not isinstance(threat, ThreatModel):
        raise ConfigError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
    check_positive_int("limit", limit, allow_none=True)
    base_suite = get_suite(suite, threat.norm)
    if minimum_norm is not None:
        minimum_norm_request(minimum_norm, threat.norm)  # a bad request fails now, not after the cascade
    if surrogates:
        base_suite = with_surrogate_steps(base_suite, model, len(surrogates), threat.norm)
    if not isinstance(model, nn.Module):  # a black box: the attacks its access allows, no gradient checks
        base_suite, diagnostics = restrict_to_access(model, base_suite), False
    if adbd_queries is None and base_suite.name == "full":
        adbd_queries = ADBD_QUERIES_FULL
    run_device = torch.device(device) if device is not None else _default_device(model)
    examples = Examples(data, threat, limit, workers=workers, device=run_device)
    if adversarial_file is None and checkpoint is not None and not examples.in_memory:
        adversarial_file = Path(str(checkpoint) + ".adversarial.npy")
    train_mode = check_train_mode(model) if isinstance(model, nn.Module) else None
    with model_mode(model, "eval") if isinstance(model, nn.Module) else contextlib.nullcontext():
        probe_x, probe_y = examples.first(PROBE_EXAMPLES if diagnostics else 2)  # 2: the model/data check
        adapted = diagnose_and_adapt(
            model, probe_x, probe_y, threat, base_suite, device=run_device, train_mode=train_mode,
            diagnostics=diagnostics, bpda=bpda, eot_samples=eot_samples, extra_queries=extra_queries,
        )  # fmt: skip
        cascade = Cascade.start(
            model, adapted.model, examples, threat, adapted.suite, batch_size=batch_size, seed=seed,
            device=run_device, checkpoint=checkpoint, resume=resume, progress=progress, store_path=adversarial_file,
            surrogates=tuple(surrogates), verifier=adapted.verifier,
        )  # fmt: skip
        cascade.run()
        if diagnostics:
            adapted.report.append(_escalate_black_box(cascade, extra_queries))
            charge_diagnostics(adapted.report, cascade.state.steps)
            first_x, _ = examples.first(LARGE_EPS_EXAMPLES)
            adapted.report.append(check_large_eps(adapted.model, first_x, cascade.clean_pred, threat, run_device, seed))
        broken, final_pred, distance = cascade.verify()
        adbd = None
        if adbd_queries is not None and threat.norm is Norm.LINF:
            adbd = average_boundary_distance(
                adapted.model, examples, threat, adbd_queries, adbd_examples, batch_size, run_device, seed
            )
        curve = None
        if eps_curve:
            curve = robust_accuracy_curve(
                adapted.model, examples, cascade.clean_pred, threat, eps_curve, batch_size, run_device, seed
            )
        smallest = None if minimum_norm is None else run_minimum_norm(
            adapted.model, examples, cascade.clean_pred, threat, minimum_norm, batch_size, run_device, seed
        )  # fmt: skip
    cascade.finish()
    elapsed = time.perf_counter() - started
    result = cascade.result(adapted.report, broken, final_pred, distance, curve, adbd, elapsed)
    result.minimum_norm = smallest
    return result


def charge_diagnostics(report: Sequence[Diagnostic], steps: Sequence[StepReport]) -> None:
    """Add to each diagnostic the seconds and breaks of the stages it added (``fired, cost X s, broke N more``)."""
    for verdict in report:
        added = [s for s in steps if s.added_by == verdict.name]
        verdict.seconds += sum(s.seconds for s in added)
        verdict.broke = sum(s.broken for s in added)


def _check_options(
    batch_size: int,
    seed: int,
    eot_samples: int,
    extra_queries: int,
    adbd_queries: int | None,
    adbd_examples: int,
    workers: int,
) -> None:
    check_positive_int("batch_size", batch_size)
    check_integer("seed", seed)
    check_positive_int("eot_samples", eot_samples)
    check_positive_int("extra_queries", extra_queries)
    check_positive_int("adbd_queries", adbd_queries, allow_none=True)
    check_positive_int("adbd_examples", adbd_examples)
    check_positive_int("workers", workers, minimum=0)


def _default_device(model: nn.Module | LabelOracle) -> torch.device:
    """A module's device (the CPU for one without weights); the CPU for an oracle."""
    found = model_device(model) if isinstance(model, nn.Module) else None
    return found if found is not None else torch.device("cpu")


def _fingerprint(
    model: nn.Module | LabelOracle, data: str, threat: ThreatModel, suite: Suite, seed: int,
    surrogates: Sequence[nn.Module] = (),
) -> str:  # fmt: skip
    """The identity of an evaluation: a saved state is resumed only by the same model (and surrogates), data,
    threat, suite, seed. ``data`` describes the examples (count, shape, and the sum of their values)."""
    digest = hashlib.sha256()
    for module in [model, *surrogates]:
        if not isinstance(module, nn.Module):
            continue
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(f"{float(tensor.double().sum()):.10e}".encode())
    if not isinstance(model, nn.Module):
        digest.update(repr(getattr(model.model, "url", type(model.model).__name__)).encode())
    digest.update(f"{data}{threat}{suite}{seed}".encode())
    return digest.hexdigest()[:16]


def _predict(model: nn.Module | LabelOracle, x: Tensor, device: torch.device) -> Tensor:
    """Predicted labels of one batch, on the CPU (a black box's labels are counted as audit queries)."""
    chunk = x.to(device, non_blocking=True)
    if isinstance(model, LabelOracle):
        return model.bind(len(chunk), device).audit_labels(chunk).cpu()
    with torch.no_grad():
        return model(chunk).argmax(1).cpu()


def _margins_of(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example logit of ``labels`` minus the largest other logit (negative: misclassified), on the CPU."""
    logits = logits.float()
    label = labels.to(logits.device)[:, None]
    own = logits.gather(1, label)[:, 0]
    other = logits.scatter(1, label, -math.inf).amax(1)
    return (own - other).cpu()


def _margins(model: nn.Module, x: Tensor, labels: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """:func:`_margins_of` the model's logits on ``x``, in batches."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size].to(device))
            parts.append(_margins_of(logits, labels[start : start + batch_size]))
    return torch.cat(parts) if parts else torch.empty(0)


@dataclass
class _CleanPass:
    """What one pass over the data gives: labels, clean predictions, margins, and a description for fingerprints."""

    labels: Tensor
    clean_pred: Tensor
    margin: Tensor
    description: str


def _clean_pass(model: Any, examples: Examples, batch_size: int, device: torch.device) -> _CleanPass:
    """Read every example once, in batches: check it, predict it, and (for a module) its margin."""
    labels, preds, margins = [], [], []
    total = 0.0
    with torch.no_grad():
        for rows, x, y in examples.in_order(batch_size):
            x = examples.checked(x, rows)
            total += float(x.double().sum())
            labels.append(y)
            if isinstance(model, nn.Module):
                logits = model(x.to(device, non_blocking=True))
                pred = logits.argmax(1).cpu()
                margins.append(_margins_of(logits, pred))
            else:  # an oracle's scores would cost counted queries: margins unknown
                pred = _predict(model, x, device)
                margins.append(torch.full((len(rows),), math.inf))
            preds.append(pred)
    description = f"{len(examples)} x {examples.image_shape} sum {total:.10e}"
    return _CleanPass(torch.cat(labels), torch.cat(preds), torch.cat(margins), description)


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
    if step.gated and index > 0:
        if state.steps[index - 1].broken == 0:
            return eligible[:0]  # the tier's sample broke nothing: the escalation stops here
        if index - 1 in state.remaining_at_start:  # the sample's examples were attacked already
            eligible = eligible[~torch.isin(eligible, state.remaining_at_start[index - 1])]
    if step.focus >= 1.0 or not margins_known:
        return eligible
    count = min(len(eligible), max(math.ceil(step.focus * len(unbroken)), FOCUS_MINIMUM))
    weakest = torch.argsort(state.margin[eligible], stable=True)[:count]
    return eligible[weakest].sort().values  # data order: batches do not depend on the margins' ties


@dataclass
class Cascade:
    """One evaluation's cascade: what every stage shares (the model as attacks see it, the examples, the clean
    predictions), and the :class:`CascadeState` the stages update and checkpoint.

    Under torchrun (an initialized process group), each process attacks every ``world``-th batch of a stage with
    the seeds one process would use, and the outcomes are merged in batch order: every process ends with the
    single-process state.
    """

    model: Any  # nn.Module (possibly wrapped by the diagnostics) or a LabelOracle
    examples: Examples
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
    surrogates: tuple[nn.Module, ...] = ()  # given to the steps whose attack needs_surrogate
    verifier: Any = None  # what re-checks successes at the end (None: ``model``)
    draws: int = 1  # forward passes of the underlying model per query of ``model`` (EOT, smoothing)

    @classmethod
    def start(
        cls,
        model: nn.Module | LabelOracle,
        attack_model: Any,
        examples: Examples,
        threat: ThreatModel,
        suite: Suite,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        checkpoint: str | Path | None,
        resume: bool,
        progress: bool,
        store_path: str | Path | None = None,
        surrogates: tuple[nn.Module, ...] = (),
        verifier: nn.Module | None = None,
    ) -> Cascade:
        """Predict the clean labels (one pass over the data), then resume the state saved at ``checkpoint`` for this
        evaluation (``model``'s weights, the data, threat, suite and seed) or start a fresh one."""
        world, rank = process_group()
        clean = _clean_pass(attack_model, examples, batch_size, device)
        state_path = Path(checkpoint) if checkpoint is not None else None
        identity = _fingerprint(model, clean.description, threat, suite, seed, surrogates)
        like = examples.data.x if examples.in_memory else None
        store = open_store(examples, store_path, like=like)
        # stacklevel 3 from here: the warning names the line that called evaluate().
        state = (
            CascadeState.load(state_path, identity, store, stacklevel=3) if state_path is not None and resume else None
        )
        if state is None:
            reports = [StepReport(s.label, s.method, dict(s.options), added_by=s.added_by) for s in suite.steps]
            state = CascadeState.start(identity, len(examples), store, clean.margin, reports)
        return cls(
            attack_model, examples, clean.labels, clean.clean_pred, threat, suite, state, state_path, batch_size,
            seed, device, progress=progress and rank == 0, world=world, rank=rank, surrogates=surrogates,
            verifier=verifier, draws=draws_per_query(attack_model),
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
        mine = [n for n in range(state.done.get(index, 0), len(batches)) if n % self.world == self.rank]
        loaded = self.examples.batches([batches[n] for n in mine])  # other processes attack the other batches
        outcomes: list[BatchOutcome] = []
        for number, (x, _) in zip(
            tqdm(mine, desc=step.label, unit="batch", disable=not self.progress, leave=False), loaded
        ):
            outcome = self._attack_batch(step, index, number, batches[number], x)
            if self.world == 1:
                state.merge(index, outcome)
                state.save(self.state_path)
            else:
                outcomes.append(outcome)
        if self.world > 1:
            self._merge_shards(index, outcomes)
        record.robust_accuracy_after = float((self.clean_correct & ~state.broken).float().mean())
        return record

    def _attack_batch(self, step: SuiteStep, index: int, number: int, rows: Tensor, x: Tensor) -> BatchOutcome:
        """Attack batch ``number`` of stage ``index`` (examples ``rows``, images ``x``); its seed depends only on that
        position (exact resumes). Adversarial examples go straight to a file store, before the state counts them."""
        started = time.perf_counter()
        clean_pred = self.clean_pred[rows]
        options = dict(step.options)
        if get_attack(step.method).needs_surrogate:
            options["surrogate"] = list(self.surrogates)
        result = run_attack(
            self.model, x.to(self.device, non_blocking=True), clean_pred.to(self.device), self.threat, step.method,
            seed=self.seed if self.suite.same_seed else self.seed + 1000 * index + number, **options,
        )  # fmt: skip
        success = result.success.cpu()
        if self.verifier is not None and bool(success.any()):
            # What the attacks saw (an EOT average, logits under a removed output layer) is not the model: a claim
            # the real model rejects must not keep the example from the later stages.
            claimed = success.clone()
            success[claimed] = _predict(self.verifier, result.x_adv[result.success], self.device) != clean_pred[claimed]
        margin = torch.full((len(rows),), math.inf)
        if self.margins_known and not bool(success.all()):
            # The attack's best point for each example it failed on: how close it came.
            failed = result.x_adv[~success.to(result.x_adv.device)]
            margin[~success] = _margins(self.model, failed, clean_pred[~success], self.batch_size, self.device)
        found = result.x_adv.cpu()[success]
        if isinstance(self.state.store, FileStore):
            self.state.store.write(rows[success], found)
        return BatchOutcome(
            number=number,
            rows=rows,
            success=success,
            margin=margin,
            x_adv=None if isinstance(self.state.store, FileStore) else found,
            seconds=time.perf_counter() - started,
            queries=result.queries.cpu() * self.draws,  # every draw of a randomized or smoothed model counts
            gradients=int(result.gradients.sum()) if result.gradients is not None else 0,
        )

    def _merge_shards(self, index: int, mine: list[BatchOutcome]) -> None:
        """Merge every process's batches of stage ``index`` in batch order; rank 0 saves the state. (A file store
        already has every process's rows: each wrote its own before this exchange.)"""
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, mine)
        for outcome in sorted((o for part in gathered for o in part), key=lambda o: o.number):
            self.state.merge(index, outcome)
        if self.rank == 0:
            self.state.save(self.state_path)

    def verify(self) -> tuple[Tensor, Tensor, Tensor]:
        """Final re-verification: (broken, predictions on the adversarial examples, distances). Only adversarial
        examples a fresh forward pass confirms count as broken; the store ends with every example's final answer
        (the adversarial example, or the clean input)."""
        claimed = self.state.broken
        predictions, distances = [], []
        store = self.state.store
        for rows, x, _ in self.examples.in_order(self.batch_size):
            index = torch.from_numpy(rows)
            broken_here = claimed[index]
            x_adv = x.clone()
            if bool(broken_here.any()):
                x_adv[broken_here] = store.read(index[broken_here]).to(x.dtype)
            predictions.append(_predict(self.model if self.verifier is None else self.verifier, x_adv, self.device))
            confirmed = broken_here & (predictions[-1] != self.clean_pred[index])
            final = torch.where(rows_like(confirmed, x), x_adv, x)
            distances.append(self.threat.distance(final, x).cpu())
            if self.rank == 0:
                store.write_final(rows, final)
        final_pred, distance = torch.cat(predictions), torch.cat(distances)
        lost = claimed & ~(final_pred != self.clean_pred)
        if bool(lost.any()):
            warnings.warn(
                f"{int(lost.sum())} adversarial example(s) did not survive the final re-check (a randomized model?); "
                "they are counted as robust",
                stacklevel=3,  # the line that called evaluate()
            )
        return claimed & ~lost, final_pred, distance

    def tried_hard(self, robust: Tensor) -> dict[str, float]:
        """Per kind of attack (gradient, score, label): the fraction of the ``robust`` examples a stage of that kind
        attacked (1.0 when none is robust)."""
        total = int(robust.sum())
        attacked: dict[str, Tensor] = {kind.value: torch.zeros_like(robust) for kind in Access}
        for index, rows in self.state.remaining_at_start.items():
            if index < len(self.state.steps) and len(rows):
                attacked[get_attack(self.state.steps[index].method).access.value][rows] = True
        return {kind: float((hit & robust).sum()) / total if total else 1.0 for kind, hit in attacked.items()}

    def finish(self) -> None:
        """A finished evaluation leaves nothing to resume: remove the state file (rank 0)."""
        if self.state_path is not None and self.state_path.exists() and self.rank == 0:
            self.state_path.unlink()

    def result(
        self,
        diagnostics: list[Diagnostic],
        broken: Tensor,
        final_pred: Tensor,
        distance: Tensor,
        curve: tuple[list[float], list[float]] | None,
        adbd: float | None,
        wall_time: float,
    ) -> EvaluationResult:
        """The :class:`EvaluationResult`: verified ``broken`` examples keep their adversarial example, the others
        the clean input."""
        store = self.state.store
        shared_file = self.world > 1 and isinstance(store, FileStore)
        if shared_file:
            torch.distributed.barrier()  # process 0 has written every final row
        adversarial = store.final(broken, self.examples.data.x if isinstance(store, MemoryStore) else None)
        if shared_file:
            torch.distributed.barrier()  # every process has mapped the file before process 0 may remove a temporary one
        broken_by = self.state.broken_by
        robust = self.clean_correct & ~broken
        result = EvaluationResult(
            threat=self.threat,
            suite=self.suite.name,
            clean_pred=self.clean_pred,
            adv_pred=torch.where(broken, final_pred, self.clean_pred),
            labels=self.labels,
            clean_correct=self.clean_correct,
            broken=broken,
            robust=self.clean_correct & ~broken,
            broken_by=torch.where(broken, broken_by, torch.full_like(broken_by, -1)),
            distance=distance,
            steps=self.state.steps,
            diagnostics=diagnostics,
            eps_curve=curve,
            adbd=adbd,
            wall_time=wall_time,
            examples=self.examples.data,
            adversarial=adversarial,
            adversarial_file=store.path if isinstance(store, FileStore) else None,
            store=store,
            tried_hard=self.tried_hard(robust),
        )
        store.close()  # the result maps the file on its own
        return result


def _escalate_black_box(cascade: Cascade, extra_queries: int) -> Diagnostic:
    """The black-box-beats-white-box check, and its answer when it fires.

    AutoAttack's advice for this signature: more Square iterations and restarts. A focused Square widens to the
    next-weakest examples it has not attacked; an unfocused one restarts with fresh seeds. Either continues (the
    suite's Square budget) while the last round still broke something, at most :data:`SQUARE_RESTARTS` rounds; only
    if the last allowed round still did does RayS (label-only, a different search) get the larger budget.
    """
    suite = cascade.suite
    verdict = check_black_box_beats_white_box(cascade.state.steps, suite)
    if not verdict.fired or not suite.adaptive:
        verdict.action = verdict.action or (NOT_ADAPTED.format(suite=suite.name) if verdict.fired else "")
        return verdict
    squares = [s for s in suite.steps if s.method == "square"]  # ran, so the access allows it
    squares = [s for s in squares if not s.added_by] or squares  # the suite's own Square sets the widening
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
