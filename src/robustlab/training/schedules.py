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
distributed adversarial training prescribes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from robustlab.errors import ConfigError

__all__ = ["SCHEDULES", "lr_multiplier"]

SCHEDULES = ("constant", "piecewise", "cyclic", "cosine")


def lr_multiplier(
    name: str,
    *,
    milestones: Sequence[float] = (0.5, 0.75),
    decay: float = 0.1,
    peak: float = 0.4,
    warmup: float = 0.0,
) -> Callable[[float], float]:
    """The multiplier ``m(t)`` for progress ``t`` in [0, 1] of the schedule ``name``."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown learning-rate schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if not 0.0 <= warmup < 1.0:
        raise ConfigError(f"warm-up must be a fraction of training in [0, 1), got {warmup!r}")
    if name == "cyclic" and not 0.0 < peak < 1.0:
        raise ConfigError(f"the cyclic schedule's peak must be in (0, 1), got {peak!r}")
    if name == "piecewise" and any(not 0.0 < m < 1.0 for m in milestones):
        raise ConfigError(f"milestones are fractions of training in (0, 1), got {tuple(milestones)!r}")
    ordered = sorted(milestones)

    def base(t: float) -> float:
        if name == "constant":
            return 1.0
        if name == "piecewise":
            return decay ** sum(1 for m in ordered if t >= m)
        if name == "cyclic":
            return t / peak if t <= peak else max(0.0, (1.0 - t) / (1.0 - peak))
        return 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))

    def multiplier(t: float) -> float:
        value = base(t)
        if warmup > 0.0 and t < warmup:
            value *= t / warmup
        return value

    return multiplier
