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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.api import attack as run_attack
from robustlab.attacks.registry import get_attack
from robustlab.data import ArrayDataset
from robustlab.errors import ConfigError, InvalidInputError, StateFileError
from robustlab.evaluation.diagnostics import (
    Diagnostic,
    check_gradients,
    check_probabilities,
    check_randomized,
    check_train_mode,
    large_eps_radius,
)
from robustlab.evaluation.suites import FOCUS_MINIMUM, Suite, SuiteStep, get_suite
from robustlab.evaluation.wrappers import ExpectationOverTransformation, LogOutputs, with_bpda
from robustlab.oracles import Access, LabelOracle, ScoreOracle, check_model_takes
from robustlab.state_io import load_state_file, save_atomic
from robustlab.threat import Norm, ThreatModel

__all__ = ["EvaluationResult", "StepReport", "evaluate"]

STATE_FORMAT = "robustlab-evaluation-state-v2"
SQUARE_RESTARTS = 3  # at most, when a gradient-free attack beat the gradient attacks


@dataclass
class StepReport:
    """What one attack of the cascade did."""

    label: str
    method: str
    options: dict[str, Any]
    candidates: int = 0  # examples still unbroken when the step started (it attacked all or, if focused, some)
    attacked: int = 0
    broken: int = 0
    robust_accuracy_after: float = math.nan
    seconds: float = 0.0
    queries: int = 0
    gradients: int = 0
    added_by: str = ""  # the diagnostic that added this step, if any
    queries_to_success: list[int] = field(default_factory=list)


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


