"""Attack suites: ordered lists of registered attacks run as a cascade.

Each step names a registered attack and its options. The cascade (:func:`robustlab.evaluate`) runs a step only
on the examples no earlier step broke, so cheap, strong attacks go first and expensive ones only see the few
examples left. The built-in suites are registered in :data:`SUITES` (:func:`list_suites` gives their records):

- ``quick`` — for checks during training: APGD-CE with 20 steps.
- ``standard`` — the default: APGD-CE (100 steps) and targeted APGD-DLR on the 3 most likely other classes on
  every example; then, on the weakest 10% of the examples left (smallest margin between the predicted class and
  the runner-up at the best points the attacks found), APGD-T on 9 targets, APGD-CE with 3 restarts and the
  score-based Square attack (Linf/L2) with 5,000 queries. AutoAttack's standard version runs APGD-CE, APGD-T on 9
  targets, FAB-T on 9 targets and Square with 5,000 queries on every example left. On the MNIST models of
  ``benchmarks/evaluation.py`` every example that its later attacks (or our longer ones) broke after APGD-CE and
  APGD-T on 3 targets had a margin among the lowest 8% of the examples left, so the focused stage spends that
  budget where it can still succeed. When Square breaks more than 1% of what the gradient attacks left, the
  diagnostics (:mod:`robustlab.evaluation.diagnostics`) widen it to the next-weakest examples while it keeps
  finding more.
- ``full`` — everything: adds APGD-DLR, APGD-T on 9 targets, CW-PGD with restarts, Frank-Wolfe, a longer Square
  and, for Linf, RayS with a 10,000-query hard-label budget.

A custom suite is a list of attack names or ``(name, options)`` pairs: ``Suite.custom([("apgd", {"steps": 50}),
"square"])``, or of :class:`SuiteStep` objects, which can also focus a step on the weakest examples.
"""

from __future__ import annotations

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
    "get_suite",
    "list_suites",
]

STANDARD_FOCUS = 0.1  # the standard suite's focused stage: the weakest 10% of the examples left
FOCUS_MINIMUM = 16  # a focused step attacks at least this many examples (all, if fewer are left)


@dataclass(frozen=True)
class SuiteStep:
    """One attack of a suite: a display label, a registered method and its options.

    ``focus`` below 1 runs the attack only on that fraction of the examples still unbroken (at least
    ``FOCUS_MINIMUM`` of them) whose margin — the clean prediction's logit minus the best other logit, at the
    worst point any earlier attack found — is smallest. ``fresh_examples`` leaves out the examples an earlier step
    of the same method already attacked (to widen a focused attack to the next-weakest examples). A model reached
    through a label or score oracle has no margins the evaluation may look at for free: there the step runs on
    every example.
    """

    label: str
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)
    focus: float = 1.0
    fresh_examples: bool = False

    def __post_init__(self) -> None:
        check_fraction("focus", self.focus, allow_one=True)

    def supports(self, norm: Norm) -> bool:
        return norm in get_attack(self.method).norms


@dataclass(frozen=True)
class Suite:
    """An ordered cascade of attacks."""

    name: str
    steps: tuple[SuiteStep, ...]

    def for_norm(self, norm: Norm) -> Suite:
        """The steps that support ``norm``; an error when none does."""
        kept = tuple(step for step in self.steps if step.supports(norm))
        if not kept:
            raise ConfigError(f"no attack of suite {self.name!r} supports the {norm.value} norm")
        return Suite(self.name, kept)

    def plus(self, *steps: SuiteStep) -> Suite:
        return Suite(self.name, self.steps + tuple(steps))

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
    support the threat model's) and a one-line description."""

    name: str
    steps: tuple[SuiteStep, ...]
    description: str


SUITES: Registry[SuiteInfo] = Registry("suite", hint="or build Suite.custom()")


def _standard() -> tuple[SuiteStep, ...]:
    weakest = f"weakest {100 * STANDARD_FOCUS:g}%"
    return (
        SuiteStep("APGD-CE", "apgd", {"steps": 100, "loss": "ce"}),
        SuiteStep("APGD-T (3 targets)", "apgd-t", {"steps": 100, "n_target_classes": 3}),
        SuiteStep(f"APGD-T (9 targets, {weakest})", "apgd-t", {"steps": 100, "n_target_classes": 9}, STANDARD_FOCUS),
        SuiteStep(
            f"APGD-CE (3 restarts, {weakest})", "apgd", {"steps": 100, "loss": "ce", "restarts": 3}, STANDARD_FOCUS
        ),
        SuiteStep(f"Square (5,000 queries, {weakest})", "square", {"queries": 5000}, STANDARD_FOCUS),
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
            SuiteStep("CW-PGD (50 steps, 5 restarts)", "cw-pgd", {"steps": 50, "restarts": 5}),
            SuiteStep("Frank-Wolfe (100 steps)", "fw", {"steps": 100, "gamma": 0.5}),
            SuiteStep("Square (5,000 queries)", "square", {"queries": 5000}),
            SuiteStep("RayS (10,000 queries)", "rays", {"queries": 10_000}),
        ),
        "everything, each attack on every example left, and RayS with 10,000 queries for Linf",
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
    return Suite(info.name, info.steps).for_norm(norm)


def list_suites() -> list[SuiteInfo]:
    """The built-in suites' records, sorted by name."""
    return SUITES.list()
