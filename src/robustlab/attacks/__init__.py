"""Attacks, one file per algorithm, all registered by name (see :mod:`robustlab.attacks.registry`)."""

from robustlab.attacks import apgd, cw_pgd, fgsm, frank_wolfe, hsja, mifgsm, nes, pgd, rays, sign_opt, square, zo_fw  # noqa: F401  (importing registers them)
from robustlab.attacks.base import Attack, AttackConfig, AttackResult
from robustlab.attacks.registry import AttackInfo, get_attack, list_attacks, register_attack

__all__ = [
    "Attack",
    "AttackConfig",
    "AttackInfo",
    "AttackResult",
    "get_attack",
    "list_attacks",
    "register_attack",
]
