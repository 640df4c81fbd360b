"""The attack registry: every attack registers itself under a name with its access level and norms.

``list_attacks(access="scores", norm="linf")`` filters by metadata (like timm's ``list_models``), so the CLI, the
evaluation suites and the contract tests all iterate over one source of truth instead of ``if/elif`` chains.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustlab.attacks.base import Attack
from robustlab.errors import ConfigError
from robustlab.oracles import Access
from robustlab.threat import Norm

__all__ = ["AttackInfo", "get_attack", "list_attacks", "register_attack"]


@dataclass(frozen=True)
class AttackInfo:
    """Metadata of a registered attack."""

    name: str
    cls: type[Attack]
    access: Access
    norms: frozenset[Norm]
    supports_targeted: bool
    summary: str


_REGISTRY: dict[str, AttackInfo] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator adding an attack to the registry under ``cls.name``."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name].cls is not cls:
        raise ValueError(f"an attack named {name!r} is already registered ({_REGISTRY[name].cls.__name__})")
    doc = (cls.__doc__ or "").strip().splitlines()
    _REGISTRY[name] = AttackInfo(
        name=name,
        cls=cls,
        access=cls.access,
        norms=cls.norms,
        supports_targeted=cls.supports_targeted,
        summary=cls.summary_line or (doc[0] if doc else ""),
    )
    return cls


def get_attack(name: str) -> AttackInfo:
    """The registered attack called ``name`` (case-insensitive), with a clear error listing the choices."""
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown attack method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def list_attacks(access: str | Access | None = None, norm: str | Norm | None = None) -> list[AttackInfo]:
    """Registered attacks, optionally only those needing exactly ``access`` and supporting ``norm``."""
    wanted_access = None if access is None else Access(access)
    wanted_norm = None if norm is None else Norm.parse(norm)
    return [
        info
        for name, info in sorted(_REGISTRY.items())
        if (wanted_access is None or info.access is wanted_access)
        and (wanted_norm is None or wanted_norm in info.norms)
    ]
