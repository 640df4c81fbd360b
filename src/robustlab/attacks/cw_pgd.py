"""PGD on the Carlini-Wagner margin loss.

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017 (the margin objective
``max_{j != y} z_j - z_y``), optimized with projected gradient steps as in Madry et al. 2018. The margin does not
saturate the way cross-entropy does on confident models, so it often breaks examples PGD-CE misses.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustlab.attacks.pgd import PGD, PGDConfig
from robustlab.attacks.registry import register_attack

__all__ = ["CWPGD", "CWPGDConfig"]


@dataclass(frozen=True)
class CWPGDConfig(PGDConfig):
    """Options of :class:`CWPGD`: those of PGD, with the margin loss by default."""

    loss: str = "margin"


@register_attack
class CWPGD(PGD):
    """PGD on the Carlini-Wagner margin loss (Carlini & Wagner 2017; Madry et al. 2018)."""

    name = "cw-pgd"
    Config = CWPGDConfig
