"""Training-time perturbations: the bare loops robust-training objectives build on.

Evaluation attacks (:mod:`robustlab.attacks`) track best iterates, stop early and re-check every success; training
needs none of that, only the perturbation, as cheaply as possible, with the model in whatever BatchNorm mode the
method prescribes. These helpers take the loss as a function of the perturbed input and use the threat model for
every geometric step (random start, steepest ascent, projection onto ball and box), so training attacks obey the
same threat model as evaluation attacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from robustlab.threat import ThreatModel

__all__ = ["BatchNormMode", "input_gradient", "pgd_perturb"]

LossOfInput = Callable[[Tensor], Tensor]
BatchNormMode = Literal["train", "eval"]  # the modes robustlab.utils.model_mode takes


def input_gradient(loss_of_input: LossOfInput, x: Tensor, *, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """``(loss, d loss / d x)`` for a loss summed over the batch (so each example's gradient is its own)."""
    x_var = x if x.requires_grad else x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_of_input(x_var)
        (grad,) = torch.autograd.grad(loss, x_var, create_graph=create_graph)
    return loss, grad


def pgd_perturb(
    loss_of_input: LossOfInput,
    x: Tensor,
    threat: ThreatModel,
    *,
    steps: int,
    step_size: float,
    start: Tensor | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ascend ``loss_of_input`` (summed over the batch) with ``steps`` projected steepest-ascent steps.

    Starts from ``start`` if given, else from a uniform point of the ball (``random_start``) or from ``x``.
    Returns a detached perturbed input inside ball and box. Model parameters receive no gradient.
    """
    if start is not None:
        x_adv = threat.project(start.detach(), x)
    elif random_start:
        x_adv = threat.random_start(x, generator)
    else:
        x_adv = x.detach().clone()
    for _ in range(steps):
        _, grad = input_gradient(loss_of_input, x_adv)
        x_adv = threat.project(x_adv.detach() + step_size * threat.steepest_ascent(grad), x)
    return x_adv.detach()
