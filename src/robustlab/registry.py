"""One registry type for everything robustlab looks up by name: attacks, training objectives, architectures,
data sets and evaluation suites.

Each registry holds frozen *info records* (a dataclass with at least a ``name`` field, plus whatever metadata its
kind has: an attack's access level and norms, an architecture's input shape). Names are normalized so that case,
surrounding spaces, ``-`` and ``_`` do not matter (``get("MI_FGSM")`` is ``get("mi-fgsm")``); aliases map other
spellings to a name. ``list(**filters)`` returns the records whose attribute equals each filter value, or, for an
attribute that is a set, contains it (like timm's ``list_models(filter=...)``). Errors are
:class:`~robustlab.errors.ConfigError` naming the choices.

Example::

    @dataclass(frozen=True)
    class LossInfo:
        name: str
        fn: Callable[..., Tensor]
        bounded: bool

    LOSSES: Registry[LossInfo] = Registry("loss")
    LOSSES.add(LossInfo("ce", cross_entropy, bounded=False))
    LOSSES.get("CE").fn; [info.name for info in LOSSES.list(bounded=False)]
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, Protocol, TypeVar

from robustlab.errors import ConfigError

__all__ = ["Info", "Registry", "normalize_name", "summary_of"]


class Info(Protocol):
    """What a registry holds: a record with a name."""

    @property
    def name(self) -> str: ...


InfoT = TypeVar("InfoT", bound=Info)


def summary_of(obj: object) -> str:
    """The first line of ``obj``'s docstring: the one-line description a listing shows."""
    lines = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return lines[0] if lines else ""


def normalize_name(name: str) -> str:
    """The registry key of ``name``: lower case, no surrounding spaces, ``_`` written ``-``."""
    if not isinstance(name, str):
        raise ConfigError(f"a name must be a string, got {type(name).__name__}")
    return name.strip().lower().replace("_", "-")


class Registry(Generic[InfoT]):
    """Named info records of one kind (``"attack"``, ``"architecture"``, ...), looked up by normalized name.

    Args:
        kind: what the records are, for messages ("unknown attack 'x'").
        hint: appended to the unknown-name error, e.g. where to find the choices.
    """

    def __init__(self, kind: str, *, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self._records: dict[str, InfoT] = {}
        self._aliases: dict[str, str] = {}

    # ---------------------------------------------------------------- adding
    def add(self, info: InfoT, *, aliases: tuple[str, ...] = (), replace: bool = False) -> InfoT:
        """Register ``info`` under its (normalized) name; a different record under a taken name is an error."""
        key = normalize_name(info.name)
        if key != info.name:
            raise ConfigError(f"register {self.kind} names in normalized form: {key!r}, not {info.name!r}")
        if key in self._records and not replace and self._records[key] != info:
            raise ConfigError(f"a {self.kind} named {key!r} is already registered")
        self._records[key] = info
        for alias in aliases:
            self._aliases[normalize_name(alias)] = key
        return info

    def register(self, describe: Callable[[Any], InfoT]) -> Callable[[Any], Any]:
        """A decorator registering the decorated object as ``describe(obj)``; returns the object unchanged."""

        def decorate(obj: Any) -> Any:
            self.add(describe(obj))
            return obj

        return decorate

    # --------------------------------------------------------------- looking up
    def key(self, name: str) -> str | None:
        """The registered name ``name`` refers to (through aliases), or None."""
        key = normalize_name(name)
        key = self._aliases.get(key, key)
        return key if key in self._records else None

    def get(self, name: str) -> InfoT:
        """The record registered as ``name``; an unknown name is a :class:`ConfigError` listing the choices."""
        key = self.key(name)
        if key is None:
            hint = f"; {self.hint}" if self.hint else ""
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}{hint}")
        return self._records[key]

    def list(self, **filters: Any) -> builtins.list[InfoT]:
        """Records sorted by name whose attributes match every filter (None filters are ignored)."""
        wanted = {k: v for k, v in filters.items() if v is not None}
        return [
            info for _, info in sorted(self._records.items()) if all(_matches(info, k, v) for k, v in wanted.items())
        ]

    def names(self, **filters: Any) -> builtins.list[str]:
        """Names of :meth:`list`."""
        return [info.name for info in self.list(**filters)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.key(name) is not None

    def __iter__(self) -> Iterator[InfoT]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._records)

    def as_mapping(self) -> Mapping[str, InfoT]:
        """A read-only view name -> record."""
        return dict(self._records)


def _matches(info: Any, attribute: str, value: Any) -> bool:
    if not hasattr(info, attribute):
        raise ConfigError(f"cannot filter by {attribute!r}: the records have no such field")
    held = getattr(info, attribute)
    if isinstance(held, (set, frozenset, tuple, list)) and not isinstance(value, (set, frozenset, tuple, list)):
        return value in held
    return bool(held == value)
