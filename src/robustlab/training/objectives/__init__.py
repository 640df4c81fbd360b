"""Robust-training methods as objectives of the one training loop, each in its own file."""

from robustlab.training.objectives import fast_at, gaussian, ibp, pgd_at, standard  # noqa: F401  (importing registers them)
from robustlab.training.objectives.base import (
    Objective,
    ObjectiveConfig,
    StepContext,
    StepOutput,
    build_objective,
    get_objective,
    list_objectives,
    register_objective,
)

__all__ = [
    "Objective",
    "ObjectiveConfig",
    "StepContext",
    "StepOutput",
    "build_objective",
    "get_objective",
    "list_objectives",
    "register_objective",
]
