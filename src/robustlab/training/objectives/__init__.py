"""Robust-training methods as objectives of the one training loop, each in its own file.

The public API (:class:`Objective`, the registry functions, ...) is :mod:`robustlab.training.objectives.base`'s,
re-exported here; importing this package registers every method.
"""

from robustlab.training.objectives import (  # noqa: F401  (importing registers them)
    atas,
    backward_smoothing,
    base,
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
from robustlab.training.objectives.base import *  # noqa: F403  (the names of base.__all__)

__all__: list[str] = []
__all__ += base.__all__
