"""Curvature: the top Hessian eigenvalue of the loss with respect to the input and to the weights.

Power iteration with Hessian-vector products (``torch.autograd`` double backward: ``H v = grad <grad L, v>``), as
in Yao et al., "PyHessian: Neural Networks Through the Lens of the Hessian" (2020), and for the input Hessian as in
Moosavi-Dezfooli et al., "Robustness via Curvature Regularization, and Vice Versa" (CVPR 2019). The iteration
converges to the eigenvalue of largest magnitude; the reported value is the Rayleigh quotient ``v^T H v`` of the
final unit vector (so its sign is kept), with the iterations run and the last relative change.

On ReLU networks the cross-entropy's input Hessian is not zero: the softmax is curved even where the network is
linear, so ``H = J^T (diag(p) - p p^T) J`` on each linear region (piecewise constant in ``x``, not zero).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.checks import check_number, check_positive_int
from robustlab.errors import ConfigError
from robustlab.utils import model_mode

__all__ = [
    "EigenResult",
    "PowerConfig",
    "input_hessian_eigenvalue",
    "top_input_eigenvalue",
    "top_weight_eigenvalue",
    "weight_hessian_eigenvalue",
]


@dataclass(frozen=True)
class PowerConfig:
    """Power iteration: at most ``iterations`` steps, stopping when the eigenvalue changes by less than ``tol``
    (relative) between two steps; ``seed`` draws the start vector."""

    iterations: int = 100
    tol: float = 1e-4
    seed: int = 0

    def validate(self) -> None:
        check_positive_int("iterations", self.iterations)
        check_number("tol", self.tol, low=0, low_open=True)


@dataclass(frozen=True)
class EigenResult:
    """Top eigenvalue(s) (a tensor ``(n,)`` per example for the input Hessian, one number for the weights), the
    iterations each took, and the last relative change (below ``tol`` when ``converged``)."""

    eigenvalue: Tensor
    iterations: Tensor
    relative_change: Tensor
    tol: float

    @property
    def converged(self) -> Tensor:
        return self.relative_change <= self.tol

    def summary(self) -> dict[str, Any]:
        return {
            "eigenvalue": self.eigenvalue.tolist(),
            "iterations": self.iterations.tolist(),
            "relative_change": self.relative_change.tolist(),
            "converged": self.converged.tolist(),
        }


def _rows_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(1)


def _unit_rows(v: Tensor) -> Tensor:
    return v / v.reshape(v.shape[0], -1).norm(dim=1).clamp_min(1e-30).reshape(-1, *([1] * (v.dim() - 1)))


def top_input_eigenvalue(
    function: Callable[[Tensor], Tensor], x: Tensor, config: PowerConfig | None = None
) -> EigenResult:
    """Top eigenvalue of each example's Hessian of ``function`` (a per-example scalar, shape ``(n,)``) at ``x``.

    Examples are independent (``function`` must not mix them, e.g. no train-mode BatchNorm), so one batched
    Hessian-vector product serves every example; each stops at its own convergence.
    """
    config = config or PowerConfig()
    config.validate()
    generator = torch.Generator(device=x.device).manual_seed(config.seed)
    v = _unit_rows(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
    point = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(function(point).sum(), point, create_graph=True)
    n = x.shape[0]
    eigen = torch.full((n,), float("nan"), dtype=x.dtype, device=x.device)
    change = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    steps = torch.zeros(n, dtype=torch.long, device=x.device)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    for step in range(1, config.iterations + 1):
        if not grad.requires_grad:  # the function is linear in x: its Hessian is zero
            return EigenResult(torch.zeros_like(eigen), steps, torch.zeros_like(change), config.tol)
        (hv,) = torch.autograd.grad(grad, point, grad_outputs=v, retain_graph=True)
        rayleigh = _rows_dot(v, hv).detach()
        relative = (rayleigh - eigen).abs() / rayleigh.abs().clamp_min(1e-30)
        change = torch.where(active, relative.nan_to_num(float("inf")), change)
        eigen = torch.where(active, rayleigh, eigen)
        steps = torch.where(active, torch.full_like(steps, step), steps)
        active = active & (change > config.tol)
        if not bool(active.any()):
            break
        norm = hv.reshape(n, -1).norm(dim=1)
        fresh = _unit_rows(hv.detach())
        v = torch.where((active & (norm > 0)).reshape(-1, *([1] * (x.dim() - 1))), fresh, v)
    return EigenResult(eigen, steps, change, config.tol)


def input_hessian_eigenvalue(model: nn.Module, x: Tensor, y: Tensor, config: PowerConfig | None = None) -> EigenResult:
    """Top eigenvalue of the cross-entropy's Hessian with respect to each input (model in eval mode)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"curvature needs gradients: pass an nn.Module, got {type(model).__name__}")
    with model_mode(model, "eval"):
        return top_input_eigenvalue(lambda z: F.cross_entropy(model(z), y, reduction="none"), x, config)


