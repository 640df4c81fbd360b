"""Attack suites: ordered lists of registered attacks run as a cascade.

Each step names a registered attack and its options. The cascade (:func:`robustlab.evaluate`) runs a step only
on the examples no earlier step broke, so cheap, strong attacks go first and expensive ones only see the few
examples left. The built-in suites are registered in :data:`SUITES` (:func:`list_suites` gives their records):

- ``quick`` — for checks during training: APGD-CE with 20 steps.
- ``standard`` — the default: APGD-CE (100 steps) and targeted APGD-DLR on the 3 most likely other classes on
  every example; then, on the weakest 10% of the examples left (smallest margin between the predicted class and
  the runner-up at the best points the attacks found), APGD-T on 9 targets, APGD-CE with 3 restarts and the
  score-based Square attack with 5,000 queries. AutoAttack's standard version runs APGD-CE, APGD-T on 9
  targets, FAB-T on 9 targets and Square with 5,000 queries on every example left. On the MNIST models of
  ``benchmarks/evaluation.py`` every example that its later attacks (or our longer ones) broke after APGD-CE and
  APGD-T on 3 targets had a margin among the lowest 8% of the examples left, so the focused stage spends that
  budget where it can still succeed. When Square breaks more than 1% of what the gradient attacks left, the
  diagnostics (:mod:`robustlab.evaluation.diagnostics`) widen it to the next-weakest examples while it keeps
  finding more.
  In l1, the APGD steps use the "Mind the box" schedule (3 eps, 2 eps, eps: ``eps_schedule``), which breaks far
  more examples than a plain l1 run.
- ``full`` — everything: adds APGD-DLR, APGD-T on 9 targets, FAB-T on 9 targets, CW-PGD with restarts,
  Frank-Wolfe, a longer Square and, for Linf, RayS with a 10,000-query hard-label budget.
- ``autoattack`` — AutoAttack's standard version exactly (Croce & Hein 2020, reference ``fra31/auto-attack``
  ``autoattack.py``), for numbers comparable with RobustBench and the literature: APGD-CE (100 steps, 1 restart),
  APGD-T (100 steps, 9 target classes), FAB-T (100 steps, 9 target classes) and Square (5,000 iterations,
  p_init 0.8, the schedule of 10,000 queries as the reference's ``resc_schedule=False``), in that order, each on the
  examples still robust, every attack call seeded with the evaluation's seed (the reference's policy). In l1 it is
  the reference's l1 version: APGD-CE (5 restarts) and APGD-T (5 targets) with the 3 eps / 2 eps / eps schedule,
  FAB-T (9 targets) and the l1 Square ("Mind the box") with the same budget.
- ``autoattack-rand`` — AutoAttack's version for randomized defenses: APGD-CE and APGD-DLR, 1 restart each, every
  gradient the mean of 20 draws (EOT).

The two AutoAttack suites are not adapted by the diagnostics (:attr:`Suite.adaptive` is False): the checks run and
are reported, but the model is attacked as given (no log-outputs or EOT wrapper) and no attack is added, so the
numbers are AutoAttack's. BPDA applies when the user names layers (``bpda=[...]``): that is a request, not an
adaptation.

A custom suite is a list of attack names or ``(name, options)`` pairs: ``Suite.custom([("apgd", {"steps": 50}),
"square"])``, or of :class:`SuiteStep` objects, which can also focus a step on the weakest examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from robustlab.attacks.registry import get_attack
from robustlab.checks import check_fraction
from robustlab.errors import ConfigError
from robustlab.registry import Registry
from robustlab.threat import Norm

__all__ = [
    "FOCUS_MINIMUM",
    "STANDARD_FOCUS",
    "SUITES",
    "SUITE_NAMES",
    "Suite",
    "SuiteInfo",
    "SuiteStep",
    "escalation_tier",
    "get_suite",
    "list_suites",
    "with_surrogate_steps",
]

SURROGATE_QUERIES = 10_000  # P-RGF's budget when surrogates join a black-box evaluation

STANDARD_FOCUS = 0.1  # the standard suite's focused stage: the weakest 10% of the examples left
FOCUS_MINIMUM = 16  # a focused step attacks at least this many examples (all, if fewer are left)
ESCALATION_SAMPLE = 0.1  # an escalation tier first attacks the weakest 10% of the examples left (at least 16)


@dataclass(frozen=True)
class SuiteStep:
    """One attack of a suite: a display label, a registered method and its options.

    ``focus`` below 1 runs the attack only on that fraction of the examples still unbroken (at least
    ``FOCUS_MINIMUM`` of them) whose margin — the clean prediction's logit minus the best other logit, at the
    worst point any earlier attack found — is smallest. ``fresh_examples`` leaves out the examples an earlier step
    of the same method already attacked (to widen a focused attack to the next-weakest examples). A model reached
    through a label or score oracle has no margins the evaluation may look at for free: there the step runs on
    every example. ``gated`` runs the step only when the step before it broke at least one example, and then on the
    examples that step did not attack (an escalation tier tries its attack on a sample first:
    :func:`escalation_tier`).
    """

    label: str
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)
    focus: float = 1.0
    fresh_examples: bool = False
    # The norms the step is for (None: every norm its attack supports); not in the repr, so suites that predate it
    # keep their fingerprints.
    norms: frozenset[Norm] | None = field(default=None, repr=False)
    # Escalation: run only if the step just before (the same attack on a sample) broke something; not in the repr.
    gated: bool = field(default=False, repr=False)
    added_by: str = field(default="", repr=False)  # the diagnostic that added the step, if any

    def __post_init__(self) -> None:
        check_fraction("focus", self.focus, allow_one=True)

    def applies_to(self, norm: Norm) -> bool:
        """The step is meant for ``norm`` (whether or not its attack supports it)."""
        return self.norms is None or norm in self.norms

    def supports(self, norm: Norm) -> bool:
        return self.applies_to(norm) and norm in get_attack(self.method).norms


@dataclass(frozen=True)
class Suite:
    """An ordered cascade of attacks.

    ``adaptive`` (True): the evaluation may answer its diagnostics by wrapping the model and adding attacks; False
    keeps the suite exactly as defined (the AutoAttack suites). ``same_seed`` (False): every attack call gets the
    evaluation's seed, as AutoAttack does, instead of a seed per stage and batch. ``complete`` (False): refuse a
    norm for which one of the steps meant for it has no attack, instead of running the others.
    """

    name: str
    steps: tuple[SuiteStep, ...]
    adaptive: bool = field(default=True, repr=False)
    same_seed: bool = field(default=False, repr=False)
    complete: bool = field(default=False, repr=False)

    def for_norm(self, norm: Norm) -> Suite:
        """The steps that support ``norm``; an error when none does (or, for a complete suite, when one does not)."""
        missing = [step.label for step in self.steps if step.applies_to(norm) and not step.supports(norm)]
        if self.complete and missing:
            raise ConfigError(
                f"suite {self.name!r} needs {', '.join(missing)} in the {norm.value} norm, which robustlab does not "
                "have; it would not be the same ensemble: use suite='standard' or a custom suite"
            )
        kept = tuple(step for step in self.steps if step.supports(norm))
        if not kept:
            raise ConfigError(f"no attack of suite {self.name!r} supports the {norm.value} norm")
        return dataclasses.replace(self, steps=kept)

    def plus(self, *steps: SuiteStep) -> Suite:
        return dataclasses.replace(self, steps=self.steps + tuple(steps))

    def with_steps(self, steps: Sequence[SuiteStep]) -> Suite:
        """The same suite (name and flags) with other steps."""
        return dataclasses.replace(self, steps=tuple(steps))

    @staticmethod
    def custom(steps: Sequence[str | tuple[str, Mapping[str, Any]] | SuiteStep], name: str = "custom") -> Suite:
        """A suite from attack names, ``(name, options)`` pairs or :class:`SuiteStep` objects."""
        built = []
        for step in steps:
            if isinstance(step, SuiteStep):
                built.append(step)
                continue
            method, options = (step, {}) if isinstance(step, str) else step
            info = get_attack(method)  # raises a clear error for an unknown name
            info.cls(**dict(options))  # and for unknown or invalid options
            built.append(SuiteStep(method, method, dict(options)))
        if not built:
            raise ConfigError("a suite needs at least one attack")
        return Suite(name, tuple(built))


@dataclass(frozen=True)
class SuiteInfo:
    """A built-in suite in the registry: its name, its steps (for every norm; :func:`get_suite` keeps those that
    support the threat model's), a one-line description and the :class:`Suite` flags."""

    name: str
    steps: tuple[SuiteStep, ...]
    description: str
    adaptive: bool = True
    same_seed: bool = False
    complete: bool = False

    def suite(self) -> Suite:
        return Suite(self.name, self.steps, self.adaptive, self.same_seed, self.complete)


SUITES: Registry[SuiteInfo] = Registry("suite", hint="or build Suite.custom()")


LINF_L2 = frozenset({Norm.LINF, Norm.L2})
L1 = frozenset({Norm.L1})


def _with_l1_twin(label: str, method: str, options: dict[str, Any], focus: float = 1.0) -> tuple[SuiteStep, ...]:
    """A step for linf and l2, and its l1 twin with the "Mind the box" schedule (3 eps, 2 eps, eps)."""
    return (
        SuiteStep(label, method, options, focus, norms=LINF_L2),
        SuiteStep(f"{label} [3/2/1 eps]", method, {**options, "eps_schedule": True}, focus, norms=L1),
    )


def _standard() -> tuple[SuiteStep, ...]:
    weakest = f"weakest {100 * STANDARD_FOCUS:g}%"
    return (
        *_with_l1_twin("APGD-CE", "apgd", {"steps": 100, "loss": "ce"}),
        *_with_l1_twin("APGD-T (3 targets)", "apgd-t", {"steps": 100, "n_target_classes": 3}),
        *_with_l1_twin(
            f"APGD-T (9 targets, {weakest})", "apgd-t", {"steps": 100, "n_target_classes": 9}, STANDARD_FOCUS
        ),
        *_with_l1_twin(
            f"APGD-CE (3 restarts, {weakest})", "apgd", {"steps": 100, "loss": "ce", "restarts": 3}, STANDARD_FOCUS
        ),
        SuiteStep(f"Square (5,000 queries, {weakest})", "square", {"queries": 5000}, STANDARD_FOCUS),
    )


def _autoattack() -> tuple[SuiteStep, ...]:
    """AutoAttack's standard version (``version='standard'`` of the reference's ``autoattack.py``)."""
    # The reference's Square makes one query at its start and then 5,000 iterations of one query each, with the p
    # schedule of 10,000 queries (resc_schedule=False); robustlab's queries count every query.
    square = {"queries": 5001, "p_init": 0.8, "loss": "margin", "schedule_queries": 10_000}
    apgd_t = {"steps": 100, "restarts": 1}
    return (
        SuiteStep("APGD-CE", "apgd", {"steps": 100, "restarts": 1, "loss": "ce"}, norms=LINF_L2),
        SuiteStep(
            "APGD-CE (5 restarts) [3/2/1 eps]", "apgd", {"steps": 100, "restarts": 5, "eps_schedule": True}, norms=L1
        ),
        SuiteStep("APGD-T (9 targets)", "apgd-t", {**apgd_t, "n_target_classes": 9}, norms=LINF_L2),
        SuiteStep(
            "APGD-T (5 targets) [3/2/1 eps]",
            "apgd-t",
            {**apgd_t, "n_target_classes": 5, "eps_schedule": True},
            norms=L1,
        ),
        # The reference's l2 projection, rounding included: its long steps break examples (see fab.py).
        SuiteStep(
            "FAB-T (9 targets)",
            "fab-t",
            {"steps": 100, "restarts": 1, "n_target_classes": 9, "projection": "reference"},
        ),
        SuiteStep("Square (5,000 queries)", "square", square),
    )


def _autoattack_rand() -> tuple[SuiteStep, ...]:
    """AutoAttack's version for randomized defenses (``version='rand'``): EOT over 20 draws."""
    return (
        SuiteStep("APGD-CE (EOT 20)", "apgd", {"steps": 100, "restarts": 1, "loss": "ce", "eot_iter": 20}),
        SuiteStep("APGD-DLR (EOT 20)", "apgd", {"steps": 100, "restarts": 1, "loss": "dlr", "eot_iter": 20}),
    )


_BUILT_IN = (
    SuiteInfo(
        "quick",
        (SuiteStep("APGD-CE (20 steps)", "apgd", {"steps": 20, "loss": "ce"}),),
        "APGD-CE with 20 steps: for checks during training",
    ),
    SuiteInfo(
        "standard",
        _standard(),
        "APGD-CE and APGD-T (3 targets) on every example, then APGD-T (9 targets), APGD-CE with restarts and "
        f"Square on the weakest {100 * STANDARD_FOCUS:g}% of those left: the default",
    ),
    SuiteInfo(
        "full",
        (
            SuiteStep("APGD-CE", "apgd", {"steps": 100, "loss": "ce"}),
            SuiteStep("APGD-T (9 targets)", "apgd-t", {"steps": 100, "n_target_classes": 9}),
            SuiteStep("APGD-DLR", "apgd", {"steps": 100, "loss": "dlr"}),
            SuiteStep("FAB-T (9 targets)", "fab-t", {"steps": 100, "n_target_classes": 9}),
            SuiteStep("CW-PGD (50 steps, 5 restarts)", "cw-pgd", {"steps": 50, "restarts": 5}),
            SuiteStep("Frank-Wolfe (100 steps)", "fw", {"steps": 100, "gamma": 0.5}),
            SuiteStep("Square (5,000 queries)", "square", {"queries": 5000}),
            SuiteStep("RayS (10,000 queries)", "rays", {"queries": 10_000}),
        ),
        "everything, each attack on every example left, and RayS with 10,000 queries for Linf",
    ),
    SuiteInfo(
        "autoattack",
        _autoattack(),
        "AutoAttack's standard version exactly (APGD-CE, APGD-T 9 targets, FAB-T 9 targets, Square 5,000 queries), "
        "not adapted by the diagnostics: numbers comparable with the literature",
        adaptive=False,
        same_seed=True,
        complete=True,
    ),
    SuiteInfo(
        "autoattack-rand",
        _autoattack_rand(),
        "AutoAttack's version for randomized models: APGD-CE and APGD-DLR with EOT over 20 draws, not adapted",
        adaptive=False,
        same_seed=True,
        complete=True,
    ),
)
for _info in _BUILT_IN:
    SUITES.add(_info)
SUITE_NAMES = tuple(info.name for info in _BUILT_IN)  # cheapest first


def get_suite(name: str | Suite, norm: Norm | str) -> Suite:
    """The built-in suite ``name`` (or a given :class:`Suite`) restricted to the attacks supporting ``norm``."""
    norm = Norm.parse(norm)
    if isinstance(name, Suite):
        return name.for_norm(norm)
    info = SUITES.get(name)  # an unknown name: a ConfigError listing the suites
    return info.suite().for_norm(norm)


def list_suites() -> list[SuiteInfo]:
    """The built-in suites' records, sorted by name."""
    return SUITES.list()


def with_surrogate_steps(suite: Suite, model: object, count: int, norm: Norm) -> Suite:
    """``suite`` opened by the attacks that use the attacker's ``count`` surrogates: a transfer attack (one query per
    example), then P-RGF with them as the prior (Linf and L2). Only for a black box (an oracle): a white-box model
    is attacked through its own gradients, which no surrogate beats."""
    from torch import nn

    if isinstance(model, nn.Module):
        raise ConfigError(
            "surrogates add transfer and prior-guided attacks to black-box evaluations (a model reached through a "
            "score or label oracle, e.g. a URL); this model is white-box: its own gradients are the stronger attack"
        )
    plural = "s" if count > 1 else ""
    steps = (
        SuiteStep(f"Transfer ({count} surrogate{plural}, 1 query)", "transfer", {}, norms=LINF_L2),
        SuiteStep(
            f"P-RGF ({count} surrogate{plural}, {SURROGATE_QUERIES:,} queries)",
            "p-rgf",
            {"queries": SURROGATE_QUERIES},
            norms=LINF_L2,
        ),
    )
    kept = tuple(step for step in steps if step.supports(norm))
    return suite.with_steps(kept + suite.steps)


def escalation_tier(
    label: str, method: str, options: Mapping[str, Any], added_by: str = ""
) -> tuple[SuiteStep, SuiteStep]:
    """An escalation tier: ``method`` on a sample of the examples left (the weakest :data:`ESCALATION_SAMPLE`, at
    least :data:`FOCUS_MINIMUM`), then on the rest only if the sample gave at least one break."""
    sample = SuiteStep(f"{label} [sample]", method, dict(options), ESCALATION_SAMPLE, added_by=added_by)
    rest = SuiteStep(f"{label} [rest]", method, dict(options), gated=True, added_by=added_by)
    return sample, rest
