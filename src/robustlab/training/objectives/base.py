"""What a robust-training method is to the training loop: an objective.

The loop (:func:`robustlab.training.train`) owns data, optimizer, schedules, validation, checkpoints and
logging; an :class:`Objective` owns only how one batch becomes a loss to minimize — including how it generates
its adversarial examples, and in which BatchNorm mode. Adding a method means writing one subclass and
registering it (:func:`register_objective`); the loop does not change.

Objectives that keep state across batches (ATAS's per-example step sizes, WAR's lambda) expose it through
``state_dict`` / ``load_state_dict`` so that checkpoints resume them exactly.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robustlab.errors import ConfigError
from robustlab.registry import Registry, summary_of
from robustlab.threat import ThreatModel
from robustlab.training.perturb import BatchNormMode

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveInfo",
    "StepContext",
    "StepOutput",
    "build_objective",
    "get_objective",
    "list_objectives",
    "objective_info",
    "register_objective",
]


@dataclass(frozen=True)
class ObjectiveConfig:
    """Base of every objective's immutable options."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` for invalid options."""


@dataclass(frozen=True)
class StepContext:
    """What the loop tells an objective about the current batch.

    Attributes:
        index: positions of the batch's examples in the training set (for per-example state).
        epoch: current epoch (0-based); ``step``: optimizer steps taken so far; ``epochs``: planned epochs.
        generator: the run's attack generator (its state is checkpointed), on the batch's device.
        progress: fraction of the planned optimizer steps already taken, in [0, 1) (for eps/weight ramps).
    """

    index: Tensor
    epoch: int
    step: int
    epochs: int
    generator: torch.Generator
    progress: float = 0.0


@dataclass
class StepOutput:
    """A batch's loss (to be minimized) and what the loop logs about it.

    Attributes:
        loss: scalar; ``loss.backward()`` gives the method's full parameter gradient.
        logits_clean, logits_adv: detached logits on clean and perturbed inputs, when computed.
        x_adv: the training perturbation (detached), when there is one (the loop measures its loss increase).
        scalars: further per-batch numbers to average and log (e.g. ``"lambda"``).
    """

    loss: Tensor
    logits_clean: Tensor | None = None
    logits_adv: Tensor | None = None
    x_adv: Tensor | None = None
    scalars: dict[str, float] = field(default_factory=dict)


class Objective(ABC):
    """A training method. Subclasses set ``name``, ``Config``, ``attack_bn_mode`` and implement :meth:`step`.

    Class attributes:
        name: registry name, e.g. ``"pgd-at"``.
        Config: the frozen options dataclass.
        attack_bn_mode: BatchNorm mode while generating the training attack ("train" or "eval"), the
            documented default of each method's reference implementation.
        adversarial: whether the method trains on perturbed inputs (False for standard training).
        per_example_state: whether it keeps state per training example across epochs (ATAS's perturbations),
            which distributed training does not shard yet.
        paper: the reference, for listings.
    """

    name: ClassVar[str]
    Config: ClassVar[type[ObjectiveConfig]]
    attack_bn_mode: ClassVar[BatchNormMode] = "eval"
    adversarial: ClassVar[bool] = True
    per_example_state: ClassVar[bool] = False
    paper: ClassVar[str] = ""

    def __init__(self, threat: ThreatModel, config: ObjectiveConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise ConfigError("pass either a config object or keyword options, not both")
        if config is None:
            fields = {f.name for f in dataclasses.fields(self.Config)}
            unknown = sorted(set(options) - fields)
            if unknown:
                raise ConfigError(
                    f"unknown option(s) {', '.join(unknown)} for training method {self.name}; "
                    f"valid options: {', '.join(sorted(fields)) or 'none'}"
                )
            config = self.Config(**options)
        config.validate()
        self.threat = threat
        self.config = config

    def setup(self, model: nn.Module, num_examples: int, example_shape: tuple[int, ...], device: torch.device) -> None:
        """Called once before training (allocate per-example buffers here)."""
        return

    @abstractmethod
    def step(self, model: nn.Module, x: Tensor, y: Tensor, context: StepContext) -> StepOutput:
        """The loss of one batch. The model is in train mode when called and must be left in train mode."""

    def end_epoch(self, epoch: int, history: Mapping[str, list[float]]) -> None:
        """Called after each epoch's validation (e.g. to update a schedule-free coefficient)."""
        return

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint beyond the config (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        return


@dataclass(frozen=True)
class ObjectiveInfo:
    """A registered training method: its class and what listings and the loop need to know about it.

    Attributes:
        name: the registry name (``"pgd-at"``).
        cls: the :class:`Objective` subclass.
        summary: first line of the class docstring.
        paper: the method's reference.
        adversarial: whether it trains on perturbed inputs (catastrophic-overfitting checks apply).
        attack_bn_mode: BatchNorm mode while generating its training attack.
        per_example_state: whether it keeps per-example state across epochs (single process only).
        options: names of its options (fields of its ``Config``).
    """

    name: str
    cls: type[Objective]
    summary: str
    paper: str
    adversarial: bool
    attack_bn_mode: BatchNormMode
    per_example_state: bool
    options: tuple[str, ...]


OBJECTIVES: Registry[ObjectiveInfo] = Registry("training method", hint="see robustlab.training.list_objectives()")


def _describe(cls: type[Objective]) -> ObjectiveInfo:
    return ObjectiveInfo(
        name=cls.name,
        cls=cls,
        summary=summary_of(cls),
        paper=cls.paper,
        adversarial=cls.adversarial,
        attack_bn_mode=cls.attack_bn_mode,
        per_example_state=cls.per_example_state,
        options=tuple(f.name for f in dataclasses.fields(cls.Config)),
    )


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator adding a training method under ``cls.name`` (normalized: lower case, ``-`` not ``_``)."""
    OBJECTIVES.add(_describe(cls))
    return cls


def objective_info(name: str) -> ObjectiveInfo:
    """The registered training method ``name`` (case, ``-`` and ``_`` do not matter); unknown: ConfigError."""
    return OBJECTIVES.get(name)


def get_objective(name: str) -> type[Objective]:
    """The :class:`Objective` class registered as ``name``."""
    return objective_info(name).cls


def list_objectives(**filters: Any) -> list[ObjectiveInfo]:
    """Registered training methods sorted by name, e.g. ``list_objectives(adversarial=True)``.

    Filters are :class:`ObjectiveInfo` fields; ``[info.name for info in list_objectives()]`` gives the names.
    """
    return OBJECTIVES.list(**filters)


def build_objective(name: str, threat: ThreatModel, **options: Any) -> Objective:
    """The registered training method ``name`` with ``options``."""
    return get_objective(name)(threat, **options)
