"""Robust training: one loop (:func:`train`), methods as objectives, schedules, checkpoints, augmentation, recipes.

import robustlab
from robustlab.training import TrainConfig, train

result = train(model, robustlab.load_dataset("mnist", split="train"), "fast-at",
               robustlab.ThreatModel("linf", 0.3), TrainConfig(epochs=5, schedule="cyclic", lr=0.2))

Data sets are read by index, in memory or streamed (:mod:`robustlab.training.data`); augmentation is per example and
seeded (:mod:`robustlab.training.augment`); the published CIFAR recipes are presets (:mod:`robustlab.training.recipes`:
``get_recipe("cifar10-pgd-at")``).

The objectives' API (:class:`Objective`, :func:`build_objective`, :func:`list_objectives`, ...) is
:mod:`robustlab.training.objectives.base`'s, re-exported here and from :mod:`robustlab.training.objectives`.
"""

from robustlab.training import objectives  # noqa: F401  (importing registers every method)
from robustlab.training.augment import AUGMENTATIONS, Augmentation
from robustlab.training.loop import CO_POLICIES, TrainConfig, TrainResult, train, validate_model
from robustlab.training.objectives import base
from robustlab.training.objectives.base import *  # noqa: F403  (the names of base.__all__)
from robustlab.training.recipes import RECIPES, Recipe, get_recipe, list_recipes
from robustlab.training.schedules import SCHEDULES, lr_multiplier

__all__ = [
    "AUGMENTATIONS",
    "CO_POLICIES",
    "RECIPES",
    "SCHEDULES",
    "Augmentation",
    "Recipe",
    "TrainConfig",
    "TrainResult",
    "get_recipe",
    "list_recipes",
    "lr_multiplier",
    "train",
    "validate_model",
]
__all__ += base.__all__
