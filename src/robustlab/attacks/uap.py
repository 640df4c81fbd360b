"""Universal adversarial perturbations: one perturbation ``v`` for a whole data set.

Moosavi-Dezfooli, Fawzi, Fawzi, Frossard. "Universal adversarial perturbations", CVPR 2017 (Algorithm 1). With
``v = 0``, pass over the fitting images in a random order; for each image ``x_i`` whose label ``x_i + v`` does not
change, DeepFool (Moosavi-Dezfooli, Fawzi, Frossard, CVPR 2016) from ``x_i + v`` finds a small ``dv_i`` that
changes it, and ``v <- P(v + dv_i)``, the projection onto the ball of radius eps (linf: clip; l2: rescale). Passes
repeat until the fooling rate on the fitting images reaches ``target_fooling`` (the paper's ``1 - delta``, 0.8) or
``passes`` have run. DeepFool here is the multi-class version over the ``candidates`` most likely other classes with
overshoot 0.02 (the paper's), in l2 (``r = |f_k| / ||w_k||_2^2 w_k``) or linf (its l_p form with ``q = 1``:
``r = |f_k| / ||w_k||_1 sign(w_k)``), at most ``deepfool_steps`` steps, every point clipped to the box.

The SGD variant (``method="sgd"``; Shafahi, Najibi, Xu, Dickerson, Davis, Goldstein, "Universal Adversarial
Training", AAAI 2020) maximizes the mean loss over mini-batches: ``v <- P(v + lr * steepest_ascent(grad_v
mean_i loss(clip(x_i + v))))`` for ``passes`` epochs (the sign of the gradient in linf).

The perturbation is crafted white-box on the target itself or on a surrogate (any ``torch.nn.Module``; an
ensemble via :class:`robustlab.attacks._surrogate.Ensemble`) and reported by :func:`fooling_rate` on held-out
images, which needs only the target's labels: an image is fooled when ``clip(x + v)`` is labelled differently from
``x`` (the paper's definition). ``v`` lies in the ball, and every ``clip(x + v)`` in ball and box.

Example:
    >>> found = universal_perturbation(surrogate, x_fit, ThreatModel("linf", 0.3), seed=0)
    >>> fooling_rate(target, x_heldout, found.perturbation, ThreatModel("linf", 0.3)).rate
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from robustlab.attacks.base import AttackConfig, make_generator
from robustlab.checks import check_choice, check_fraction, check_number, check_positive_int
from robustlab.errors import ConfigError, InvalidInputError
from robustlab.goals import Goal
from robustlab.losses import attack_loss
from robustlab.oracles import GradientOracle, LabelOracle, module_function
from robustlab.threat import Norm, ThreatModel

__all__ = ["FoolingRate", "UAPConfig", "UAPResult", "deepfool", "fooling_rate", "universal_perturbation"]


@dataclass(frozen=True)
class UAPConfig(AttackConfig):
    """Options of :func:`universal_perturbation`.

    Attributes:
        method: ``"deepfool"`` (the paper's Algorithm 1) or ``"sgd"``.
        passes: passes over the fitting images (epochs for SGD).
        target_fooling: stop once this fooling rate on the fitting images is reached (DeepFool; ``1 - delta``).
        deepfool_steps, overshoot, candidates: DeepFool's iterations, overshoot and classes considered.
        lr: SGD step; None: ``eps / 10``. batch_size: SGD mini-batch. loss: SGD loss (``"ce"``, ``"margin"``).
    """

    method: str = "deepfool"
    passes: int = 5
    target_fooling: float = 0.8
    deepfool_steps: int = 50
    overshoot: float = 0.02
    candidates: int = 10
    lr: float | None = None
    batch_size: int = 32
    loss: str = "ce"

    def validate(self) -> None:
        check_choice("method", self.method, ("deepfool", "sgd"))
        check_positive_int("passes", self.passes)
        check_fraction("target_fooling", self.target_fooling, allow_one=True)
        check_positive_int("deepfool_steps", self.deepfool_steps)
        check_number("overshoot", self.overshoot, low=0.0)
        check_positive_int("candidates", self.candidates)
        if self.lr is not None:
            check_number("lr", self.lr, low=0, low_open=True)
        check_positive_int("batch_size", self.batch_size)
        attack_loss(self.loss)


@dataclass(frozen=True)
class UAPResult:
    """The universal perturbation ``(1, *shape)`` (inside the ball), the fooling rate on the fitting images after
    each pass, and the gradient evaluations spent on the crafting model."""

    perturbation: Tensor
    fit_fooling: list[float] = field(default_factory=list)
    gradients: int = 0


@dataclass(frozen=True)
class FoolingRate:
    """Fooling rate of a universal perturbation on images: ``fooled`` per image, the ``rate``, and the label
    queries made of the model (clean and perturbed: 2 per image)."""

    fooled: Tensor
    rate: float
    queries: int


def _project_ball(v: Tensor, threat: ThreatModel) -> Tensor:
    """``v`` onto the threat model's ball around 0 (linf: clip; l2: rescale)."""
    if threat.norm is Norm.LINF:
        return v.clamp(-threat.eps, threat.eps)
    norm = v.flatten().norm()
    return v * min(1.0, threat.eps / max(float(norm), 1e-30))


def _apply(x: Tensor, v: Tensor, threat: ThreatModel) -> Tensor:
    return threat.clip_to_box(x + v)


def deepfool(
    model: nn.Module, x: Tensor, labels: Tensor, threat: ThreatModel, *, steps: int, overshoot: float, candidates: int
) -> tuple[Tensor, int]:
    """DeepFool's perturbations ``r`` (``(n, ...)``) moving each ``x`` off ``labels`` (clipped to the box), and the
    gradient evaluations made. Rows that never leave their label within ``steps`` keep the last ``r``."""
    n = int(x.shape[0])
    total = torch.zeros_like(x)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    gradients = 0
    for _ in range(steps):
        rows = active.nonzero().flatten()
        if rows.numel() == 0:
            break
        point = threat.clip_to_box(x[rows] + (1 + overshoot) * total[rows]).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(point)
        still = logits.argmax(1) == labels[rows]
        active[rows[~still]] = False
        if not bool(still.any()):
            break
        k = min(candidates, int(logits.shape[1]))
        others = logits.detach().scatter(1, labels[rows, None], float("-inf")).topk(k - 1, dim=1).indices
        own = logits.gather(1, labels[rows, None])[:, 0]
        (own_grad,) = torch.autograd.grad(own.sum(), point, retain_graph=True)
        best_ratio = torch.full((rows.numel(),), float("inf"), dtype=x.dtype, device=x.device)
        best_step = torch.zeros_like(point)
        for j in range(k - 1):
            other = logits.gather(1, others[:, j : j + 1])[:, 0]
            (other_grad,) = torch.autograd.grad(other.sum(), point, retain_graph=j < k - 2)
            w = (other_grad - own_grad).flatten(1)
            f = (other - own).detach().abs()
            if threat.norm is Norm.LINF:
                size = w.abs().sum(1).clamp_min(1e-12)
                step = ((f + 1e-4) / size)[:, None] * w.sign()
            else:
                size = w.norm(dim=1).clamp_min(1e-12)
                step = ((f + 1e-4) / size**2)[:, None] * w
            ratio = f / size
            better = ratio < best_ratio
            best_ratio = torch.where(better, ratio, best_ratio)
            best_step = torch.where(better[:, None], step, best_step.flatten(1)).reshape(point.shape)
        gradients += k
        moving = rows[still]
        total[moving] = total[moving] + best_step[still].detach()
    return (1 + overshoot) * total, gradients


def universal_perturbation(
    model: nn.Module | GradientOracle,
    x: Tensor,
    threat: ThreatModel,
    config: UAPConfig | None = None,
    *,
    seed: int | None = None,
) -> UAPResult:
    """A universal perturbation for the images ``x``, crafted white-box on ``model`` (the target or a surrogate)."""
    config = config if config is not None else UAPConfig()
    config.validate()
    if not isinstance(threat, ThreatModel) or threat.norm not in (Norm.LINF, Norm.L2):
        raise ConfigError("universal perturbations are crafted in linf or l2: give a ThreatModel of either")
    module = model.module if isinstance(model, GradientOracle) else model
    if not isinstance(module, nn.Module):
        raise InvalidInputError(f"a universal perturbation is crafted on a torch.nn.Module, got {type(model).__name__}")
    threat.check_inputs(x)
    generator = make_generator(x.device, seed)
    handle = GradientOracle(module).bind(int(x.shape[0]), x.device)
    with handle.session():
        with torch.no_grad():
            labels = module(x).argmax(1)
        if config.method == "deepfool":
            return _deepfool_uap(module, x, labels, threat, config, generator)
        return _sgd_uap(module, x, labels, threat, config, generator)


def _deepfool_uap(
    model: nn.Module, x: Tensor, labels: Tensor, threat: ThreatModel, config: UAPConfig, generator: torch.Generator
) -> UAPResult:
    v = torch.zeros_like(x[:1])
    history: list[float] = []
    gradients = 0
    for _ in range(config.passes):
        for i in torch.randperm(int(x.shape[0]), generator=generator, device=x.device).tolist():
            point = _apply(x[i : i + 1], v, threat)
            with torch.no_grad():
                if int(model(point).argmax(1)) != int(labels[i]):
                    continue
            step, used = deepfool(
                model, point, labels[i : i + 1], threat,
                steps=config.deepfool_steps, overshoot=config.overshoot, candidates=config.candidates,
            )  # fmt: skip
            gradients += used
            v = _project_ball(v + step, threat)
        with torch.no_grad():
            rate = float((model(_apply(x, v, threat)).argmax(1) != labels).float().mean())
        history.append(rate)
        if rate >= config.target_fooling:
            break
    return UAPResult(v, history, gradients)


def _sgd_uap(
    model: nn.Module, x: Tensor, labels: Tensor, threat: ThreatModel, config: UAPConfig, generator: torch.Generator
) -> UAPResult:
    loss = attack_loss(config.loss)
    lr = config.lr if config.lr is not None else threat.eps / 10
    v = torch.zeros_like(x[:1])
    history: list[float] = []
    gradients = 0
    for _ in range(config.passes):
        order = torch.randperm(int(x.shape[0]), generator=generator, device=x.device)
        for start in range(0, int(x.shape[0]), config.batch_size):
            rows = order[start : start + config.batch_size]
            v_var = v.detach().requires_grad_(True)
            with torch.enable_grad():
                values = loss(model(_apply(x[rows], v_var, threat)), Goal(labels[rows]))
                (grad,) = torch.autograd.grad(values.mean(), v_var)
            gradients += int(rows.numel())
            v = _project_ball(v + lr * threat.steepest_ascent(grad), threat).detach()
        with torch.no_grad():
            history.append(float((model(_apply(x, v, threat)).argmax(1) != labels).float().mean()))
    return UAPResult(v, history, gradients)


def fooling_rate(
    model: nn.Module | LabelOracle, x: Tensor, perturbation: Tensor, threat: ThreatModel, *, batch_size: int = 256
) -> FoolingRate:
    """How often ``clip(x + perturbation)`` is labelled differently from ``x`` by ``model`` (labels only)."""
    if perturbation.shape != (1, *x.shape[1:]):
        raise InvalidInputError(
            f"the perturbation has shape {tuple(perturbation.shape)}; for these images it must be {(1, *x.shape[1:])}"
        )
    size = float(threat.distance(perturbation, torch.zeros_like(perturbation))[0])
    if size > threat.eps * (1 + 1e-5) + 1e-7:
        raise InvalidInputError(f"the perturbation's {threat.norm.value} norm {size:.4g} exceeds eps {threat.eps:g}")
    oracle = model if isinstance(model, LabelOracle) else LabelOracle(module_function(model))
    fooled = []
    queries = 0
    for start in range(0, int(x.shape[0]), batch_size):
        chunk = x[start : start + batch_size]
        bound = oracle.bind(2 * int(chunk.shape[0]), chunk.device)
        both = bound.labels(torch.cat([chunk, _apply(chunk, perturbation, threat)]))
        queries += int(bound.queries.sum())
        clean, moved = both.split(int(chunk.shape[0]))
        fooled.append(clean != moved)
    mask = torch.cat(fooled) if fooled else torch.zeros(0, dtype=torch.bool)
    return FoolingRate(mask, float(mask.float().mean()) if mask.numel() else 0.0, queries)
