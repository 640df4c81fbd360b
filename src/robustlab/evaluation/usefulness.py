"""Do the gradients an attack follows predict the loss? Three measurements the evaluation adapts to.

- :func:`gradient_usefulness`: per example, the loss change the gradient predicts (its inner product with the step)
  against the change finite differences measure, along the gradient's own steepest-ascent direction and along random
  directions of the threat model's norm, at several scales up to eps. It reports the (rank) correlation of
  predicted and actual changes and the fraction of examples where the gradient step gains no more than the best of
  a few random steps at most scales.
  Zero or vanishing gradients are one way to fail it; an oscillating term added to the logits (large, useless
  gradients) or a non-differentiable layer whose gradient ignores what the layer does are others (Athalye, Carlini
  & Wagner, "Obfuscated Gradients Give a False Sense of Security", ICML 2018; Carlini et al., "On Evaluating
  Adversarial Robustness", 2019, section 5: "verify that gradient steps beat random steps").
- :func:`non_differentiable_modules`: module by module (forward hooks), the change of each shape-preserving leaf
  module's output under a small input change against what its backward pass predicts: a module whose gradient
  misses the change (quantization, a one-hot output, a sign) or overstates it wildly is a candidate for BPDA with
  the identity, without the user naming it.
- :func:`flip_rate`: how often one draw of a randomized model disagrees with its majority over many draws; the
  vote size the evaluation uses follows from it (:func:`votes_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustlab.threat import Norm, ThreatModel

__all__ = [
    "Usefulness",
    "flip_rate",
    "gradient_usefulness",
    "margin_loss",
    "non_differentiable_modules",
    "output_module",
    "votes_for",
]

SCALES = (1 / 16, 1 / 4, 1.0)  # fractions of eps at which finite differences are taken
RANDOM_DIRECTIONS = 4
USEFUL_CORRELATION = 0.3  # an example's gradient is useful when predicted and actual changes correlate this much
WORSE_THAN_RANDOM = 0.3  # gradients are useless when the gradient step loses to random steps on more examples


def margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per example: the best other logit minus the logit of ``labels`` (an attack increases it)."""
    own = logits.gather(1, labels[:, None])[:, 0]
    other = logits.scatter(1, labels[:, None], -math.inf).amax(1)
    return other - own


def cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits, labels, reduction="none")


@dataclass(frozen=True)
class Usefulness:
    """What :func:`gradient_usefulness` measured on a probe of examples."""

    loss: str
    correlation: float  # median over examples of the correlation between predicted and actual loss changes
    worse_than_random: float  # fraction of examples where the gradient step gained no more than the best random step
    zero: float  # fraction of examples with an exactly zero gradient
    examples: int

    @property
    def useful(self) -> bool:
        return self.correlation >= USEFUL_CORRELATION and self.worse_than_random <= WORSE_THAN_RANDOM

    def describe(self) -> str:
        return (
            f"{self.loss} loss: predicted and actual loss changes correlate {self.correlation:.2f} (median over "
            f"{self.examples} examples); the gradient step gains no more than a random step for "
            f"{100 * self.worse_than_random:.0f}% of them; {100 * self.zero:.0f}% have a zero gradient"
        )


def _unit(direction: Tensor, norm: Norm) -> Tensor:
    """``direction`` scaled to norm 1 per example in ``norm`` (l0: as l1)."""
    flat = direction.reshape(direction.shape[0], -1)
    if norm is Norm.LINF:
        size = flat.abs().amax(1)
    elif norm is Norm.L2:
        size = flat.norm(dim=1)
    else:
        size = flat.abs().sum(1)
    return direction / size.clamp_min(1e-30).reshape(-1, *([1] * (direction.dim() - 1)))


def _steepest(grad: Tensor, norm: Norm) -> Tensor:
    """The steepest-ascent unit direction of ``grad`` in ``norm`` (linf: its sign; l1/l0: its largest coordinate)."""
    if norm is Norm.LINF:
        return grad.sign()
    if norm is Norm.L2:
        return _unit(grad, norm)
    flat = grad.reshape(grad.shape[0], -1)
    top = flat.abs().argmax(1, keepdim=True)
    return torch.zeros_like(flat).scatter(1, top, flat.gather(1, top).sign()).reshape(grad.shape)


