"""Linear relaxations of the nonlinear operations: ``lw * z + lb <= f(z) <= uw * z + ub`` for ``z`` in ``[l, u]``.

- ReLU / LeakyReLU (slope ``a`` for negative inputs, ``0 <= a <= 1``): stable neurons are linear; an unstable one
  (``l < 0 < u``) is bounded above by the chord from ``(l, a l)`` to ``(u, u)`` and below by any line through the
  origin with a slope in ``[a, 1]``. CROWN (Zhang et al., NeurIPS 2018) picks the slope adaptively: 1 when
  ``u > -l``, else ``a``; alpha-CROWN (Xu et al., "Fast and Complete", ICLR 2021) optimizes it.
- Sigmoid and Tanh (convex below 0, concave above; CROWN's "general activations"): on a one-signed interval the
  chord bounds one side and the tangent at the midpoint the other; on an interval containing 0 the chord is used
  where it is valid, else the tangent through the far end point, found by bisection.
- MaxPool: the maximum is at least any convex combination of its window (CROWN: the input with the largest lower
  bound; alpha-CROWN: an optimized point of the simplex) and at most that input when its lower bound exceeds every
  other upper bound, else at most the largest upper bound (the relaxation of auto_LiRPA's ``BoundMaxPool``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab.certification.bounds.ops import ActivationOp, MaxPoolOp

_FLAT = 1e-7  # an interval narrower than this is bounded by constants (the chord's slope would be noise)


@dataclass
class Relaxation:
    """``lower_slope * z + lower_offset <= f(z) <= upper_slope * z + upper_offset``; offsets may be None (zero)."""

    lower_slope: Tensor
    lower_offset: Tensor | None
    upper_slope: Tensor
    upper_offset: Tensor | None


# ----------------------------------------------------------------------------------------------- ReLU
def relu_lower_slope(op: ActivationOp, lower: Tensor, upper: Tensor) -> Tensor:
    """CROWN's adaptive lower slope: 1 where ``u > -l``, else the negative slope (exact for stable neurons)."""
    leak = op.negative_slope
    slope = torch.where(upper > -lower, torch.ones_like(lower), torch.full_like(lower, leak))
    slope = torch.where(lower >= 0, torch.ones_like(slope), slope)
    return torch.where(upper <= 0, torch.full_like(slope, leak), slope)


def relu_relaxation(op: ActivationOp, lower: Tensor, upper: Tensor, alpha: Tensor | None = None) -> Relaxation:
    """The ReLU/LeakyReLU relaxation; ``alpha`` (broadcast against the bounds) replaces the adaptive lower slope of
    unstable neurons (it is clamped into ``[a, 1]``, which keeps the bound sound whatever its value)."""
    leak = op.negative_slope
    unstable = (lower < 0) & (upper > 0)
    lo, hi = lower.clamp(max=0), upper.clamp(min=0)
    width = (hi - lo).clamp(min=1e-12)
    chord = (hi - leak * lo) / width
    upper_slope = torch.where(unstable, chord, torch.where(upper <= 0, torch.full_like(chord, leak), 1.0))
    upper_offset = torch.where(unstable, (leak - chord) * lo, torch.zeros_like(chord))
    default = relu_lower_slope(op, lower, upper)
    lower_slope = default if alpha is None else torch.where(unstable, alpha.clamp(min=leak, max=1.0), default)
    return Relaxation(lower_slope, None, upper_slope, upper_offset)


# ----------------------------------------------------------------------------------------------- S-shaped
def _value_and_slope(kind: str, z: Tensor) -> tuple[Tensor, Tensor]:
    if kind == "sigmoid":
        s = torch.sigmoid(z)
        return s, s * (1 - s)
    t = torch.tanh(z)
    return t, 1 - t * t


