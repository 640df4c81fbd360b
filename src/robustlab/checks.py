"""Argument checks shared by every config and entry point: one wording, one place.

Each check returns the value (converted where that is harmless, e.g. a numpy integer to ``int``) or raises
:class:`~robustlab.errors.ConfigError` naming the argument and what it must be. Booleans are never numbers here
(``True`` is not a step count).
"""

from __future__ import annotations

import math
from typing import Any, Literal, overload

import numpy as np

from robustlab.errors import ConfigError

__all__ = ["check_choice", "check_flag", "check_fraction", "check_integer", "check_number", "check_positive_int"]


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))) and not isinstance(value, (bool, np.bool_))


@overload
def check_positive_int(name: str, value: None, *, minimum: int = 1, allow_none: Literal[True]) -> None: ...
@overload
def check_positive_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> int: ...


def check_positive_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an ``int`` >= ``minimum`` (1 by default); None passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if not _is_integer(value) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_integer(name: str, value: Any) -> int:
    """Any ``int`` (a seed, an offset)."""
    if not _is_integer(value):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` in the interval from ``low`` to ``high`` (closed unless ``*_open``).

    ``check_number("sigma", s, low=0, low_open=True)`` is a positive number; ``low=0`` alone a non-negative one.
    """
    valid = _is_number(value) and math.isfinite(float(value))
    if valid:
        number = float(value)
        valid = (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
    if not valid:
        raise ConfigError(f"{name} must be {_describe(low, high, low_open, high_open)}, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any, *, allow_zero: bool = False, allow_one: bool = False) -> float:
    """A number in (0, 1), with 0 and/or 1 allowed when asked."""
    return check_number(name, value, low=0.0, high=1.0, low_open=not allow_zero, high_open=not allow_one)


def check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    """One of ``choices`` (exact strings)."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return str(value)


def check_flag(name: str, value: Any) -> bool:
    """``True`` or ``False`` exactly (not 0, 1 or a string)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _describe(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == math.inf:
        if low == 0:
            return "a positive number" if low_open else "a non-negative number"
        if low == -math.inf:
            return "a finite number"
        return f"a number {'>' if low_open else '>='} {low:g}"
    if low == -math.inf:
        return f"a number {'<' if high_open else '<='} {high:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
