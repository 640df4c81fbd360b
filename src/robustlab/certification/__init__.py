"""Certified robustness: randomized smoothing and bound propagation (IBP, CROWN)."""

from robustlab.certification.bounds import BoundResult, margin_bounds, verify
from robustlab.certification.smoothing import (
    ABSTAIN,
    Certificate,
    RandomizedSmoothing,
    certified_accuracy,
    clopper_pearson_lower,
)

__all__ = [
    "ABSTAIN",
    "BoundResult",
    "Certificate",
    "RandomizedSmoothing",
    "certified_accuracy",
    "clopper_pearson_lower",
    "margin_bounds",
    "verify",
]
