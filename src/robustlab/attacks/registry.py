"""The attack registry: every attack registers itself under a name with its access level and norms.

``list_attacks(access="scores", norm="linf")`` filters by metadata (like timm's ``list_models``), so the CLI, the
evaluation suites and the contract tests all iterate over one source of truth instead of ``if/elif`` chains.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustlab.attacks.base import Attack
from robustlab.oracles import Access
from robustlab.registry import Registry, summary_of
from robustlab.threat import Norm

__all__ = ["ATTACKS", "AttackInfo", "get_attack", "list_attacks", "register_attack"]


@dataclass(frozen=True)
class AttackInfo:
    """Metadata of a registered attack."""

    name: str
    cls: type[Attack]
    access: Access
    norms: frozenset[Norm]
    supports_targeted: bool
    summary: str
    needs_surrogate: bool = False  # also needs a surrogate model the attacker owns (transfer, P-RGF, ...)


ATTACKS: Registry[AttackInfo] = Registry("attack method", hint="see robustlab.list_attacks()")


def _describe(cls: type[Attack]) -> AttackInfo:
    return AttackInfo(
        name=cls.name,
        cls=cls,
        access=cls.access,
        norms=cls.norms,
        supports_targeted=cls.supports_targeted,
        summary=cls.summary_line or summary_of(cls),
        needs_surrogate=bool(getattr(cls, "needs_surrogate", False)),
    )


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator adding an attack to the registry under ``cls.name``."""
    ATTACKS.add(_describe(cls))
    return cls


def get_attack(name: str) -> AttackInfo:
    """The registered attack called ``name`` (case, ``-`` and ``_`` do not matter), with the choices on error."""
    return ATTACKS.get(name)


def list_attacks(
    access: str | Access | None = None, norm: str | Norm | None = None, *, surrogate: bool | None = False
) -> list[AttackInfo]:
    """Registered attacks, optionally only those needing exactly ``access`` and supporting ``norm``.

    ``surrogate``: False (the default) lists the attacks that need the model alone, True only those that also need
    a surrogate model (``needs_surrogate``: transfer, P-RGF, ...), None both.
    """
    needs = None if surrogate is None else bool(surrogate)
    return ATTACKS.list(
        access=None if access is None else Access(access),
        norms=None if norm is None else Norm.parse(norm),
        needs_surrogate=needs,
    )
