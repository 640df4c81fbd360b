"""Attacks, one file per algorithm, all registered by name (see :mod:`robustlab.attacks.registry`)."""

from robustlab.attacks import (  # noqa: F401  (importing registers them)
    apgd,
    cw_l2,
    cw_pgd,
    ddn,
    fab,
    fgsm,
    fmn,
    frank_wolfe,
    hsja,
    mifgsm,
    nes,
    pgd,
    prgf,
    rays,
    sign_opt,
    square,
    transfer,
    transfer_start,
    zo_fw,
)
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
