"""Attack objectives, all in one place.

Every attack loss maps ``(logits, goal)`` to a per-example value the attacker *maximizes*; targeted variants are
chosen by the goal, so an attack never branches on targeted/untargeted itself.

- ``ce``: cross-entropy of the true label (untargeted), minus cross-entropy of the target (targeted).
- ``margin`` (Carlini & Wagner 2017): ``max_{j != y} z_j - z_y``; targeted ``z_t - max_{j != t} z_j``.
- ``dlr`` (Croce & Hein 2020, "Reliable evaluation of adversarial robustness..."): the margin divided by
  ``z_pi1 - z_pi3``, invariant to shifting and scaling the logits; targeted
  ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``.

``kl_divergence`` (TRADES, Backward Smoothing) is here too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab.errors import ConfigError
from robustlab.goals import Goal

__all__ = ["LOSSES", "AttackLoss", "attack_loss", "dlr_loss", "kl_divergence", "margin_loss", "rival_margin_loss"]

AttackLoss = Callable[[Tensor, Goal], Tensor]


def _largest_other(logits: Tensor, exclude: Tensor) -> Tensor:
    """``max_{j != exclude} logits_j`` per example."""
    masked = logits.scatter(1, exclude[:, None], float("-inf"))
    return masked.amax(dim=1)


def cross_entropy_loss(logits: Tensor, goal: Goal) -> Tensor:
    if goal.targets is not None:
        return -F.cross_entropy(logits, goal.targets, reduction="none")
    return F.cross_entropy(logits, goal.labels, reduction="none")


def margin_loss(logits: Tensor, goal: Goal) -> Tensor:
    if goal.targets is not None:
        target = logits.gather(1, goal.targets[:, None]).squeeze(1)
        return target - _largest_other(logits, goal.targets)
    true = logits.gather(1, goal.labels[:, None]).squeeze(1)
    return _largest_other(logits, goal.labels) - true


def rival_margin_loss(rival: Tensor) -> AttackLoss:
    """The margin loss against a given ``rival`` class per example (-1: the largest other class, as
    :func:`margin_loss`): ``z_rival - z_label`` (targeted: ``z_target - z_rival``). A score-based attack knows the
    black box's rival at its iterate; a surrogate's gradient of this loss is a prior for the black box's margin."""

    def loss(logits: Tensor, goal: Goal) -> Tensor:
        keep = goal.targets if goal.targets is not None else goal.labels
        largest = logits.scatter(1, keep[:, None], float("-inf")).argmax(dim=1)
        other = logits.gather(1, torch.where(rival >= 0, rival, largest)[:, None]).squeeze(1)
        kept = logits.gather(1, keep[:, None]).squeeze(1)
        return kept - other if goal.targets is not None else other - kept

    return loss


def dlr_loss(logits: Tensor, goal: Goal) -> Tensor:
    if logits.shape[1] < (4 if goal.targeted else 3):
        raise ConfigError(
            f"the DLR loss needs at least {4 if goal.targeted else 3} classes, the model has {logits.shape[1]}"
        )
    ordered = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, goal.labels[:, None]).squeeze(1)
    if goal.targets is not None:
        target = logits.gather(1, goal.targets[:, None]).squeeze(1)
        scale = ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12
        return -(true - target) / scale
    scale = ordered[:, 0] - ordered[:, 2] + 1e-12
    return (_largest_other(logits, goal.labels) - true) / scale


def kl_divergence(logits_adv: Tensor, logits_ref: Tensor) -> Tensor:
    """Per-example ``KL(softmax(logits_ref) || softmax(logits_adv))``, the TRADES regularizer."""
    log_p_adv = F.log_softmax(logits_adv, dim=1)
    log_p_ref = F.log_softmax(logits_ref, dim=1)
    return (log_p_ref.exp() * (log_p_ref - log_p_adv)).sum(dim=1)


LOSSES: dict[str, AttackLoss] = {
    "ce": cross_entropy_loss,
    "margin": margin_loss,
    "cw": margin_loss,
    "dlr": dlr_loss,
}


def attack_loss(name: str) -> AttackLoss:
    """The loss registered under ``name`` (``ce``, ``margin``/``cw``, ``dlr``)."""
    if not isinstance(name, str):
        raise ConfigError(f"loss must be a name, got {name!r}")
    try:
        return LOSSES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}: choose one of {', '.join(sorted(LOSSES))}") from None