def _random_direction(like: Tensor, norm: Norm, generator: torch.Generator) -> Tensor:
    if norm is Norm.LINF:
        return torch.randint(0, 2, like.shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1
    noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return _unit(noise, norm)


def gradient_usefulness(
    model: nn.Module, x: Tensor, labels: Tensor, threat: ThreatModel, *, loss: str = "margin", seed: int = 0
) -> Usefulness:
    """Compare the gradient's predicted loss changes with finite differences on ``(x, labels)`` (see the module).

    ``loss`` is "margin" (:func:`margin_loss`) or "ce". A randomized model should be passed averaged (EOT): the
    finite differences then measure the averaged loss."""
    loss_fn = margin_loss if loss == "margin" else cross_entropy_loss
    x = x.detach()
    x_var = x.clone().requires_grad_(True)
    with torch.enable_grad():
        base = loss_fn(model(x_var), labels)
        differentiable = base.requires_grad  # False for an output cut from the graph (argmax, one-hot)
        (grad,) = torch.autograd.grad(base.sum(), x_var, allow_unused=True) if differentiable else (None,)
    grad = torch.zeros_like(x) if grad is None else grad.detach()
    base = base.detach()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    directions = [_steepest(grad, threat.norm)] + [
        _random_direction(x, threat.norm, generator) for _ in range(RANDOM_DIRECTIONS)
    ]
    predicted, actual = [], []  # each: [scales * directions] tensors of shape (batch,)
    with torch.no_grad():
        for scale in SCALES:
            for direction in directions:
                moved = (x + scale * threat.eps * direction).clamp(threat.lower, threat.upper)
                step = moved - x
                predicted.append((grad * step).reshape(len(x), -1).sum(1))
                actual.append(loss_fn(model(moved), labels) - base)
    pred, act = torch.stack(predicted, 1).double(), torch.stack(actual, 1).double()  # (batch, pairs)
    correlation = _row_correlation(_ranks(pred), _ranks(act))  # Spearman: one huge predicted change is one rank
    per_scale = act.reshape(len(x), len(SCALES), len(directions))
    worse = (per_scale[:, :, 0] <= per_scale[:, :, 1:].amax(2)).double().mean(1) > 0.5
    zero = grad.reshape(len(x), -1).abs().amax(1) == 0
    return Usefulness(
        loss=loss,
        correlation=float(correlation.median()) if len(x) else 1.0,
        worse_than_random=float((worse | zero).double().mean()) if len(x) else 0.0,
        zero=float(zero.double().mean()) if len(x) else 0.0,
        examples=len(x),
    )


def _ranks(values: Tensor) -> Tensor:
    """Each row's ranks (ties broken by position)."""
    return values.argsort(1).argsort(1).double()


def _row_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (0 where either row is constant)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denominator > 0, (a * b).sum(1) / denominator.clamp_min(1e-300), torch.zeros_like(denominator))


@dataclass(frozen=True)
class ModuleProbe:
    """One leaf module's verdict: the share of its output change (under a small input change) its backward pass
    accounts for (1: exact; 0: the gradient misses the change)."""

    name: str
    ratio: float

    @property
    def broken(self) -> bool:
        return not 0.1 <= self.ratio <= 10.0


def non_differentiable_modules(model: nn.Module, x: Tensor, *, seed: int = 0) -> list[ModuleProbe]:
    """The shape-preserving leaf modules of ``model`` whose gradient does not describe their output change on the
    inputs they see for ``x`` (see the module docstring), in call order. Random modules are probed with the same
    draws on both sides of each difference."""
    seen: dict[str, Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):
            hooks.append(module.register_forward_hook(_recorder(name, seen)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    modules = dict(model.named_modules())
    found = []
    for name, inputs in seen.items():
        probe = _probe(name, modules[name], inputs, seed)
        if probe is not None and probe.broken:
            found.append(probe)
    return found


def output_module(model: nn.Module, x: Tensor) -> str | None:
    """The name of the leaf module whose forward finishes last in ``model(x)`` when its output is shaped like the
    model's (per example): the model's output layer, or None when the forward ends outside any module."""
    finished: list[tuple[str, torch.Size]] = []

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            if isinstance(output, Tensor):
                finished.append((name, output.shape[1:]))

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if name and not any(True for _ in module.children())
    ]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    if not finished or finished[-1][1] != out.shape[1:]:
        return None
    return finished[-1][0]


def _recorder(name: str, seen: dict[str, Tensor]):  # type: ignore[no-untyped-def]
    def record(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        first = args[0] if args else None
        if (
            isinstance(first, Tensor) and first.is_floating_point() and isinstance(output, Tensor)
            and output.shape == first.shape and name not in seen
        ):  # fmt: skip
            seen[name] = first.detach().clone()

    return record


def _probe(name: str, module: nn.Module, inputs: Tensor, seed: int) -> ModuleProbe | None:
    """Compare ``<d, J v>`` with ``<d, d> / h`` where ``d = m(u + h v) - m(u)`` (same random draws), at the smallest
    step ``h`` that changes the output; None when no step does."""
    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    v = torch.randn(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
    size = float(inputs.abs().mean()) or 1.0
    for relative in (1e-3, 1e-2, 1e-1, 1.0):
        h = relative * size
        u = inputs.clone().requires_grad_(True)
        with torch.enable_grad():
            out = _seeded(module, u, seed)
        with torch.no_grad():
            change = _seeded(module, inputs + h * v, seed) - out.detach()
        if float(change.norm()) <= 1e-6 * max(float(out.detach().norm()), 1e-12):
            continue
        if not out.requires_grad:
            return ModuleProbe(name, 0.0)
        (vjp,) = torch.autograd.grad(out, u, grad_outputs=change, allow_unused=True)
        predicted = 0.0 if vjp is None else float((vjp * v).sum())
        return ModuleProbe(name, predicted / (float((change * change).sum()) / h))
    return None


def _seeded(module: nn.Module, u: Tensor, seed: int) -> Tensor:
    devices = [u.device] if u.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return module(u)


def flip_rate(model: nn.Module, x: Tensor, *, draws: int = 16) -> float:
    """Mean over examples and draws of one draw's prediction differing from the majority over ``draws`` draws."""
    with torch.no_grad():
        predictions = torch.stack([model(x).argmax(1) for _ in range(draws)])  # (draws, batch)
    majority = predictions.mode(dim=0).values
    return float((predictions != majority).double().mean())


def votes_for(rate: float, *, error: float = 0.01, minimum: int = 1, maximum: int = 101) -> int:
    """The odd number of draws whose majority errs with probability at most ``error`` when one draw flips with
    probability ``rate`` (Hoeffding: ``n >= ln(1/error) / (2 (1/2 - rate)^2)``), within ``[minimum, maximum]``."""
    if rate <= 0:
        return max(minimum, 1)
    gap = max(0.5 - rate, 1e-3)
    needed = math.ceil(math.log(1 / error) / (2 * gap * gap))
    needed = min(max(needed, minimum), maximum)
    return needed if needed % 2 else needed + 1