def _tangent_through(kind: str, anchor: Tensor, low: Tensor, high: Tensor, *, upper: bool, steps: int = 40) -> Tensor:
    """The tangent point ``d`` in ``[low, high]`` whose tangent passes through ``(anchor, f(anchor))``, rounded to the
    side where the tangent stays a valid bound (see the module docstring; the gap is monotone in ``d``)."""
    f_anchor, _ = _value_and_slope(kind, anchor)
    for _ in range(steps):
        mid = (low + high) / 2
        value, slope = _value_and_slope(kind, mid)
        gap = value + slope * (anchor - mid) - f_anchor  # tangent at mid, evaluated at the anchor, minus f(anchor)
        ok = gap >= 0 if upper else gap <= 0
        if upper:  # valid for every point right of d: shrink from the right
            high = torch.where(ok, mid, high)
            low = torch.where(ok, low, mid)
        else:  # valid for every point left of d
            low = torch.where(ok, mid, low)
            high = torch.where(ok, high, mid)
    return high if upper else low


def s_shaped_relaxation(op: ActivationOp, lower: Tensor, upper: Tensor) -> Relaxation:
    """CROWN's relaxation of Sigmoid/Tanh (convex on z <= 0, concave on z >= 0)."""
    kind = op.kind
    f_lo, d_lo = _value_and_slope(kind, lower)
    f_hi, d_hi = _value_and_slope(kind, upper)
    width = upper - lower
    chord = (f_hi - f_lo) / width.clamp(min=_FLAT)
    mid = (lower + upper) / 2
    zero = torch.zeros_like(lower)
    # Upper line: chord where it is valid (interval below 0, or slope at u at least the chord's), else a tangent.
    chord_up = (upper <= 0) | ((lower < 0) & (d_hi >= chord))
    t_up = torch.where(lower >= 0, mid, _tangent_through(kind, lower, zero, upper.clamp(min=0), upper=True))
    f_tu, d_tu = _value_and_slope(kind, t_up)
    upper_slope = torch.where(chord_up, chord, d_tu)
    upper_offset = torch.where(chord_up, f_lo - chord * lower, f_tu - d_tu * t_up)
    # Lower line: chord where valid (interval above 0, or slope at l at least the chord's), else a tangent.
    chord_low = (lower >= 0) | ((upper > 0) & (d_lo >= chord))
    t_low = torch.where(upper <= 0, mid, _tangent_through(kind, upper, lower.clamp(max=0), zero, upper=False))
    f_tl, d_tl = _value_and_slope(kind, t_low)
    lower_slope = torch.where(chord_low, chord, d_tl)
    lower_offset = torch.where(chord_low, f_lo - chord * lower, f_tl - d_tl * t_low)
    flat = width < _FLAT  # constant bounds: f is non-decreasing
    return Relaxation(
        torch.where(flat, zero, lower_slope),
        torch.where(flat, f_lo, lower_offset),
        torch.where(flat, zero, upper_slope),
        torch.where(flat, f_hi, upper_offset),
    )


def activation_relaxation(op: ActivationOp, lower: Tensor, upper: Tensor, alpha: Tensor | None = None) -> Relaxation:
    if op.kind == "relu":
        return relu_relaxation(op, lower, upper, alpha)
    return s_shaped_relaxation(op, lower, upper)


# ----------------------------------------------------------------------------------------------- MaxPool
@dataclass
class PoolWindows:
    """The windows of a max-pooling layer: which input each output looks at, on a padded copy of the input.

    Weights have shape ``(batch, [rows,] channels, kernel_area, outputs)`` (``F.unfold``'s layout).
    """

    op: MaxPoolOp
    in_shape: tuple[int, int, int]
    padded: tuple[int, int]  # padded input size the windows tile
    valid: Tensor  # (1, 1, kernel_area, outputs): window entries inside the input
    argmax_lower: Tensor  # (batch, channels, 1, outputs): the entry with the largest lower bound
    upper_weight: Tensor  # (batch, channels, kernel_area, outputs): one-hot where that entry dominates, else 0
    upper_offset: Tensor  # (batch, channels, outputs): the largest upper bound where it does not dominate, else 0


def _padded_size(op: MaxPoolOp, size: int, out: int, axis: int) -> int:
    needed = (out - 1) * op.stride[axis] + op.dilation[axis] * (op.kernel[axis] - 1) + 1
    return max(size + 2 * op.padding[axis], needed)


