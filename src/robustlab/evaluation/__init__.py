"""Reliable robustness evaluation: attack suites run as a cascade, masking diagnostics, resumable state."""

from robustlab.evaluation.cascade import evaluate
from robustlab.evaluation.diagnostics import Diagnostic
from robustlab.evaluation.report import evaluation_section
from robustlab.evaluation.result import EvaluationResult
from robustlab.evaluation.state import CascadeState, StepReport
from robustlab.evaluation.suites import SUITE_NAMES, SUITES, Suite, SuiteInfo, SuiteStep, get_suite, list_suites

__all__ = [
    "SUITES",
    "SUITE_NAMES",
    "CascadeState",
    "Diagnostic",
    "EvaluationResult",
    "StepReport",
    "Suite",
    "SuiteInfo",
    "SuiteStep",
    "evaluate",
    "evaluation_section",
    "get_suite",
    "list_suites",
]
