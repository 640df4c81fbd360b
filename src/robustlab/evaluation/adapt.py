"""The evaluation's first phase: diagnose the ways a model can look robust without being so, and adapt to them.

Before any attack, :func:`diagnose_and_adapt` runs the masking checks of :mod:`robustlab.evaluation.diagnostics`
on a probe of the data and answers each one that fires: a model returning probabilities is attacked through
log-outputs, a randomized one through expectation over transformation, named non-differentiable layers through
BPDA, and broken gradients add gradient-free attacks (with more budget) to the suite. A black box reached through
an oracle keeps only the suite's attacks its access level allows (:func:`restrict_to_access`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.attacks.registry import get_attack
from robustlab.errors import ConfigError
from robustlab.evaluation.diagnostics import (
    Diagnostic,
    check_gradients,
    check_probabilities,
    check_randomized,
)
from robustlab.evaluation.suites import Suite, SuiteStep
from robustlab.evaluation.wrappers import ExpectationOverTransformation, LogOutputs, with_bpda
from robustlab.oracles import Access, LabelOracle, ScoreOracle, check_model_takes
from robustlab.threat import Norm, ThreatModel

__all__ = ["NOT_ADAPTED", "Adapted", "diagnose_and_adapt", "gradient_free_steps", "restrict_to_access"]

PROBE_EXAMPLES = 64  # the checks look at the first examples only
NOT_ADAPTED = "not applied: suite {suite!r} runs exactly as defined (choose suite='standard' to let it adapt)"


@dataclass
class Adapted:
    """What the cascade attacks, after the diagnostics: the (wrapped) model, the suite and every check's verdict."""

    model: Any  # nn.Module (possibly wrapped) or the LabelOracle as given
    suite: Suite
    report: list[Diagnostic]


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
    if diagnostics and isinstance(model, nn.Module) and train_mode is not None:
        if train_mode.fired:
            train_mode.action = "evaluated in eval mode; the modes were restored afterwards"
        report.append(train_mode)
        attack_model = _answer_output_checks(model, probe_x, eot_samples, report)
    if bpda:
        attack_model = with_bpda(attack_model, bpda)
    extra_steps: list[SuiteStep] = []
    if diagnostics:
        gradients = check_gradients(attack_model, probe_x, probe_y, threat)
        if gradients.fired:
            extra_steps = gradient_free_steps(threat.norm, extra_queries)
            gradients.action = (
                "added " + ", ".join(s.label for s in extra_steps) + " to the suite"
                + ("" if bpda else "; name a non-differentiable layer with bpda=[...] to attack through it")
            )  # fmt: skip
        report.append(gradients)
    if not suite.adaptive:  # checks reported, nothing changed (a user's bpda is a request, not an adaptation)
        for verdict in report:
            if verdict.fired and verdict.name != "train_mode":
                verdict.action = NOT_ADAPTED.format(suite=suite.name) + f"; the adaptation would be: {verdict.action}"
        return Adapted(with_bpda(model, bpda) if bpda and isinstance(model, nn.Module) else model, suite, report)
    return Adapted(attack_model, suite.plus(*extra_steps) if extra_steps else suite, report)


def _answer_output_checks(model: nn.Module, probe_x: Tensor, eot_samples: int, report: list[Diagnostic]) -> nn.Module:
    """Probabilities -> attack log-outputs; randomness -> attack the EOT average. Appends both verdicts."""
    probabilities = check_probabilities(model, probe_x)
    if probabilities.fired:
        model = LogOutputs(model).eval()
        probabilities.action = "attacks use log(outputs), which are logits up to a constant per example"
    report.append(probabilities)
    randomized = check_randomized(model, probe_x)
    if randomized.fired:
        model = ExpectationOverTransformation(model, eot_samples).eval()
        randomized.action = (
            f"every query averages the logits of {eot_samples} forward passes (EOT); predictions and the final "
            "check use the same average"
        )
    report.append(randomized)
    return model


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


def gradient_free_steps(norm: Norm, queries: int) -> list[SuiteStep]:
    """What broken gradients add to the suite: a margin loss, Square and (Linf) RayS with ``queries`` (RayS twice)."""
    steps = [
        SuiteStep("APGD-DLR (margin-based loss)", "apgd", {"steps": 100, "loss": "dlr"}),
        SuiteStep(f"Square ({queries:,} queries)", "square", {"queries": queries}),
    ]
    if norm is Norm.LINF:
        steps.append(SuiteStep(f"RayS ({2 * queries:,} queries)", "rays", {"queries": 2 * queries}))
    return [s for s in steps if s.supports(norm)]
