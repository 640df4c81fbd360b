"""Robust-training methods as objectives of the one training loop, each in its own file."""

from robustlab.training.objectives import (  # noqa: F401  (importing registers them)
    atas,
    backward_smoothing,
    fast_at,
    fast_bat,
    fast_trades,
    gaussian,
    gradalign,
    ibp,
    pgd_at,
    standard,
    trades,
    war,
)
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
