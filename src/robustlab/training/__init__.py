"""Robust training: one loop (:func:`train`), methods as objectives, schedules, checkpoints.

import robustlab
from robustlab.training import TrainConfig, train

result = train(model, robustlab.load_dataset("mnist", split="train"), "fast-at",
               robustlab.ThreatModel("linf", 0.3), TrainConfig(epochs=5, schedule="cyclic", lr=0.2))
"""

from robustlab.training.loop import CO_POLICIES, TrainConfig, TrainResult, train, validate_model
from robustlab.training.objectives import (
    Objective,
    ObjectiveConfig,
    StepContext,
    StepOutput,
    build_objective,
    get_objective,
    list_objectives,
    register_objective,
)
from robustlab.training.schedules import SCHEDULES, lr_multiplier

__all__ = [
    "CO_POLICIES",
    "SCHEDULES",
    "Objective",
    "ObjectiveConfig",
    "StepContext",
    "StepOutput",
    "TrainConfig",
    "TrainResult",
    "build_objective",
    "get_objective",
    "list_objectives",
    "lr_multiplier",
    "register_objective",
    "train",
    "validate_model",
]