def top_weight_eigenvalue(
    model: nn.Module,
    loss: Callable[[nn.Module, Any], Tensor],
    batches: Callable[[], Iterable[Any]],
    config: PowerConfig | None = None,
) -> EigenResult:
    """Top eigenvalue of the Hessian of the mean loss with respect to the model's trainable weights.

    ``batches()`` yields the data afresh at every iteration (streamed, never held whole); ``loss(model, batch)``
    returns the batch's summed loss and is divided by the number of examples, which ``batch`` reports as its
    first element's length. Each iteration is one pass over the data.
    """
    config = config or PowerConfig()
    config.validate()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable weights")
    generator = torch.Generator(device=params[0].device).manual_seed(config.seed)
    v = [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in params]
    v = _normalized(v)
    eigen, change, done = float("nan"), float("inf"), 0
    for step in range(1, config.iterations + 1):
        done = step
        hv = [torch.zeros_like(p) for p in params]
        count = 0
        for batch in batches():
            value = loss(model, batch)
            grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
            used = [(g, u) for g, u in zip(grads, v, strict=True) if g is not None and g.requires_grad]
            if used:
                dot = torch.stack([(g * u).sum() for g, u in used]).sum()
                second = torch.autograd.grad(dot, params, allow_unused=True)
                hv = [h + s.detach() if s is not None else h for h, s in zip(hv, second, strict=True)]
            count += len(batch[0])
        hv = [h / max(count, 1) for h in hv]
        rayleigh = float(sum((a * b).sum() for a, b in zip(v, hv, strict=True)))
        change = abs(rayleigh - eigen) / max(abs(rayleigh), 1e-30) if eigen == eigen else float("inf")
        eigen = rayleigh
        if change <= config.tol:
            break
        if float(sum(h.pow(2).sum() for h in hv)) == 0:
            change = 0.0
            break
        v = _normalized(hv)
    return EigenResult(torch.tensor([eigen]), torch.tensor([done]), torch.tensor([change]), config.tol)


def _normalized(vectors: list[Tensor]) -> list[Tensor]:
    norm = torch.sqrt(sum(t.pow(2).sum() for t in vectors)).clamp_min(1e-30)  # type: ignore[arg-type]
    return [t / norm for t in vectors]


def weight_hessian_eigenvalue(
    model: nn.Module,
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    config: PowerConfig | None = None,
) -> EigenResult:
    """Top eigenvalue of the mean cross-entropy's Hessian with respect to the weights, over ``batches()``.

    The model runs in eval mode (BatchNorm uses its running statistics, dropout is off), so the Hessian is that of
    a fixed function of the weights.
    """
    device = next(model.parameters()).device

    def cross_entropy(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(net(x.to(device)), y.to(device), reduction="sum")

    with model_mode(model, "eval"):
        return top_weight_eigenvalue(model, cross_entropy, batches, config)
