"""The evaluation's first phase: diagnose the ways a model can look robust without being so, and adapt to them.

Before any attack, :func:`diagnose_and_adapt` runs the masking checks of :mod:`robustlab.evaluation.diagnostics`
on a probe of the data and answers each one that fires: a model returning probabilities is attacked through
log-outputs, a randomized one through expectation over transformation, named non-differentiable layers through
BPDA, and broken gradients add gradient-free attacks (with more budget) to the suite. A black box reached through
an oracle keeps only the suite's attacks its access level allows (:func:`restrict_to_access`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.attacks.registry import get_attack
from robustlab.errors import ConfigError, ModelError
from robustlab.evaluation.diagnostics import (
    Diagnostic,
    check_gradients,
    check_probabilities,
    check_randomized,
    has_input_gradient,
)
from robustlab.evaluation.suites import Suite, SuiteStep, escalation_tier
from robustlab.evaluation.usefulness import (
    Usefulness,
    flip_rate,
    gradient_usefulness,
    non_differentiable_modules,
    output_module,
    votes_for,
)
from robustlab.evaluation.wrappers import (
    ExpectationOverTransformation,
    LogOutputs,
    MajorityVote,
    NoiseSmoothedGradient,
    with_bpda,
    without_layers,
)
from robustlab.oracles import Access, LabelOracle, ScoreOracle, check_model_takes
from robustlab.threat import Norm, ThreatModel

__all__ = [
    "NOT_ADAPTED",
    "Adapted",
    "diagnose_and_adapt",
    "escalation_tiers",
    "gradient_free_steps",
    "restrict_to_access",
]

PROBE_EXAMPLES = 64  # the checks look at the first examples only
VERIFY_FACTOR = 3  # a randomized model's successes are re-checked by a majority of 3x the attacks' draws (+1)
SMOOTHING_SCALES = (0.25, 1.0)  # noise scales tried, as multiples of a per-coordinate eps
SMOOTHING_SAMPLES = 8
SMOOTHING_GAIN = 0.1  # smoothed gradients this much better correlated than raw ones: an oscillating mask
LABEL_AGREEMENT = 0.95  # an output layer is only hiding logits when removing it keeps this share of probe labels
NOT_ADAPTED = "not applied: suite {suite!r} runs exactly as defined (choose suite='standard' to let it adapt)"


@dataclass
class Adapted:
    """What the cascade attacks, after the diagnostics: the (wrapped) model, the suite and every check's verdict."""

    model: Any  # nn.Module (possibly wrapped) or the LabelOracle as given
    suite: Suite
    report: list[Diagnostic]
    verifier: nn.Module | None = None  # what re-checks successes (a majority vote for a randomized model)


def restrict_to_access(model: object, suite: Suite) -> Suite:
    """The steps of ``suite`` a black box reached through the oracle ``model`` allows (score-based and/or
    hard-label); anything but an oracle is an error."""
    if not isinstance(model, LabelOracle):
        raise ConfigError(f"model must be a torch.nn.Module or a robustlab oracle, got {type(model).__name__}")
    allowed = {Access.LABELS} | ({Access.SCORES} if isinstance(model, ScoreOracle) else set())
    kept = tuple(s for s in suite.steps if get_attack(s.method).access in allowed)
    if not kept:
        raise ConfigError(
            f"no attack of suite {suite.name!r} works with {model.access.value} access; use a custom suite "
            "of score-based or hard-label attacks (e.g. Suite.custom(['square', 'rays']))"
        )
    return suite.with_steps(kept)


