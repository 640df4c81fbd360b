"""Bound propagation: verified robustness of feed-forward networks by IBP and CROWN.

- IBP (interval bound propagation; Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training
  Verifiably Robust Models", 2018) pushes a box through the network layer by layer.
- CROWN (Zhang, Weng, Chen, Hsieh, Daniel, "Efficient Neural Network Robustness Certification with General
  Activation Functions", NeurIPS 2018) bounds every ReLU whose input can change sign by two lines and propagates a
  linear function of the input backwards to the input, where it is minimized in closed form over the ball (the
  dual norm of its coefficients).

Both bound the margins ``f_y(x') - f_j(x')`` (the specification is folded into the last linear layer, which makes
both exact on a linear model) for every ``x'`` in the threat model's ball intersected with the input box; an
example is *verified* when every margin's lower bound is positive. Verified accuracy <= true robust accuracy <=
empirical robust accuracy against any attack. CROWN's intermediate pre-activation bounds come from CROWN itself
(``intermediate="crown"``, tight, memory grows with layer width) or from IBP (``"ibp"``, cheap); each is
intersected with IBP's, and the final margins with IBP's margins, so CROWN is never looser than IBP.

Supported models: ``nn.Sequential`` (nested allowed) of ``Linear``, ``Conv2d``, ``ReLU``, ``Flatten``,
``AvgPool2d``, ``AdaptiveAvgPool2d``, ``BatchNorm1d/2d`` (eval mode), ``Identity``, ``Dropout`` (ignored: eval),
and robustlab's ``Normalize``. Affine layers of any kind are handled generically through autograd (their
transpose is a vector-Jacobian product), so the list is easy to extend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.checks import check_positive_int
from robustlab.errors import ConfigError, InvalidInputError
from robustlab.threat import Norm, ThreatModel

__all__ = ["BoundResult", "flatten_sequential", "margin_bounds", "verify"]

Method = Literal["ibp", "crown"]
_AFFINE = (nn.Linear, nn.Conv2d, nn.Flatten, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d)
_IGNORED = (nn.Identity, nn.Dropout)


def flatten_sequential(model: nn.Module) -> list[nn.Module]:
    """The layers of a (nested) ``nn.Sequential``, or a clear error naming what is not supported."""
    from robustlab.models import Normalize, NormalizedModel

    if isinstance(model, NormalizedModel):
        return [model.normalize, *flatten_sequential(model.model)]
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"bound propagation needs an nn.Sequential of supported layers, got {type(model).__name__}; "
            "rewrite the model as nn.Sequential(Conv2d, ReLU, ..., Flatten, Linear)"
        )
    layers: list[nn.Module] = []
    for layer in model:
        if isinstance(layer, nn.Sequential):
            layers.extend(flatten_sequential(layer))
        elif isinstance(layer, _IGNORED):
            continue
        elif isinstance(layer, (*_AFFINE, nn.ReLU, Normalize)):
            if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and layer.training:
                raise ConfigError("bound propagation needs BatchNorm in eval mode: call model.eval() first")
            layers.append(layer)
        else:
            raise ConfigError(
                f"bound propagation does not support {type(layer).__name__} layers (supported: Linear, Conv2d, "
                "ReLU, Flatten, AvgPool2d, AdaptiveAvgPool2d, BatchNorm in eval mode, Normalize, Identity, Dropout)"
            )
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise ConfigError("bound propagation needs the model to end with an nn.Linear layer producing the logits")
    return layers


def _is_affine(layer: nn.Module) -> bool:
    return not isinstance(layer, nn.ReLU)


def _spec_matrix(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """C with rows e_y - e_j for every j != y: shape (batch, num_classes - 1, num_classes)."""
    eye = torch.eye(num_classes, dtype=dtype, device=labels.device)
    others = torch.stack([torch.cat([torch.arange(0, y), torch.arange(y + 1, num_classes)]) for y in labels.tolist()])
    others = others.to(labels.device)
    return eye[labels].unsqueeze(1) - eye[others]  # (batch, K-1, K)


def _affine_transpose(layer: nn.Module, coefficients: Tensor, in_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """For an affine layer g(z) = L z + c: (L^T a, <a, c>) for each row a of ``coefficients``.

    ``coefficients`` has shape (batch, specs, *out_shape); the result has shape (batch, specs, *in_shape) and
    (batch, specs). Uses a vector-Jacobian product, valid for any affine layer.
    """
    batch, specs = coefficients.shape[:2]
    zero = torch.zeros((1, *in_shape), dtype=coefficients.dtype, device=coefficients.device)
    offset = layer(zero)[0]  # c
    flat = coefficients.reshape(batch * specs, *coefficients.shape[2:])
    if isinstance(layer, nn.Linear):
        transposed = flat @ layer.weight
    elif isinstance(layer, nn.Conv2d) and layer.groups == 1 and isinstance(layer.padding, tuple):
        out_h, out_w = flat.shape[-2:]
        stride, pad, dil = layer.stride, layer.padding, layer.dilation
        extra = [in_shape[i + 1] - ((o - 1) * stride[i] - 2 * pad[i] + dil[i] * (layer.weight.shape[2 + i] - 1) + 1)
                 for i, o in enumerate((out_h, out_w))]  # fmt: skip
        transposed = F.conv_transpose2d(
            flat, layer.weight, stride=stride, padding=pad, dilation=dil, output_padding=tuple(extra)
        )
    else:
        with torch.enable_grad():
            probe = torch.zeros((batch * specs, *in_shape), dtype=coefficients.dtype, device=coefficients.device)
            probe.requires_grad_(True)
            (transposed,) = torch.autograd.grad(layer(probe), probe, grad_outputs=flat)
    bias = (coefficients * offset).reshape(batch, specs, -1).sum(dim=2)
    return transposed.reshape(batch, specs, *in_shape), bias


def _ibp_layer(layer: nn.Module, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Interval bounds of a layer's output from bounds of its input (differentiable, for IBP training)."""
    if isinstance(layer, nn.ReLU):
        return lower.clamp_min(0), upper.clamp_min(0)
    from robustlab.models import Normalize

    center, radius = (upper + lower) / 2, (upper - lower) / 2
    mid = layer(center)
    if isinstance(layer, nn.Linear):
        spread = radius @ layer.weight.abs().T
    elif isinstance(layer, nn.Conv2d):
        spread = F.conv2d(radius, layer.weight.abs(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
    elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, _ = _batchnorm_affine(layer)
        spread = radius * scale.abs().reshape((1, -1) + (1,) * (radius.dim() - 2))
    elif isinstance(layer, Normalize):
        spread = radius / layer.std.to(radius.dtype).abs().reshape((1, -1) + (1,) * (radius.dim() - 2))
    else:  # flatten and average pooling: linear with non-negative weights and no bias
        spread = layer(radius)
    return mid - spread, mid + spread


def _batchnorm_affine(norm: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    assert norm.running_mean is not None and norm.running_var is not None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def _input_box(x: Tensor, threat: ThreatModel) -> tuple[Tensor, Tensor]:
    """Elementwise bounds containing the ball intersected with the box (exact for linf)."""
    radius = threat.eps  # every l1/l2 ball lies inside the linf ball of the same radius
    return (x - radius).clamp(min=threat.lower), (x + radius).clamp(max=threat.upper)


def _concretize(coefficients: Tensor, x: Tensor, threat: ThreatModel, lower: Tensor, upper: Tensor) -> Tensor:
    """min over the input set of <a, x'> for each row a: (batch, specs).

    linf: the set is the box [lower, upper] exactly. l2 / l1: the ball's dual-norm bound, improved by the box
    bound when tighter (both contain the true set, so the larger lower bound is valid).
    """
    a = coefficients.reshape(coefficients.shape[0], coefficients.shape[1], -1)
    lo = lower.reshape(lower.shape[0], 1, -1)
    hi = upper.reshape(upper.shape[0], 1, -1)
    box = (a.clamp(min=0) * lo + a.clamp(max=0) * hi).sum(dim=2)
    if threat.norm is Norm.LINF:
        return box
    center = (a * x.reshape(x.shape[0], 1, -1)).sum(dim=2)
    dual = a.norm(p=threat.norm.dual, dim=2)
    return torch.maximum(box, center - threat.eps * dual)


@dataclass(frozen=True)
class BoundResult:
    """Lower bounds of the margins ``f_y - f_j`` (j != y) over the threat model, per example."""

    margins: Tensor  # (batch, num_classes - 1)
    method: str

    @property
    def verified(self) -> Tensor:
        return (self.margins > 0).all(dim=1)


def _prepare(model: nn.Module, x: Tensor, labels: Tensor, threat: ThreatModel) -> tuple[list[nn.Module], Tensor, int]:
    if not isinstance(threat, ThreatModel):
        raise ConfigError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
    threat.check_inputs(x)
    layers = flatten_sequential(model)
    last = layers[-1]
    assert isinstance(last, nn.Linear)
    num_classes = last.out_features
    labels = labels.to(x.device).long()
    if labels.shape != (x.shape[0],) or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise InvalidInputError(f"labels must have shape ({x.shape[0]},) with values in 0..{num_classes - 1}")
    spec = _spec_matrix(labels, num_classes, x.dtype)
    return layers, spec, num_classes


def _spec_layer(last: nn.Linear, spec: Tensor) -> tuple[Tensor, Tensor]:
    """The last layer with the specification folded in: weight (batch, K-1, in), bias (batch, K-1)."""
    weight = spec @ last.weight
    bias = (
        spec @ last.bias if last.bias is not None else torch.zeros(spec.shape[:2], dtype=spec.dtype, device=spec.device)
    )
    return weight, bias


def _ibp(
    layers: list[nn.Module], spec: Tensor, x: Tensor, threat: ThreatModel
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """IBP margins and the pre-activation bounds of every layer's input (index i: input of layers[i])."""
    lower, upper = _input_box(x, threat)
    bounds = [(lower, upper)]
    # For l1/l2 balls the first weight layer's outputs are bounded by the dual norm of its rows, far tighter than
    # the box; this holds while only reshapes and a uniform normalization come before it (the ball stays a ball).
    ball: tuple[Tensor, float] | None = None if threat.norm is Norm.LINF else (x, threat.eps)
    for layer in layers[:-1]:
        if ball is not None and isinstance(layer, (nn.Linear, nn.Conv2d)):
            lower, upper = _first_layer_ball(layer, ball[0], ball[1], threat, lower, upper)
            ball = None
        else:
            lower, upper = _ibp_layer(layer, lower, upper)
            if ball is not None:
                ball = _ball_through(layer, ball)
        bounds.append((lower, upper))
    weight, bias = _spec_layer(layers[-1], spec)  # type: ignore[arg-type]
    flat_lo, flat_hi = lower.reshape(lower.shape[0], 1, -1), upper.reshape(upper.shape[0], 1, -1)
    margins = (weight.clamp(min=0) * flat_lo + weight.clamp(max=0) * flat_hi).sum(dim=2) + bias
    if ball is not None:
        # The margin layer is the first weight layer: bound it over the ball by the dual norm.
        center_in, radius = ball
        center = (weight * center_in.reshape(center_in.shape[0], 1, -1)).sum(dim=2) + bias
        margins = torch.maximum(margins, center - radius * weight.norm(p=threat.norm.dual, dim=2))
    return margins, bounds


def _ball_through(layer: nn.Module, ball: tuple[Tensor, float]) -> tuple[Tensor, float] | None:
    """The image of a ball under a reshape or a uniform normalization (still a ball), else None."""
    from robustlab.models import Normalize

    center, radius = ball
    if isinstance(layer, nn.Flatten):
        return layer(center), radius
    if isinstance(layer, Normalize) and bool((layer.std == layer.std[0]).all()):
        return layer(center), radius / float(layer.std[0])
    return None


def _first_layer_ball(
    layer: nn.Module, center_in: Tensor, radius: float, threat: ThreatModel, lower: Tensor, upper: Tensor
) -> tuple[Tensor, Tensor]:
    box_lo, box_hi = _ibp_layer(layer, lower, upper)
    center = layer(center_in)
    if isinstance(layer, nn.Linear):
        dual = layer.weight.norm(p=threat.norm.dual, dim=1)
        spread = radius * dual
    else:
        # A conv output is <kernel, patch>; every patch of a ball's point lies in the same ball.
        assert isinstance(layer, nn.Conv2d)
        dual = layer.weight.reshape(layer.weight.shape[0], -1).norm(p=threat.norm.dual, dim=1)
        spread = radius * dual.reshape(1, -1, 1, 1)
    return torch.maximum(box_lo, center - spread), torch.minimum(box_hi, center + spread)


def _crown_backward(
    layers: list[nn.Module],
    start: int,
    coefficients: Tensor,
    bias: Tensor,
    bounds: list[tuple[Tensor, Tensor]],
    x: Tensor,
    threat: ThreatModel,
) -> Tensor:
    """Lower bound of ``<coefficients, input of layers[start]> + bias`` over the input set, by CROWN."""
    a = coefficients
    total = bias
    for i in range(start - 1, -1, -1):
        layer = layers[i]
        if isinstance(layer, nn.ReLU):
            lower, upper = bounds[i]
            lo = lower.unsqueeze(1)
            hi = upper.unsqueeze(1)
            unstable = (lo < 0) & (hi > 0)
            active = lo >= 0
            slope_up = torch.where(unstable, hi / (hi - lo).clamp_min(1e-12), active.to(a.dtype))
            intercept_up = torch.where(unstable, -slope_up * lo, torch.zeros_like(lo))
            # The adaptive lower line of CROWN: slope 1 when the positive side dominates, else 0.
            slope_low = torch.where(unstable, (hi > -lo).to(a.dtype), active.to(a.dtype))
            positive, negative = a.clamp(min=0), a.clamp(max=0)
            total = total + (negative * intercept_up).reshape(a.shape[0], a.shape[1], -1).sum(dim=2)
            a = positive * slope_low + negative * slope_up
        else:
            in_shape = tuple(bounds[i][0].shape[1:])
            a, shift = _affine_transpose(layer, a, in_shape)
            total = total + shift
    input_lo, input_hi = bounds[0]
    return total + _concretize(a, x, threat, input_lo, input_hi)


def margin_bounds(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    threat: ThreatModel,
    method: Method = "crown",
    *,
    intermediate: Literal["crown", "ibp"] = "ibp",
) -> BoundResult:
    """Lower bounds of ``f_y(x') - f_j(x')`` over the threat model for every ``j != y``.

    Args:
        model: an ``nn.Sequential`` of supported layers (see the module docstring), in eval mode.
        x, labels: inputs inside the box and their labels.
        method: "ibp" or "crown".
        intermediate: for CROWN, how the ReLUs' pre-activation bounds are obtained ("ibp": cheap;
            "crown": tighter, one backward pass per neuron of each layer, for small networks).

    IBP's bounds are differentiable (for IBP training); CROWN's are too, but costlier.
    """
    if method not in ("ibp", "crown"):
        raise ConfigError(f"unknown bound method {method!r}: choose ibp or crown")
    layers, spec, _ = _prepare(model, x, labels, threat)
    ibp_margins, bounds = _ibp(layers, spec, x, threat)
    if method == "ibp":
        return BoundResult(ibp_margins, "ibp")
    if intermediate == "crown":
        bounds = _crown_intermediate(layers, bounds, x, threat)
    weight, bias = _spec_layer(layers[-1], spec)  # type: ignore[arg-type]
    last_in = tuple(bounds[-1][0].shape[1:])
    coefficients = weight.reshape(weight.shape[0], weight.shape[1], *last_in)
    crown = _crown_backward(layers, len(layers) - 1, coefficients, bias, bounds, x, threat)
    return BoundResult(torch.maximum(crown, ibp_margins), "crown")


def _crown_intermediate(
    layers: list[nn.Module], bounds: list[tuple[Tensor, Tensor]], x: Tensor, threat: ThreatModel
) -> list[tuple[Tensor, Tensor]]:
    """Tighten the pre-activation bounds of each ReLU with CROWN (intersected with IBP's)."""
    bounds = list(bounds)
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.ReLU):
            continue
        shape = tuple(bounds[i][0].shape[1:])
        neurons = int(torch.tensor(shape).prod())
        if neurons > 4096:
            raise ConfigError(
                f"CROWN intermediate bounds for a layer of {neurons} neurons need too much memory; "
                "use intermediate='ibp'"
            )
        eye = torch.eye(neurons, dtype=x.dtype, device=x.device).reshape(1, neurons, *shape)
        eye = eye.expand(x.shape[0], *eye.shape[1:])
        zero = torch.zeros(x.shape[0], neurons, dtype=x.dtype, device=x.device)
        low = _crown_backward(layers, i, eye, zero, bounds, x, threat).reshape(x.shape[0], *shape)
        high = -_crown_backward(layers, i, -eye, zero, bounds, x, threat).reshape(x.shape[0], *shape)
        ibp_lo, ibp_hi = bounds[i]
        lower, upper = torch.maximum(low, ibp_lo), torch.minimum(high, ibp_hi)
        bounds[i] = (lower, upper)
        # Later layers' IBP bounds follow from the tightened ones.
        lo, hi = lower, upper
        for j in range(i, len(layers) - 1):
            lo, hi = _ibp_layer(layers[j], lo, hi)
            prev_lo, prev_hi = bounds[j + 1]
            lo, hi = torch.maximum(lo, prev_lo), torch.minimum(hi, prev_hi)
            bounds[j + 1] = (lo, hi)
    return bounds


def verify(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    threat: ThreatModel,
    method: Method = "crown",
    *,
    intermediate: Literal["crown", "ibp"] = "ibp",
    batch_size: int | None = None,
) -> Tensor:
    """Per-example mask: the prediction ``labels`` provably holds on the whole ball (batched, no gradients).

    ``batch_size`` examples are bounded at a time (default 256, or 16 with CROWN intermediate bounds: those hold a
    dense linear map from the input to every hidden neuron per example, e.g. 3136 x 784 floats for one MNIST conv
    layer, and 256 examples of them exhaust a 24 GB machine).
    """
    if batch_size is None:
        batch_size = 16 if method == "crown" and intermediate == "crown" else 256
    check_positive_int("batch_size", batch_size)
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            result = margin_bounds(
                model, x[start : start + batch_size], labels[start : start + batch_size], threat, method,
                intermediate=intermediate,
            )  # fmt: skip
            out.append(result.verified)
    return torch.cat(out)
