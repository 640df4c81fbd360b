"""Training recipes: the published settings of the reference implementations, as presets.

A :class:`Recipe` bundles a method and its options, the threat model, an architecture, the loop's options
(:class:`~robustlab.training.TrainConfig`: epochs, batch, optimizer, schedule, augmentation, validation) and the
input normalization, each as its source code sets it. ``robustlab train --recipe cifar10-pgd-at`` uses one;
options given explicitly override the recipe's. In Python::

    recipe = get_recipe("cifar10-pgd-at")
    model = build_model(recipe.arch, normalize=recipe.normalize)
    result = train(model, data, recipe.method, recipe.threat(data.bounds), recipe.config(epochs=30),
                   **recipe.method_options)

Registered recipes (:data:`RECIPES`):

- ``cifar10-pgd-at``: PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to
  Adversarial Attacks", ICLR 2018) as Rice, Wong & Kolter run it ("Overfitting in adversarially robust deep
  learning", ICML 2020; locuslab/robust_overfitting ``train_cifar.py`` defaults): PreActResNet-18, 200 epochs,
  batch 128, SGD 0.1 with momentum 0.9 and weight decay 5e-4, times 0.1 at 50% and 75% of training, PGD-10 with
  step 2/255 at eps 8/255 from a random start, BatchNorm in train mode during the attack (their model stays in
  train mode), random crop after 4-pixel reflection padding and flip, CIFAR-10 normalization inside the model,
  and (their remedy for robust overfitting) the weights of the best validation PGD-10 accuracy on 1,000 held-out
  training images;
- ``cifar10-trades``: TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
  ICML 2019; yaodongyu/TRADES ``train_trades_cifar10.py``): WRN-34-10, 76 epochs, batch 128, SGD 0.1 with momentum
  0.9 and weight decay 2e-4, times 0.1 from epoch 75, beta 6, 10 steps of 0.007 at eps 0.031, random crop after
  4-pixel zero padding and flip, no normalization (inputs in [0, 1], as their released model);
- ``cifar10-fast-at``: Fast adversarial training, FGSM from a random start (Wong, Rice & Kolter, "Fast is better
  than free: Revisiting adversarial training", ICLR 2020; locuslab/fast_adversarial ``CIFAR10/train_fgsm.py``):
  PreActResNet-18, 15 epochs, batch 128, SGD with momentum 0.9 and weight decay 5e-4, a cyclic learning rate from
  0 to 0.2 and back (peak at half of training), step 10/255 at eps 8/255, random crop after 4-pixel zero padding
  and flip, CIFAR-10 normalization inside the model, mixed precision on CUDA.

The brief's shared values (SGD 0.1, momentum 0.9, weight decay 5e-4, batch 128) hold for PGD-AT; TRADES' code uses
weight decay 2e-4 and Fast-AT's a peak rate of 0.2, and the recipes follow the code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from robustlab.errors import ConfigError
from robustlab.registry import Registry
from robustlab.threat import ThreatModel
from robustlab.training.loop import TrainConfig

__all__ = ["RECIPES", "Recipe", "get_recipe", "list_recipes"]


@dataclass(frozen=True)
class Recipe:
    """A published training set-up (see the module docstring).

    Attributes:
        name: registry name, e.g. ``"cifar10-pgd-at"``.
        summary: one line for listings.
        source: the paper and the code file the values come from.
        method, method_options: the training method and its options.
        norm, eps: the training threat model.
        arch: the architecture (:func:`robustlab.models.build_model` name).
        normalize: the input statistics the model normalizes with (a name for ``build_model(normalize=...)``:
            ``"cifar10"``, or ``"none"`` for raw ``[0, 1]`` inputs).
        loop: :class:`TrainConfig` fields the recipe sets; the others keep their defaults.
        data: the data set it was published on (a built-in name: ``robustlab train --recipe`` without ``--data``
            reads it from the cache folder, or downloads it).
    """

    name: str
    summary: str
    source: str
    method: str
    norm: str
    eps: float
    arch: str
    normalize: str
    method_options: Mapping[str, Any] = field(default_factory=dict)
    loop: Mapping[str, Any] = field(default_factory=dict)
    data: str = "cifar10"

    def config(self, **overrides: Any) -> TrainConfig:
        """The recipe's :class:`TrainConfig`, with ``overrides`` (any TrainConfig field) taking precedence."""
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(f"unknown TrainConfig option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
        config = TrainConfig(**{**self.loop, **overrides})
        config.validate()
        return config

    def threat(self, bounds: tuple[float, float] = (0.0, 1.0)) -> ThreatModel:
        """The training threat model in the data's input box."""
        return ThreatModel(self.norm, self.eps, *bounds)


RECIPES: Registry[Recipe] = Registry("recipe", hint="see robustlab.training.list_recipes()")

_CIFAR_BATCH = {"batch_size": 128, "optimizer": "sgd", "momentum": 0.9}

for _recipe in (
    Recipe(
        name="cifar10-pgd-at",
        summary="PGD-AT (10 steps of 2/255 at 8/255), PreActResNet-18, 200 epochs, piecewise 0.1 -> 0.001",
        source="Rice, Wong & Kolter, ICML 2020 (locuslab/robust_overfitting train_cifar.py); Madry et al., ICLR 2018",
        method="pgd-at",
        method_options={"steps": 10, "rel_step_size": 0.25, "random_start": True, "bn_mode": "train"},
        norm="linf",
        eps=8 / 255,
        arch="preactresnet18",
        normalize="cifar10",
        loop={
            **_CIFAR_BATCH, "epochs": 200, "lr": 0.1, "weight_decay": 5e-4, "schedule": "piecewise",
            "milestones": (0.5, 0.75), "lr_decay": 0.1, "augment": "crop-flip-reflect", "val_fraction": 0.02,
            "val_examples": 1000, "val_attack": "pgd", "val_attack_steps": 10, "select": "robust",
        },
    ),
    Recipe(
        name="cifar10-trades",
        summary="TRADES (beta 6, 10 steps of 0.007 at 0.031), WRN-34-10, 76 epochs, 0.1 then 0.01 from epoch 75",
        source="Zhang et al., ICML 2019 (yaodongyu/TRADES train_trades_cifar10.py)",
        method="trades",
        method_options={"beta": 6.0, "steps": 10, "rel_step_size": 0.007 / 0.031, "init_std": 0.001},
        norm="linf",
        eps=0.031,
        arch="wrn-34-10",
        normalize="none",
        loop={
            **_CIFAR_BATCH, "epochs": 76, "lr": 0.1, "weight_decay": 2e-4, "schedule": "piecewise",
            "milestones": (74 / 76,), "lr_decay": 0.1, "augment": "crop-flip", "val_attack": "pgd",
            "val_attack_steps": 10, "select": "last",
        },
    ),
    Recipe(
        name="cifar10-fast-at",
        summary="Fast-AT (FGSM step 10/255 from a random start at 8/255), PreActResNet-18, 15 epochs, cyclic to 0.2",
        source="Wong, Rice & Kolter, ICLR 2020 (locuslab/fast_adversarial CIFAR10/train_fgsm.py)",
        method="fast-at",
        method_options={"rel_step_size": 1.25, "random_start": True},
        norm="linf",
        eps=8 / 255,
        arch="preactresnet18",
        normalize="cifar10",
        loop={
            **_CIFAR_BATCH, "epochs": 15, "lr": 0.2, "weight_decay": 5e-4, "schedule": "cyclic", "cyclic_peak": 0.5,
            "augment": "crop-flip", "amp": True, "val_attack": "pgd", "val_attack_steps": 10, "select": "last",
        },
    ),
):  # fmt: skip
    RECIPES.add(_recipe)


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name`` (case, ``-`` and ``_`` do not matter); unknown: ConfigError listing them."""
    return RECIPES.get(name)


def list_recipes(**filters: Any) -> list[Recipe]:
    """Registered recipes sorted by name, e.g. ``list_recipes(method="trades")``."""
    return RECIPES.list(**filters)
