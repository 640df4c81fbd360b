"""Learning-rate schedules as multipliers of the base rate, stepped once per optimizer step.

A schedule is a function of training progress ``t`` in [0, 1] (optimizer steps taken / planned), so it does not
depend on the batch size or data set size:

- ``constant``;
- ``piecewise``: multiply by ``decay`` at each milestone (fractions of training; 0.5 and 0.75 by default, the
  usual 100/150-of-200-epochs recipe);
- ``cyclic``: a triangle from 0 up to 1 at ``peak`` (0.4) and back to 0, the one-cycle schedule of Fast-AT
  (Wong et al. 2020);
- ``cosine``: ``(1 + cos(pi t)) / 2``.

``warmup`` (a fraction of training) ramps the multiplier linearly from 0, as the large-batch recipe of
distributed adversarial training prescribes. The schedules are registered in :data:`SCHEDULE_REGISTRY` (names
normalized like every registry's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from robustlab.errors import ConfigError
from robustlab.registry import Registry

__all__ = ["SCHEDULES", "SCHEDULE_REGISTRY", "ScheduleInfo", "ScheduleParameters", "lr_multiplier"]


@dataclass(frozen=True)
class ScheduleParameters:
    """What shapes a schedule: piecewise ``milestones`` and ``decay``, the cyclic ``peak``."""

    milestones: Sequence[float]
    decay: float
    peak: float


@dataclass(frozen=True)
class ScheduleInfo:
    """A registered schedule: ``shape(t, parameters)`` is its multiplier before warm-up."""

    name: str
    shape: Callable[[float, ScheduleParameters], float]
    summary: str


SCHEDULE_REGISTRY: Registry[ScheduleInfo] = Registry("schedule")


def _constant(t: float, p: ScheduleParameters) -> float:
    return 1.0


def _piecewise(t: float, p: ScheduleParameters) -> float:
    return p.decay ** sum(1 for m in p.milestones if t >= m)


def _cyclic(t: float, p: ScheduleParameters) -> float:
    return t / p.peak if t <= p.peak else max(0.0, (1.0 - t) / (1.0 - p.peak))


def _cosine(t: float, p: ScheduleParameters) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


_BUILT_IN = (
    ScheduleInfo("constant", _constant, "the base rate throughout"),
    ScheduleInfo("piecewise", _piecewise, "times decay at each milestone"),
    ScheduleInfo("cyclic", _cyclic, "one cycle: up to the base rate at peak, down to 0 at the end"),
    ScheduleInfo("cosine", _cosine, "cosine decay from the base rate to 0"),
)
for _schedule in _BUILT_IN:
    SCHEDULE_REGISTRY.add(_schedule)
SCHEDULES = tuple(info.name for info in _BUILT_IN)  # the names, in the order the docs list them


def lr_multiplier(
    name: str,
    *,
    milestones: Sequence[float] = (0.5, 0.75),
    decay: float = 0.1,
    peak: float = 0.4,
    warmup: float = 0.0,
) -> Callable[[float], float]:
    """The multiplier ``m(t)`` for progress ``t`` in [0, 1] of the schedule ``name``."""
    info = SCHEDULE_REGISTRY.get(name)
    if not 0.0 <= warmup < 1.0:
        raise ConfigError(f"warm-up must be a fraction of training in [0, 1), got {warmup!r}")
    if info.name == "cyclic" and not 0.0 < peak < 1.0:
        raise ConfigError(f"the cyclic schedule's peak must be in (0, 1), got {peak!r}")
    if info.name == "piecewise" and any(not 0.0 < m < 1.0 for m in milestones):
        raise ConfigError(f"milestones are fractions of training in (0, 1), got {tuple(milestones)!r}")
    parameters = ScheduleParameters(tuple(milestones), decay, peak)

    def multiplier(t: float) -> float:
        value = info.shape(t, parameters)
        if warmup > 0.0 and t < warmup:
            value *= t / warmup
        return value

    return multiplier