def _fingerprint(model: nn.Module | LabelOracle, x: Tensor, threat: ThreatModel, suite: Suite, seed: int) -> str:
    digest = hashlib.sha256()
    if isinstance(model, nn.Module):
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(f"{float(tensor.double().sum()):.10e}".encode())
    else:
        digest.update(repr(getattr(model.model, "url", type(model.model).__name__)).encode())
    digest.update(f"{x.shape}{float(x.double().sum()):.10e}{threat}{suite}{seed}".encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def _predict(model: nn.Module | LabelOracle, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
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
    y_all = y_all.long().cpu()
    x_all = x_all.cpu()
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    base_suite = get_suite(suite, threat.norm)
    white_box = isinstance(model, nn.Module)
    if not white_box:
        if not isinstance(model, LabelOracle):
            raise ConfigError(f"model must be a torch.nn.Module or a robustlab oracle, got {type(model).__name__}")
        allowed = {Access.LABELS} | ({Access.SCORES} if isinstance(model, ScoreOracle) else set())
        kept = tuple(s for s in base_suite.steps if get_attack(s.method).access in allowed)
        if not kept:
            raise ConfigError(
                f"no attack of suite {base_suite.name!r} works with {model.access.value} access; use a custom suite "
                "of score-based or hard-label attacks (e.g. Suite.custom(['square', 'rays']))"
            )
        base_suite = Suite(base_suite.name, kept)
        diagnostics = False
    if adbd_queries is None and base_suite.name == "full":
        adbd_queries = 10_000
    param = next((p for p in model.parameters()), None) if isinstance(model, nn.Module) else None
    run_device = (
        torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    )
    n = int(x_all.shape[0])
    world, rank = _world()
    progress = progress and rank == 0

    from tqdm.auto import tqdm

    train_mode = (
        _adapt(check_train_mode(model), "evaluated in eval mode; the modes were restored afterwards")
        if isinstance(model, nn.Module)
        else None
    )
    with _eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext():
        report: list[Diagnostic] = []
        if isinstance(model, LabelOracle):
            report.append(
                Diagnostic(
                    "black_box_access",
                    True,
                    f"the model is reached with {model.access.value} access only",
                    "Gradient attacks and the gradient-based checks cannot run; the numbers come from score-based "
                    "or hard-label attacks alone and are upper bounds on the robust accuracy white-box attacks "
                    "would find.",
                    "ran only the suite's " + ", ".join(s.label for s in base_suite.steps),
                )
            )
        attack_model: Any = model
        extra_steps: list[SuiteStep] = []
        probe_x = x_all[: min(n, 64)].to(run_device)
        probe_y = y_all[: min(n, 64)].to(run_device)
        if isinstance(model, nn.Module) and n > 0:
            check_model_takes(model, probe_x[:2])  # a model/data mismatch named here, not deep inside an attack
        if diagnostics and isinstance(model, nn.Module) and train_mode is not None:
            report.append(train_mode)
            probabilities = check_probabilities(model, probe_x)
            if probabilities.fired:
                attack_model = LogOutputs(attack_model).eval()
                probabilities.action = "attacks use log(outputs), which are logits up to a constant per example"
            report.append(probabilities)
            randomized = check_randomized(attack_model, probe_x)
            if randomized.fired:
                attack_model = ExpectationOverTransformation(attack_model, eot_samples).eval()
                randomized.action = (
                    f"every query averages the logits of {eot_samples} forward passes (EOT); predictions and the final "
                    "check use the same average"
                )
            report.append(randomized)
        if bpda:
            attack_model = with_bpda(attack_model, bpda)
        if diagnostics:
            gradients = check_gradients(attack_model, probe_x, probe_y, threat)
            if gradients.fired:
                extra_steps += _gradient_free_steps(threat.norm, extra_queries)
                gradients.action = (
                    "added " + ", ".join(s.label for s in extra_steps) + " to the suite"
                    + ("" if bpda else "; name a non-differentiable layer with bpda=[...] to attack through it")
                )  # fmt: skip
            report.append(gradients)
        active_suite = base_suite.plus(*extra_steps) if extra_steps else base_suite

        clean_pred = _predict(attack_model, x_all, batch_size, run_device)
        clean_correct = clean_pred == y_all
        margins_known = isinstance(attack_model, nn.Module)  # an oracle's scores would cost counted queries

        state_path = Path(checkpoint) if checkpoint is not None else None
        identity = _fingerprint(model, x_all, threat, active_suite, seed)
        state = _load_state(state_path, identity) if (state_path is not None and resume) else None
        if state is None:
            state = {
                "format": STATE_FORMAT,
                "identity": identity,
                "broken": torch.zeros(n, dtype=torch.bool),
                "x_adv": x_all.clone(),
                "broken_by": torch.full((n,), -1, dtype=torch.long),
                "margin": (
                    _margins(attack_model, x_all, clean_pred, batch_size, run_device)
                    if margins_known
                    else torch.full((n,), math.inf)
                ),
                "done": {},  # step index -> number of finished batches
                "steps": [StepReport(s.label, s.method, dict(s.options)) for s in active_suite.steps],
                "remaining_at_start": {},
            }

        def run_steps(steps: Sequence[SuiteStep], first_index: int, added_by: str = "") -> None:
            for offset, step in enumerate(steps):
                index = first_index + offset
                if index >= len(state["steps"]):
                    state["steps"].append(StepReport(step.label, step.method, dict(step.options), added_by=added_by))
                info = get_attack(step.method)
                record: StepReport = state["steps"][index]
                if index not in state["remaining_at_start"]:
                    unbroken = (~state["broken"]).nonzero().flatten()
                    record.candidates = len(unbroken)
                    state["remaining_at_start"][index] = _select(step, index, unbroken, state, margins_known)
                remaining = state["remaining_at_start"][index]
                batches = [remaining[i : i + batch_size] for i in range(0, len(remaining), batch_size)]
                done = state["done"].get(index, 0)
                bar = tqdm(range(done, len(batches)), desc=step.label, unit="batch", disable=not progress, leave=False)
                mine: list[dict[str, Any]] = []
                for number in bar:
                    if number % world != rank:
                        continue  # another process attacks this batch
                    rows = batches[number]
                    batch_started = time.perf_counter()
                    target = _for_access(attack_model, info.access)
                    result = run_attack(
                        target, x_all[rows].to(run_device), clean_pred[rows].to(run_device), threat, step.method,
                        seed=seed + 1000 * index + number, **dict(step.options),
                    )  # fmt: skip
                    success = result.success.cpu()
                    margin = torch.full((len(rows),), math.inf)
                    if margins_known and not bool(success.all()):
                        # The attack's best point for each example it failed on: how close it came.
                        margin[~success] = _margins(
                            attack_model, result.x_adv[~result.success], clean_pred[rows][~success], batch_size,
                            run_device,
                        )  # fmt: skip
                    outcome = {
                        "number": number,
                        "rows": rows,
                        "success": success,
                        "margin": margin,
                        "x_adv": result.x_adv.cpu()[result.success.cpu()],
                        "seconds": time.perf_counter() - batch_started,
                        "queries": result.queries.cpu(),
                        "gradients": int(result.gradients.sum()) if result.gradients is not None else 0,
                    }
                    if world == 1:
                        _merge(state, record, index, outcome)
                        _save_state(state_path, state)
                    else:
                        mine.append(outcome)
                if world > 1:
                    # Each process attacked every world-th batch with the same seeds as one process would; merging
                    # in batch order gives every process the single-process state.
                    gathered: list[Any] = [None] * world
                    torch.distributed.all_gather_object(gathered, mine)
                    for outcome in sorted((o for part in gathered for o in part), key=lambda o: o["number"]):
                        _merge(state, record, index, outcome)
                    if rank == 0:
                        _save_state(state_path, state)
                record.robust_accuracy_after = float((clean_correct & ~state["broken"]).float().mean())

        run_steps(active_suite.steps, 0)
        steps_run = len(active_suite.steps)

        if diagnostics:
            verdict = _black_box_verdict(state["steps"], active_suite)
            if verdict.fired:
                # AutoAttack's advice for this signature: more Square iterations and restarts. A focused Square
                # widens to the next-weakest examples it has not attacked; an unfocused one restarts with fresh
                # seeds. Either continues (the suite's Square budget) while the last round still broke something;
                # only if the last allowed round still did does RayS (label-only, a different search) get the
                # larger budget.
                squares = [s for s in active_suite.steps if s.method == "square"]  # ran, so the access allows it
                square_budget = int(squares[-1].options.get("queries", extra_queries)) if squares else 0
                focus = squares[-1].focus if squares and margins_known else 1.0
                actions: list[str] = []
                still_finding, restarts = True, 0
                while squares and still_finding and restarts < SQUARE_RESTARTS:
                    restarts += 1
                    if focus < 1.0:
                        label = f"Square widened {restarts} ({square_budget:,} queries, next-weakest {100 * focus:g}%)"
                        step = SuiteStep(label, "square", {"queries": square_budget}, focus, fresh_examples=True)
                    else:
                        label = f"Square restart {restarts} ({square_budget:,} queries)"
                        step = SuiteStep(label, "square", {"queries": square_budget})
                    run_steps([step], steps_run, added_by="black_box_beats_white_box")
                    still_finding = state["steps"][steps_run].broken > 0
                    actions.append(f"{label}: {state['steps'][steps_run].broken} more broken")
                    steps_run += 1
                has_rays = any(s.method == "rays" for s in active_suite.steps)
                if still_finding and not has_rays and threat.norm is Norm.LINF:
                    budget = 2 * extra_queries
                    run_steps(
                        [SuiteStep(f"RayS ({budget:,} queries)", "rays", {"queries": budget})], steps_run,
                        added_by="black_box_beats_white_box",
                    )  # fmt: skip
                    actions.append(f"RayS ({budget:,} queries): {state['steps'][steps_run].broken} more broken")
                    steps_run += 1
                rounds = "widening stops" if focus < 1.0 else "restarts stop"
                verdict.action = (
                    "ran " + "; ".join(actions) + f" ({rounds} at the first that breaks nothing)"
                    if actions
                    else "nothing to add: the suite has no Square to restart and RayS already ran (or the norm is not "
                    "linf)"
                )
            report.append(verdict)
            report.append(_large_eps_check(attack_model, x_all, clean_pred, threat, run_device, seed))

        # Final re-verification: only adversarial examples a fresh forward pass confirms are counted.
        final_pred = _predict(attack_model, state["x_adv"], batch_size, run_device)
        verified = final_pred != clean_pred
        claimed = state["broken"]
        if bool((claimed & ~verified).any()):
            lost = int((claimed & ~verified).sum())
            warnings.warn(
                f"{lost} adversarial example(s) did not survive the final re-check (a randomized model?); they are "
                "counted as robust",
                stacklevel=2,
            )
        broken = claimed & verified
        robust = clean_correct & ~broken
        x_adv = torch.where(broken.reshape(-1, *([1] * (x_all.dim() - 1))), state["x_adv"], x_all)
        distance = threat.distance(x_adv, x_all)

        adbd = None
        if adbd_queries is not None and threat.norm is Norm.LINF:
            adbd = _adbd(attack_model, x_all, y_all, threat, adbd_queries, adbd_examples, batch_size, run_device, seed)

        curve = None
        if eps_curve:
            curve = _eps_curve(attack_model, x_all, y_all, clean_pred, threat, eps_curve, batch_size, run_device, seed)

    if state_path is not None and state_path.exists() and rank == 0:
        state_path.unlink()  # finished: nothing left to resume
    return EvaluationResult(
        threat=threat,
        suite=active_suite.name,
        x=x_all,
        clean_pred=clean_pred,
        adv_pred=torch.where(broken, final_pred, clean_pred),
        labels=y_all,
        clean_correct=clean_correct,
        broken=broken,
        robust=robust,
        x_adv=x_adv,
        broken_by=torch.where(broken, state["broken_by"], torch.full_like(state["broken_by"], -1)),
        distance=distance,
        steps=state["steps"],
        diagnostics=report,
        eps_curve=curve,
        adbd=adbd,
        wall_time=time.perf_counter() - started,
    )


def _merge(state: dict[str, Any], record: StepReport, index: int, outcome: dict[str, Any]) -> None:
    """Fold one attacked batch into the cascade state."""
    rows, success = outcome["rows"], outcome["success"]
    fresh = rows[success]
    state["broken"][fresh] = True
    state["x_adv"][fresh] = outcome["x_adv"]
    state["broken_by"][fresh] = index
    state["margin"][rows] = torch.minimum(state["margin"][rows], outcome["margin"])
    record.attacked += len(rows)
    record.broken += int(success.sum())
    record.seconds += outcome["seconds"]
    record.queries += int(outcome["queries"].sum())
    record.gradients += outcome["gradients"]
    record.queries_to_success += [int(q) for q in outcome["queries"][success]]
    state["done"][index] = max(state["done"].get(index, 0), outcome["number"] + 1)


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


def _select(step: SuiteStep, index: int, unbroken: Tensor, state: dict[str, Any], margins_known: bool) -> Tensor:
    """The examples step ``index`` attacks: the unbroken ones, narrowed by its ``fresh_examples`` and ``focus``."""
    eligible = unbroken
    if step.fresh_examples:
        seen = [
            state["remaining_at_start"][j]
            for j, earlier in enumerate(state["steps"][:index])
            if earlier.method == step.method and j in state["remaining_at_start"]
        ]
        if seen:
            eligible = eligible[~torch.isin(eligible, torch.cat(seen))]
    if step.focus >= 1.0 or not margins_known:
        return eligible
    count = min(len(eligible), max(math.ceil(step.focus * len(unbroken)), FOCUS_MINIMUM))
    weakest = torch.argsort(state["margin"][eligible], stable=True)[:count]
    return eligible[weakest].sort().values  # data order: batches do not depend on the margins' ties


def _world() -> tuple[int, int]:
    """(world size, rank) of an initialized process group, else (1, 0): evaluations shard across torchrun ranks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _adapt(diagnostic: Diagnostic, action: str) -> Diagnostic:
    if diagnostic.fired:
        diagnostic.action = action
    return diagnostic


def _for_access(model: nn.Module, access: Access) -> nn.Module:
    # A plain module: the attack base wraps it at exactly the access level the attack declares.
    return model


def _gradient_free_steps(norm: Norm, queries: int) -> list[SuiteStep]:
    steps = [
        SuiteStep("APGD-DLR (margin-based loss)", "apgd", {"steps": 100, "loss": "dlr"}),
        SuiteStep(f"Square ({queries:,} queries)", "square", {"queries": queries}),
    ]
    if norm is Norm.LINF:
        steps.append(SuiteStep(f"RayS ({2 * queries:,} queries)", "rays", {"queries": 2 * queries}))
    return [s for s in steps if s.supports(norm)]


def _black_box_verdict(steps: list[StepReport], suite: Suite) -> Diagnostic:
    white = {i for i, s in enumerate(suite.steps) if get_attack(s.method).access is Access.GRADIENT}
    black = [s for i, s in enumerate(steps[: len(suite.steps)]) if i not in white]
    black_broken = sum(s.broken for s in black)
    left = max((s.candidates for s in black), default=0)
    attacked = max((s.attacked for s in black), default=0)
    # A stray example or two is common even on honest models (Square is in AutoAttack's cascade for a reason); a
    # gradient-free attack breaking more than 1% of what the gradient attacks left is the masking signature.
    fired = black_broken >= 2 and black_broken > 0.01 * left
    scope = f"the {left} examples" if attacked == left else f"the {attacked} weakest of the {left} examples"
    return Diagnostic(
        "black_box_beats_white_box",
        fired,
        f"gradient-free attacks broke {black_broken} of {scope} every gradient attack failed on"
        if attacked
        else "no gradient-free attack ran",
        "A gradient-free attack sees strictly less than a gradient attack. When it succeeds where gradient attacks "
        "failed, the gradients are misleading (masked or obfuscated), and the white-box numbers overestimate "
        "robustness.",
    )


def _large_eps_check(
    model: nn.Module, x: Tensor, clean_pred: Tensor, threat: ThreatModel, device: torch.device, seed: int
) -> Diagnostic:
    radius = large_eps_radius(threat)
    big = ThreatModel(threat.norm, radius, threat.lower, threat.upper)
    count = min(len(x), 100)
    result = run_attack(
        model, x[:count].to(device), clean_pred[:count].to(device), big, "apgd", steps=50, seed=seed, loss="dlr"
    )
    survived = float((~result.success).float().mean())
    fired = survived > 0.05
    return Diagnostic(
        "large_eps",
        fired,
        f"at eps={radius:g} (half the input box), {100 * survived:.0f}% of {count} predictions survived APGD-DLR",
        "With eps this large any input can be turned into one of another class, so an attack must succeed on "
        "(almost) every example. If it does not, the attack is being misled, and every robust accuracy it "
        "reports is suspect.",
    )


def _eps_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    clean_pred: Tensor,
    threat: ThreatModel,
    values: Sequence[float],
    batch_size: int,
    device: torch.device,
    seed: int,
) -> tuple[list[float], list[float]]:
    robust = []
    correct = clean_pred == y
    for eps in values:
        step = ThreatModel(threat.norm, eps, threat.lower, threat.upper)
        broken = torch.zeros(len(x), dtype=torch.bool)
        for start in range(0, len(x), batch_size):
            rows = slice(start, start + batch_size)
            result = run_attack(
                model, x[rows].to(device), clean_pred[rows].to(device), step, "apgd", steps=20, seed=seed + start
            )
            broken[rows] = result.success.cpu()
        robust.append(float((correct & ~broken).float().mean()))
    return list(values), robust


def _adbd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    queries: int,
    examples: int,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> float:
    """Average Linf decision-boundary distance found by RayS, over correctly classified examples."""
    from robustlab.attacks.rays import average_boundary_distance

    results = []
    rows = torch.arange(min(len(x), examples))
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        results.append(
            run_attack(
                model,
                x[part].to(device),
                y[part].to(device),
                threat,
                "rays",
                mode="adbd",
                queries=queries,
                seed=seed + start,
            )
        )
    distances = torch.cat([r.extras["boundary_distance"].cpu() for r in results])
    correct = torch.cat([r.extras["clean_correct"].cpu() for r in results])
    if not bool(correct.any()):
        return math.nan
    return average_boundary_distance(results[0]) if len(results) == 1 else float(distances[correct].mean())


def _save_state(path: Path | None, state: dict[str, Any]) -> None:
    if path is None:
        return
    payload = dict(state)
    payload["steps"] = [dataclasses.asdict(s) for s in state["steps"]]
    save_atomic(payload, path)


def _load_state(path: Path, identity: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = load_state_file(
        path,
        what="an evaluation state",
        fix="Delete it, or start over with resume=False (CLI: --no-resume)",
    )
    if state.get("format") != STATE_FORMAT or state.get("identity") != identity:
        warnings.warn(f"{path} holds the state of another evaluation; starting over", stacklevel=3)
        return None
    try:
        state["steps"] = [StepReport(**s) for s in state["steps"]]
    except (KeyError, TypeError) as exc:
        raise StateFileError(
            f"{path} is an evaluation state with damaged step records ({exc}); delete it, or start over with "
            "resume=False (CLI: --no-resume)"
        ) from exc
    return state