def diagnose_and_adapt(
    model: nn.Module | LabelOracle,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    suite: Suite,
    *,
    device: torch.device,
    train_mode: Diagnostic | None,
    diagnostics: bool,
    bpda: Sequence[str],
    eot_samples: int,
    extra_queries: int,
) -> Adapted:
    """Run the masking checks on the first examples of ``(x, y)`` (moved to ``device``) and adapt to them.

    ``train_mode`` is :func:`~robustlab.evaluation.diagnostics.check_train_mode`'s verdict, taken before the
    evaluation put the model in eval mode (None for a black box). With ``diagnostics=False`` only ``bpda`` applies.
    """
    report = [_black_box_access(model, suite)] if isinstance(model, LabelOracle) else []
    probe_x, probe_y = x[:PROBE_EXAMPLES].to(device), y[:PROBE_EXAMPLES].to(device)
    if isinstance(model, nn.Module) and len(x) > 0:
        check_model_takes(model, probe_x[:2])  # a model/data mismatch named here, not deep inside an attack
    attack_model: Any = model
    verifier: nn.Module | None = None
    if diagnostics and isinstance(model, nn.Module) and train_mode is not None:
        if train_mode.fired:
            train_mode.action = "evaluated in eval mode; the modes were restored afterwards"
        report.append(train_mode)
        attack_model, verifier = _answer_output_checks(model, probe_x, eot_samples, report)
    if bpda:
        attack_model = with_bpda(attack_model, bpda)
    extra_steps: list[SuiteStep] = []
    if diagnostics:
        gradients = check_gradients(attack_model, probe_x, probe_y, threat)
        report.append(gradients)
        real_model = attack_model
        attack_model, extra_steps = _answer_gradient_checks(
            attack_model, probe_x, threat, gradients, report, user_bpda=bool(bpda), extra_queries=extra_queries
        )
        if verifier is None and _removes_layers(attack_model):
            attack_model, verifier = _judged_by(real_model, attack_model, probe_x, eot_samples, report)
    if not suite.adaptive:  # checks reported, nothing changed (a user's bpda is a request, not an adaptation)
        for verdict in report:
            if verdict.fired and verdict.name != "train_mode":
                verdict.action = NOT_ADAPTED.format(suite=suite.name) + f"; the adaptation would be: {verdict.action}"
        return Adapted(with_bpda(model, bpda) if bpda and isinstance(model, nn.Module) else model, suite, report)
    adapted_suite = suite.plus(*extra_steps) if extra_steps else suite
    if diagnostics and isinstance(attack_model, nn.Module) and not has_input_gradient(attack_model, probe_x):
        adapted_suite = _without_gradient_attacks(adapted_suite, report)
    return Adapted(attack_model, adapted_suite, report, verifier)


def _without_gradient_attacks(suite: Suite, report: list[Diagnostic]) -> Suite:
    """The suite's score-based and hard-label steps only, for a model no gradient reaches (and a verdict saying so);
    every gradient attack would fail on it."""
    kept = tuple(s for s in suite.steps if get_attack(s.method).access is not Access.GRADIENT)
    if not kept:
        raise ModelError(
            "the model's output carries no gradient with respect to its input even after BPDA and smoothing, and "
            f"suite {suite.name!r} has only gradient attacks: use a suite with score-based or hard-label attacks "
            "(e.g. 'standard', or Suite.custom(['square', 'rays']))"
        )
    report.append(
        Diagnostic(
            "no_gradient",
            True,
            "the output is not connected to the input in autograd's graph (after the remedies above)",
            "A forward that leaves autograd (an argmax, a .detach(), numpy) gives gradient attacks nothing to follow; "
            "only queries can attack it.",
            action="gradient attacks dropped; the score-based and hard-label steps attack it: "
            + ", ".join(s.label for s in kept),
        )
    )
    return suite.with_steps(kept)


