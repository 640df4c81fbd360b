"""Loss landscapes: slices of the loss around examples (input space) and around the weights (weight space).

- :func:`input_slice` — the cross-entropy at ``x + a u + b v`` for a grid of ``(a, b)``, with ``u`` the direction of
  the PGD perturbation of ``x`` (the adversarial direction) and ``v`` a random direction, both of unit norm in the
  threat model's norm and ``v`` orthogonal to ``u`` (in l2), as in Moosavi-Dezfooli et al. 2019 and the
  gradient-masking plots of Athalye et al. 2018. One direction (``b = 0``) gives a 1-D slice. The slice is of the
  function: points are not clipped to the box, so a slice through the box's faces stays a straight line.
- :func:`weight_slice` — the mean clean and adversarial loss of the model with weights ``theta + a d1 (+ b d2)``,
  with filter-normalized random directions (Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS
  2018): each filter (slice along the first dimension) of a weight tensor gets the norm of the same filter of
  ``theta``; biases and normalization parameters (tensors of one dimension) are left at zero, as Li et al. do. The
  model is evaluated with :func:`torch.func.functional_call`, so its weights are never changed; a TorchScript
  model (which ``functional_call`` cannot run) gets the shifted weights written in place and its own put back
  afterwards, even when the evaluation fails.
- :func:`perturbation_consistency` — non-smoothness along training: the cosine between the PGD perturbations of
  the same examples under neighbouring weights (consecutive checkpoints, or points of a weight-space line). A
  smooth adversarial loss gives stable optimal perturbations (cosine near 1); abrupt changes show the
  non-smoothness adversarial training suffers from (Liu et al., "On the Loss Landscape of Adversarial Training",
  NeurIPS 2020).
- :func:`collapse_slices` — the input-space landscape before and after a catastrophic-overfitting event: 1-D
  slices along each model's one-step (FGSM) direction and its PGD direction. After the collapse the loss along the
  one-step direction stays low while PGD's direction finds a high loss within the ball: the loss is no longer
  close to linear there (Andriushchenko & Flammarion, "Understanding and Improving Fast Adversarial Training",
  NeurIPS 2020; Kim, Lee & Lee, "Understanding Catastrophic Overfitting in Single-step Adversarial Training",
  AAAI 2021).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from robustlab.checks import check_positive_int
from robustlab.errors import ConfigError
from robustlab.threat import Norm, ThreatModel
from robustlab.utils import model_mode

__all__ = [
    "Slice",
    "adversarial_direction",
    "collapse_slices",
    "filter_normalized_direction",
    "gradient_direction",
    "input_slice",
    "perturbation_consistency",
    "slice_figure",
    "weight_line",
    "weight_slice",
]


@dataclass(frozen=True)
class Slice:
    """Losses on a grid: ``coords[0]`` along the first direction and, for 2-D slices, ``coords[1]`` along the second.

    ``loss`` has shape ``(len(a),)`` or ``(len(a), len(b))`` (averaged over examples; ``per_example`` keeps the
    examples as a first dimension for input slices). ``adversarial_loss`` is set for weight slices.
    """

    kind: str
    coords: tuple[list[float], ...]
    loss: Tensor
    per_example: Tensor | None = None
    adversarial_loss: Tensor | None = None
    labels: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "coords": [list(c) for c in self.coords], "directions":
                               list(self.labels), "loss": self.loss.tolist()}  # fmt: skip
        if self.adversarial_loss is not None:
            out["adversarial_loss"] = self.adversarial_loss.tolist()
        return out


def _unit(direction: Tensor, norm: Norm) -> Tensor:
    flat = direction.reshape(direction.shape[0], -1)
    size = torch.linalg.vector_norm(flat, ord={Norm.LINF: float("inf"), Norm.L2: 2.0, Norm.L1: 1.0}[norm], dim=1)
    return direction / size.clamp_min(1e-30).reshape(-1, *([1] * (direction.dim() - 1)))


def adversarial_direction(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, steps: int = 10, seed: int = 0
) -> Tensor:
    """Unit direction (threat norm) of each example's PGD perturbation; the loss gradient's steepest-ascent
    direction where PGD did not move the example."""
    import robustlab

    with model_mode(model, "eval"):
        result = robustlab.attack(model, x, y, threat, method="pgd", steps=steps, early_stop=False, seed=seed)
        delta = (result.x_adv - x).detach()
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    moved = delta.reshape(len(x), -1).abs().amax(1) > 0
    fallback = threat.steepest_ascent(grad)
    delta = torch.where(moved.reshape(-1, *([1] * (x.dim() - 1))), delta, fallback)
    return _unit(delta, threat.norm)


def gradient_direction(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
    """Unit direction (threat norm) of the one-step attack: the steepest ascent of the loss at ``x`` (the sign of
    the gradient for linf, as FGSM steps)."""
    with model_mode(model, "eval"):
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    return _unit(threat.steepest_ascent(grad), threat.norm)


def collapse_slices(
    models: dict[str, nn.Module], x: Tensor, y: Tensor, threat: ThreatModel, *, points: int = 21, span: float = 2.0,
    seed: int = 0,
) -> dict[str, Slice]:  # fmt: skip
    """1-D input slices of each model (e.g. ``{"before": ..., "after": ...}`` a catastrophic-overfitting event)
    along its own FGSM direction and its own PGD direction, ``points`` values in ``[-span, span] * eps``.

    Keys are ``"<name>, FGSM direction"`` and ``"<name>, PGD direction"``.
    """
    slices: dict[str, Slice] = {}
    for name, model in models.items():
        for label, u in (
            ("FGSM direction", gradient_direction(model, x, y, threat)),
            ("PGD direction", adversarial_direction(model, x, y, threat, seed=seed)),
        ):
            line = input_slice(model, x, y, threat, points=points, span=span, two_d=False, directions=(u, u))
            slices[f"{name}, {label}"] = dataclasses.replace(line, labels=(label,))
    return slices


def _grid(span: float, points: int) -> list[float]:
    return [span * (2 * k / (points - 1) - 1) for k in range(points)]


def input_slice(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    points: int = 21,
    span: float = 2.0,
    two_d: bool = True,
    directions: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
) -> Slice:
    """Cross-entropy at ``x + a u + b v`` for ``a, b`` in ``[-span, span] * eps`` (``points`` values each).

    ``u`` is the adversarial direction and ``v`` a random one (l2-orthogonal to ``u``), both of unit threat norm,
    unless ``directions`` gives them (per example, any norm: used as given).
    """
    check_positive_int("points", points, minimum=2)
    if directions is None:
        u = adversarial_direction(model, x, y, threat, seed=seed)
        generator = torch.Generator(device=x.device).manual_seed(seed)
        v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        flat_u, flat_v = u.reshape(len(x), -1), v.reshape(len(x), -1)
        coef = (flat_u * flat_v).sum(1, keepdim=True) / (flat_u * flat_u).sum(1, keepdim=True).clamp_min(1e-30)
        v = _unit((flat_v - coef * flat_u).reshape(x.shape), threat.norm)
    else:
        u, v = directions
    a_values = _grid(span * threat.eps, points)
    b_values = _grid(span * threat.eps, points) if two_d else [0.0]
    losses = torch.empty((len(x), len(a_values), len(b_values)), dtype=x.dtype, device=x.device)
    with torch.no_grad(), model_mode(model, "eval"):
        for i, a in enumerate(a_values):
            for j, b in enumerate(b_values):
                losses[:, i, j] = F.cross_entropy(model(x + a * u + b * v), y, reduction="none")
    per_example = losses if two_d else losses[:, :, 0]
    coords = (a_values, b_values) if two_d else (a_values,)
    labels = ("adversarial", "random") if directions is None else ("u", "v")
    return Slice("input", coords, per_example.mean(0), per_example, labels=labels[: len(coords)])


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    """A random weight-space direction, filter-normalized (Li et al. 2018); zero on one-dimensional tensors."""
    direction: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            direction[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        d_norm = d.reshape(len(d), -1).norm(dim=1).clamp_min(1e-30)
        p_norm = p.detach().reshape(len(p), -1).norm(dim=1)
        direction[name] = d * (p_norm / d_norm).reshape(-1, *([1] * (p.dim() - 1)))
    return direction


def _weight_losses(
    model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor, threat: ThreatModel | None, attack_steps: int
) -> tuple[float, float]:
    """(clean, adversarial) mean cross-entropy of the model with weights ``params`` (adversarial: NaN without a
    threat model)."""
    with _at_weights(model, params) as forward:
        with torch.no_grad():
            clean = float(F.cross_entropy(forward(x), y))
        if threat is None:
            return clean, float("nan")
        shifted = _Functional(forward).eval()
        import robustlab

        result = robustlab.attack(shifted, x, y, threat, method="pgd", steps=attack_steps, early_stop=False, seed=0)
        with torch.no_grad():
            adversarial = float(F.cross_entropy(forward(result.x_adv), y))
    return clean, adversarial


@contextlib.contextmanager
def _at_weights(model: nn.Module, params: dict[str, Tensor]) -> Iterator[Any]:
    """A function evaluating ``model`` with its parameters replaced by ``params``.

    :func:`torch.func.functional_call` leaves the model untouched, but it refuses TorchScript modules; those get
    ``params`` copied into their parameters for the duration, and their own weights copied back on exit.
    """
    if not isinstance(model, torch.jit.ScriptModule):
        buffers = dict(model.named_buffers())
        yield lambda z: functional_call(model, {**params, **buffers}, (z,))
        return
    own = dict(model.named_parameters())
    saved = {name: p.detach().clone() for name, p in own.items()}
    try:
        with torch.no_grad():
            for name, value in params.items():
                own[name].copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                own[name].copy_(value)


class _Functional(nn.Module):
    """A module around a function of the input (the model at shifted weights), for the attack API."""

    def __init__(self, function: Any) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: Tensor) -> Tensor:
        return self.function(x)


def weight_slice(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel | None = None,
    *,
    points: int = 11,
    span: float = 1.0,
    two_d: bool = False,
    attack_steps: int = 10,
    seed: int = 0,
) -> Slice:
    """Mean clean (and, with ``threat``, PGD) loss on ``(x, y)`` at ``theta + a d1 + b d2``, ``a, b`` in
    ``[-span, span]``, with filter-normalized random directions ``d1, d2`` (eval mode)."""
    check_positive_int("points", points, minimum=2)
    if not any(True for _ in model.parameters()):
        raise ConfigError("a weight-space slice needs a model with weights")
    generator = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(model, generator)
    d2 = filter_normalized_direction(model, generator) if two_d else None
    theta = {name: p.detach() for name, p in model.named_parameters()}
    a_values = _grid(span, points)
    b_values = _grid(span, points) if two_d else [0.0]
    clean = torch.empty((len(a_values), len(b_values)))
    adversarial = torch.empty_like(clean)
    with model_mode(model, "eval"):
        for i, a in enumerate(a_values):
            for j, b in enumerate(b_values):
                params = {n: t + a * d1[n] + (b * d2[n] if d2 is not None else 0) for n, t in theta.items()}
                clean[i, j], adversarial[i, j] = _weight_losses(model, params, x, y, threat, attack_steps)
    coords = (a_values, b_values) if two_d else (a_values,)
    squeeze = (lambda t: t) if two_d else (lambda t: t[:, 0])
    return Slice(
        "weights", coords, squeeze(clean), adversarial_loss=None if threat is None else squeeze(adversarial),
        labels=("filter-normalized d1", "filter-normalized d2")[: len(coords)],
    )  # fmt: skip


def perturbation_consistency(
    models: Sequence[nn.Module], x: Tensor, y: Tensor, threat: ThreatModel, *, steps: int = 10, seed: int = 0
) -> Tensor:
    """Mean cosine between the PGD perturbations of ``x`` under consecutive models (shape ``(len(models) - 1,)``).

    PGD runs with the same seed (same random start) for every model, so differences come from the models.
    """
    import robustlab

    if len(models) < 2:
        raise ConfigError("perturbation consistency compares at least two models (checkpoints)")
    deltas = []
    for model in models:
        with model_mode(model, "eval"):
            result = robustlab.attack(model, x, y, threat, method="pgd", steps=steps, early_stop=False, seed=seed)
        deltas.append((result.x_adv - x).reshape(len(x), -1))
    cosines = [F.cosine_similarity(a, b, dim=1, eps=1e-12).mean() for a, b in itertools.pairwise(deltas)]
    return torch.stack(cosines).detach()


def weight_line(model: nn.Module, other: nn.Module, fractions: Sequence[float]) -> list[nn.Module]:
    """Models on the straight line between the weights of ``model`` and ``other`` (same architecture)."""
    import copy

    start = dict(model.named_parameters())
    end = dict(other.named_parameters())
    if start.keys() != end.keys():
        raise ConfigError("the two models have different parameters: a weight-space line needs one architecture")
    line = []
    for t in fractions:
        point = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in point.named_parameters():
                p.copy_((1 - t) * start[name] + t * end[name])
        line.append(point)
    return line


def slice_figure(slices: dict[str, Slice], *, title: str = "") -> Any:
    """A figure of 1-D slices (one line per name; weight slices also draw their adversarial loss dashed) or of a
    single 2-D slice (contours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for name, s in slices.items():
        if len(s.coords) == 2:
            a, b = s.coords
            image = axis.contourf(b, a, s.loss.detach().cpu().numpy(), levels=20, cmap="viridis")
            figure.colorbar(image, ax=axis, label="cross-entropy")
            axis.set_xlabel(s.labels[1])
            axis.set_ylabel(s.labels[0])
            axis.set_title(title or name)
            return figure
        axis.plot(s.coords[0], s.loss.tolist(), marker="o", markersize=3, label=f"{name} (clean)")
        if s.adversarial_loss is not None:
            axis.plot(s.coords[0], s.adversarial_loss.tolist(), linestyle="--", label=f"{name} (PGD)")
    axis.set_xlabel("step along the direction" + (" (input units)" if any(s.kind == "input" for s in slices.values())
                                                   else " (filter-normalized)"))  # fmt: skip
    axis.set_ylabel("cross-entropy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title)
    return figure