def _unfold(op: MaxPoolOp, t: Tensor, padded: tuple[int, int], fill: float) -> Tensor:
    """``t`` (batch, C, H, W) padded with ``fill`` and cut into windows: (batch, C, kernel_area, outputs)."""
    (ph, pw), (h, w) = op.padding, t.shape[-2:]
    t = F.pad(t, (pw, padded[1] - w - pw, ph, padded[0] - h - ph), value=fill)
    cols = F.unfold(t, op.kernel, dilation=op.dilation, stride=op.stride)
    return cols.reshape(t.shape[0], t.shape[1], op.kernel[0] * op.kernel[1], -1)


def pool_windows(op: MaxPoolOp, lower: Tensor, upper: Tensor, out_shape: tuple[int, ...]) -> PoolWindows:
    in_shape = (int(lower.shape[1]), int(lower.shape[2]), int(lower.shape[3]))
    padded = (_padded_size(op, in_shape[1], out_shape[1], 0), _padded_size(op, in_shape[2], out_shape[2], 1))
    low = _unfold(op, lower, padded, -torch.inf)
    high = _unfold(op, upper, padded, -torch.inf)
    ones = torch.ones((1, 1, *in_shape[1:]), dtype=lower.dtype, device=lower.device)
    valid = _unfold(op, ones, padded, 0.0) > 0
    best_low, arg = low.max(dim=2, keepdim=True)
    others = high.scatter(2, arg, -torch.inf).amax(dim=2, keepdim=True)
    dominates = best_low >= others
    one_hot = torch.zeros_like(low).scatter(2, arg, 1.0)
    upper_weight = one_hot * dominates.to(low.dtype)
    upper_offset = torch.where(dominates, torch.zeros_like(best_low), high.amax(dim=2, keepdim=True)).squeeze(2)
    return PoolWindows(op, in_shape, padded, valid, arg, upper_weight, upper_offset)


def pool_lower_weight(windows: PoolWindows) -> Tensor:
    """CROWN's lower weights: one-hot at the entry with the largest lower bound."""
    shape = (*windows.upper_weight.shape[:2], windows.valid.shape[2], windows.upper_weight.shape[3])
    return torch.zeros(shape, dtype=windows.upper_weight.dtype, device=windows.upper_weight.device).scatter(
        2, windows.argmax_lower, 1.0
    )


def project_simplex(weight: Tensor, valid: Tensor) -> Tensor:
    """Euclidean projection of each window's weights (dimension -2) onto the simplex of its valid entries."""
    v = torch.where(valid, weight, torch.full_like(weight, -1e9))
    ordered, _ = v.sort(dim=-2, descending=True)
    cumulative = ordered.cumsum(dim=-2) - 1
    index = torch.arange(1, v.shape[-2] + 1, dtype=v.dtype, device=v.device).reshape(-1, 1)
    support = (ordered - cumulative / index > 0).to(v.dtype)
    count = support.sum(dim=-2, keepdim=True).clamp(min=1)  # the support is a prefix of the sorted entries
    theta = torch.gather(cumulative, -2, (count - 1).long()) / count
    return (v - theta).clamp(min=0) * valid


def pool_backward(windows: PoolWindows, a: Tensor, lower_weight: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients on the pooling input and the constant term, for a lower bound of ``<a, maxpool(z)>``.

    ``a``: (batch, rows, C, Ho, Wo); ``lower_weight``: (batch, [rows,] C, kernel_area, outputs).
    """
    op = windows.op
    batch, rows = a.shape[:2]
    flat = a.reshape(batch, rows, a.shape[2], 1, -1)
    positive, negative = flat.clamp(min=0), flat.clamp(max=0)
    low = lower_weight if lower_weight.dim() == 5 else lower_weight.unsqueeze(1)
    spread = positive * low + negative * windows.upper_weight.unsqueeze(1)
    channels, area, outputs = spread.shape[2:]
    folded = F.fold(
        spread.reshape(batch * rows, channels * area, outputs),
        windows.padded,
        op.kernel,
        dilation=op.dilation,
        stride=op.stride,
    )
    (ph, pw), (_, h, w) = op.padding, windows.in_shape
    coefficients = folded[..., ph : ph + h, pw : pw + w].reshape(batch, rows, channels, h, w)
    bias = (negative.squeeze(3) * windows.upper_offset.unsqueeze(1)).reshape(batch, rows, -1).sum(dim=2)
    return coefficients, bias