def _answer_gradient_checks(
    model: nn.Module,
    probe_x: Tensor,
    threat: ThreatModel,
    gradients: Diagnostic,
    report: list[Diagnostic],
    *,
    user_bpda: bool,
    extra_queries: int,
) -> tuple[nn.Module, list[SuiteStep]]:
    """Gradients fine on the margin loss: at most a margin-loss tier (a confident model's cross-entropy gradients
    are zero, its margin gradients are not), unless smoothing makes them markedly sharper (then smoothed, as
    below). Useless: BPDA through the modules probing finds non-differentiable, or noise-smoothed gradients,
    whichever makes them useful, and every escalation tier."""
    started = time.perf_counter()
    with torch.no_grad():
        labels = model(probe_x).argmax(1)
    before = gradient_usefulness(model, probe_x, labels, threat)
    verdict = Diagnostic(
        "gradient_usefulness",
        not before.useful,
        before.describe(),
        "A gradient that does not predict the loss (an oscillating term in the logits, a non-differentiable "
        "layer, noise) misleads every gradient attack even when it is not zero; a step along it must beat random "
        "steps (Carlini et al. 2019, Athalye et al. 2018).",
    )
    report.append(verdict)
    sharper = _sharper_when_smoothed(model, probe_x, labels, threat, before) if before.useful else None
    if before.useful and sharper is None:
        tiers: list[SuiteStep] = []
        if gradients.fired:
            tiers = list(escalation_tier("APGD-DLR (margin loss)", "apgd", {"steps": 100, "loss": "dlr"}, "gradients"))
            gradients.action = (
                "gradients are fine on the margin loss (" + before.describe() + "): added APGD-DLR (on a sample, "
                "then the rest if it breaks something); no gradient-free escalation"
            )  # fmt: skip
            gradients.seconds = time.perf_counter() - started
        return model, tiers
    if sharper is not None:
        remedied, after, text = sharper
        remedy = f"{text}: {after.describe()}"
        verdict.fired = True
        verdict.evidence += (
            f"; smoothed over input noise they correlate {after.correlation:.2f}: a high-frequency part of the "
            "gradient (an oscillating term) predicts nothing"
        )
    else:
        remedied, remedy = _remedy(model, probe_x, labels, threat, before, user_bpda=user_bpda)
    tiers = escalation_tiers(threat.norm, extra_queries)
    verdict.action = remedy + "; escalation: " + ", ".join(s.label for s in tiers if not s.gated)
    verdict.action += " (each tier on a sample of the examples left, then on the rest only if the sample broke one)"
    if gradients.fired:
        gradients.action = "answered by gradient_usefulness (below)"
    verdict.seconds = time.perf_counter() - started
    return remedied, tiers


