"""Reliable robustness evaluation: attack suites run as a cascade, masking diagnostics, resumable state."""

from robustlab.evaluation.cascade import EvaluationResult, StepReport, evaluate
from robustlab.evaluation.diagnostics import Diagnostic
from robustlab.evaluation.report import evaluation_section
from robustlab.evaluation.suites import SUITE_NAMES, Suite, SuiteStep, get_suite

__all__ = [
    "SUITE_NAMES",
    "Diagnostic",
    "EvaluationResult",
    "StepReport",
    "Suite",
    "SuiteStep",
    "evaluate",
    "evaluation_section",
    "get_suite",
]