class _WithoutOutputLayer(nn.Module):
    """Marks a model whose output layer the evaluation removed: its successes must be re-checked on the real one."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _removes_layers(model: nn.Module) -> bool:
    return any(isinstance(m, _WithoutOutputLayer) for m in model.modules())


def _judged_by(
    real: nn.Module, stripped: nn.Module, probe_x: Tensor, eot_samples: int, report: list[Diagnostic]
) -> tuple[nn.Module, nn.Module]:
    """The model attacks see once an output layer is removed, and what judges their successes: the real model, or,
    when the logits the layer hid turn out to vary from draw to draw (a one-hot output seldom shows input noise),
    the EOT average of the logits judged by a majority vote of the real model."""
    randomized = check_randomized(stripped, probe_x)
    if not randomized.fired:
        return stripped, real
    randomized.evidence = "the logits under the removed output layer vary between repeated forward passes"
    attacked, verifier = _averaged(stripped, real, probe_x, eot_samples, randomized)
    earlier = [i for i, verdict in enumerate(report) if verdict.name == "randomized"]
    if earlier:
        report[earlier[0]] = randomized
    else:
        report.append(randomized)
    return attacked, verifier


def _sharper_when_smoothed(
    model: nn.Module, probe_x: Tensor, labels: Tensor, threat: ThreatModel, before: Usefulness
) -> tuple[nn.Module, Usefulness, str] | None:
    """Gradients that predict the loss, but markedly better once smoothed over input noise at the eps scale: a
    large oscillating component rides on them (it steers every sign step, yet the loss barely feels it). On an
    ordinary model smoothing changes the correlation by a few hundredths; the smoothed model and its measure when
    the gain reaches SMOOTHING_GAIN, else None."""
    if before.correlation + SMOOTHING_GAIN > 1.0:
        return None  # already near-perfect: smoothing cannot gain enough
    smoothed, label = _smoothed(model, SMOOTHING_SCALES[0] * _noise_scale(threat, probe_x))
    after = gradient_usefulness(smoothed, probe_x, labels, threat)
    if after.correlation < before.correlation + SMOOTHING_GAIN or after.worse_than_random > before.worse_than_random:
        return None
    return smoothed, after, label


def _smoothed(model: nn.Module, sigma: float) -> tuple[nn.Module, str]:
    """``model`` with gradients smoothed over Gaussian input noise of scale ``sigma``, and a label saying so. A
    randomized model already averaged over draws (EOT) gets the input noise inside each of its draws: one draw per
    noise sample instead of a full average per noise sample (the cost of a gradient is 2x, not 9x)."""
    if isinstance(model, ExpectationOverTransformation):
        inner = NoiseSmoothedGradient(model.model, sigma, 1)
        text = f"gradients smoothed over Gaussian input noise (sigma {sigma:.3g}, inside each of the {model.samples} "
        return ExpectationOverTransformation(inner, model.samples).eval(), text + "EOT draws)"
    text = f"gradients smoothed over Gaussian input noise (sigma {sigma:.3g}, {SMOOTHING_SAMPLES} draws)"
    return NoiseSmoothedGradient(model, sigma, SMOOTHING_SAMPLES).eval(), text


def _remedy(
    model: nn.Module, probe_x: Tensor, labels: Tensor, threat: ThreatModel, before: Usefulness, *, user_bpda: bool
) -> tuple[nn.Module, str]:
    """Removal of a non-differentiable output layer that only hides the logits, else BPDA through the leaf modules
    probing finds non-differentiable, then noise smoothing at growing scales: the first candidate whose gradients
    are useful, else the one whose gradients correlate best."""
    candidates: list[tuple[nn.Module, str]] = []
    found = [] if user_bpda else [p.name for p in non_differentiable_modules(model, probe_x)]
    base, prefix = model, ""
    best, best_text, best_score = model, "no remedy made the gradients useful", before.correlation
    if found:
        hidden = _label_preserving_output(model, probe_x, labels, found)
        base = with_bpda(model, found)
        bpda_text = "BPDA (identity) through " + ", ".join(repr(n) for n in found) + " found by probing"
        candidates += ([hidden] if hidden is not None else []) + [(base, bpda_text)]
        prefix = bpda_text + " and "
        # a model whose output is cut from the graph cannot be attacked by gradients without BPDA
        best, best_text, best_score = base, bpda_text + " (gradients still not useful)", -2.0
    for factor in SMOOTHING_SCALES:
        smoothed, label = _smoothed(base, factor * _noise_scale(threat, probe_x))
        candidates.append((smoothed, prefix + label))
    for candidate, text in candidates:
        measured = gradient_usefulness(candidate, probe_x, labels, threat)
        if measured.useful:
            return candidate, f"{text}: {measured.describe()}"
        if measured.correlation > best_score:
            best, best_score = candidate, measured.correlation
            best_text = f"{text} (still not useful: {measured.describe()})"
    return best, best_text


def _label_preserving_output(
    model: nn.Module, probe_x: Tensor, labels: Tensor, broken: list[str]
) -> tuple[nn.Module, str] | None:
    """When the model's output layer is among the ``broken`` modules and removing it keeps the probe's labels (a
    one-hot of the argmax of the logits before it), the model without it and a description; else None. BPDA through
    such a layer gives a gradient but a flat loss: attacks must see the logits, and the real model re-checks every
    success (:class:`Adapted`'s verifier)."""
    name = output_module(model, probe_x)
    if name is None or name not in broken:
        return None
    others = [n for n in broken if n != name]
    stripped = _WithoutOutputLayer(with_bpda(without_layers(model, [name]), others)).eval()
    with torch.no_grad():
        agreement = float((stripped(probe_x).argmax(1) == labels).float().mean())
    if agreement < LABEL_AGREEMENT:
        return None
    text = (
        f"output layer {name!r} removed (it only hides the logits: removing it keeps {100 * agreement:.0f}% of the "
        "probe's labels); attacks see the logits, the real model re-checks every success"
    )
    if others:
        text += "; BPDA (identity) through " + ", ".join(repr(n) for n in others)
    return stripped, text


def _one_hot(model: nn.Module, x: Tensor) -> bool:
    with torch.no_grad():
        outputs = model(x)
    return bool(((outputs == 0) | (outputs == 1)).all())


def _noise_scale(threat: ThreatModel, x: Tensor) -> float:
    """A per-coordinate noise scale comparable with the threat model's eps."""
    dim = x[0].numel() if len(x) else 1
    if threat.norm is Norm.LINF:
        return threat.eps
    if threat.norm is Norm.L2:
        return threat.eps / dim**0.5
    return threat.eps / dim


def _answer_output_checks(
    model: nn.Module, probe_x: Tensor, eot_samples: int, report: list[Diagnostic]
) -> tuple[nn.Module, nn.Module | None]:
    """Probabilities -> attack log-outputs; randomness -> attack the EOT average, with a vote size from the measured
    flip rate, and re-check successes by a majority over more draws. Appends both verdicts; returns the model to
    attack and the one to verify with (None: the same)."""
    probabilities = check_probabilities(model, probe_x)
    if probabilities.fired and _one_hot(model, probe_x):
        probabilities.action = (
            "the outputs are one-hot labels: their log would carry nothing; attacked as they are (the gradient "
            "usefulness check answers their missing gradients)"
        )
    elif probabilities.fired:
        model = LogOutputs(model).eval()
        probabilities.action = "attacks use log(outputs), which are logits up to a constant per example"
    report.append(probabilities)
    randomized = check_randomized(model, probe_x)
    verifier = None
    if randomized.fired:
        model, verifier = _averaged(model, model, probe_x, eot_samples, randomized)
    report.append(randomized)
    return model, verifier


def _averaged(
    attacked: nn.Module, judge: nn.Module, probe_x: Tensor, eot_samples: int, randomized: Diagnostic
) -> tuple[nn.Module, nn.Module]:
    """The EOT average of the randomized ``attacked`` (a vote size from its measured flip rate) and a majority vote
    of ``judge`` over more draws, which re-checks every success; completes the ``randomized`` verdict."""
    rate = flip_rate(attacked, probe_x)
    samples = max(eot_samples, votes_for(rate))
    verifier = MajorityVote(judge, VERIFY_FACTOR * samples + 1).eval()
    randomized.evidence += f"; one draw's prediction differs from the majority for {100 * rate:.1f}% of draws"
    randomized.action = (
        f"every query averages the logits of {samples} forward passes (EOT; the size follows from the flip rate) "
        f"and counts {samples} queries; every success is re-checked by a majority of {verifier.votes} draws"
    )
    return ExpectationOverTransformation(attacked, samples).eval(), verifier


def _black_box_access(model: LabelOracle, suite: Suite) -> Diagnostic:
    return Diagnostic(
        "black_box_access",
        True,
        f"the model is reached with {model.access.value} access only",
        "Gradient attacks and the gradient-based checks cannot run; the numbers come from score-based "
        "or hard-label attacks alone and are upper bounds on the robust accuracy white-box attacks "
        "would find.",
        "ran only the suite's " + ", ".join(s.label for s in suite.steps),
    )


def escalation_tiers(norm: Norm, queries: int) -> list[SuiteStep]:
    """The escalation for useless gradients, in order of cost: a margin loss, targeted, score-based (Square with
    ``queries``) and hard-label (RayS with twice as many, Linf; HopSkipJump with ``queries`` in l2) tiers, each
    on a sample first (:func:`~robustlab.evaluation.suites.escalation_tier`)."""
    tiers: list[tuple[str, str, dict[str, Any]]] = [
        ("APGD-DLR (margin loss)", "apgd", {"steps": 100, "loss": "dlr"}),
        ("APGD-T (9 targets)", "apgd-t", {"steps": 100, "n_target_classes": 9}),
        (f"Square ({queries:,} queries)", "square", {"queries": queries}),
    ]
    if norm is Norm.LINF:
        tiers.append((f"RayS ({2 * queries:,} queries)", "rays", {"queries": 2 * queries}))
    elif norm is Norm.L2:
        tiers.append((f"HopSkipJump ({queries:,} queries)", "hsja", {"queries": queries}))
    steps = [step for tier in tiers for step in escalation_tier(*tier, added_by="gradient_usefulness")]
    return [s for s in steps if s.supports(norm)]


def gradient_free_steps(norm: Norm, queries: int) -> list[SuiteStep]:
    """The escalation before tiers (kept for callers): a margin loss, Square and (Linf) RayS with ``queries``
    (RayS twice), each on every example left."""
    steps = [
        SuiteStep("APGD-DLR (margin-based loss)", "apgd", {"steps": 100, "loss": "dlr"}),
        SuiteStep(f"Square ({queries:,} queries)", "square", {"queries": queries}),
    ]
    if norm is Norm.LINF:
        steps.append(SuiteStep(f"RayS ({2 * queries:,} queries)", "rays", {"queries": 2 * queries}))
    return [s for s in steps if s.supports(norm)]
