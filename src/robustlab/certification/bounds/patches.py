"""Coefficients as patches: the backward pass from one neuron of a feature map stays local.

When CROWN bounds the neurons of a convolutional layer, each neuron's linear function touches only its receptive
field in the layers before it: a window that grows with every convolution it crosses but is usually far smaller
than the feature map. Storing each row's coefficients as that window (``values``: batch, rows, channels, kh, kw)
plus where it sits (``location`` on a regular grid of window positions) instead of a whole feature map saves most of
the memory and arithmetic (the idea of auto_LiRPA's ``Patches``, Xu et al., NeurIPS 2020). Window ``(i, j)`` of the
grid covers rows ``i * stride - padding ... + kh - 1`` of the node (and likewise columns); entries outside the
feature map are kept at zero.

Supported here: convolutions (zero padding, any stride, dilation and groups), per-channel affine maps (BatchNorm,
Normalize), elementwise activations, max pooling, residual sums, and the input. Anything else takes the coefficients
back to the dense form (:func:`to_dense`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from robustlab.certification.bounds.ops import ChannelAffineOp, ConvOp, channel_view
from robustlab.certification.bounds.relaxations import PoolWindows, Relaxation

Pair = tuple[int, int]


@dataclass
class Patches:
    values: Tensor  # (batch, rows, C, kh, kw)
    location: Tensor  # (batch, rows): flat index into the grid
    grid: Pair  # number of window positions along height and width
    stride: Pair
    padding: Pair
    shape: tuple[int, int, int]  # the node's (C, H, W)

    @property
    def kernel(self) -> Pair:
        return int(self.values.shape[-2]), int(self.values.shape[-1])

    def covers_map(self) -> bool:
        """When the windows are as large as the map, the dense form is cheaper."""
        return self.kernel[0] >= self.shape[1] and self.kernel[1] >= self.shape[2]


def start(shape: tuple[int, ...], picked: Tensor, signs: tuple[float, ...], dtype: torch.dtype) -> Patches:
    """One-neuron rows: for each sign, row r of example b is ``sign * e_{picked[b, r]}`` on a (C, H, W) node."""
    channels, height, width = shape
    batch, count = picked.shape
    channel = picked // (height * width)
    values = torch.zeros(batch, count, channels, 1, 1, dtype=dtype, device=picked.device)
    values.scatter_(2, channel.reshape(batch, count, 1, 1, 1), 1.0)
    values = torch.cat([values * sign for sign in signs], dim=1)
    location = (picked % (height * width)).repeat(1, len(signs))
    return Patches(values, location, (height, width), (1, 1), (0, 0), (channels, height, width))


def _window_index(p: Patches) -> tuple[Tensor, Pair]:
    """Flat positions, in a padded copy of the map, of every entry of every row's window: (batch, rows, kh * kw)."""
    (kh, kw), (sh, sw), (gh, gw) = p.kernel, p.stride, p.grid
    padded = ((gh - 1) * sh + kh, (gw - 1) * sw + kw)
    row, column = p.location // gw, p.location % gw
    base = (row * sh) * padded[1] + column * sw
    a = torch.arange(kh, device=base.device).reshape(-1, 1) * padded[1]
    b = torch.arange(kw, device=base.device).reshape(1, -1)
    return base.unsqueeze(2) + (a + b).reshape(1, 1, -1), padded


def _padded(p: Patches, t: Tensor, padded: Pair) -> Tensor:
    """``t`` (batch, C, H, W) zero-padded (or cropped) so that the grid's windows tile it."""
    (ph, pw), (h, w) = p.padding, t.shape[-2:]
    return F.pad(t, (pw, padded[1] - w - pw, ph, padded[0] - h - ph))


def windows(p: Patches, t: Tensor) -> Tensor:
    """The values of a map ``t`` (batch or 1, C', H, W) under each row's window: (batch, rows, C', kh, kw)."""
    index, padded = _window_index(p)
    source = _padded(p, t, padded).flatten(2)  # (b, C', Hp * Wp)
    batch, rows, area = index.shape
    if source.shape[0] != batch:
        source = source.expand(batch, *source.shape[1:])
    picked = torch.gather(source, 2, index.reshape(batch, 1, rows * area).expand(batch, source.shape[1], -1))
    return picked.reshape(batch, -1, rows, *p.kernel).transpose(1, 2)


def inside(p: Patches) -> Tensor:
    """1 where a window entry lies on the map, 0 on its padding: (1 or batch, rows, 1, kh, kw)."""
    ones = torch.ones((1, 1, *p.shape[1:]), dtype=p.values.dtype, device=p.values.device)
    return windows(p, ones)


def to_dense(p: Patches) -> Tensor:
    """The same coefficients on the whole map: (batch, rows, C, H, W)."""
    index, padded = _window_index(p)
    batch, rows, channels = p.values.shape[:3]
    dense = torch.zeros(batch, rows, channels, padded[0] * padded[1], dtype=p.values.dtype, device=p.values.device)
    spread = index.unsqueeze(2).expand(batch, rows, channels, -1)
    dense = dense.scatter(3, spread, p.values.reshape(batch, rows, channels, -1))
    dense = dense.reshape(batch, rows, channels, *padded)
    (ph, pw), (_, h, w) = p.padding, p.shape
    full = F.pad(dense, (0, max(0, pw + w - padded[1]), 0, max(0, ph + h - padded[0])))
    return full[..., ph : ph + h, pw : pw + w]


def _rows_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], t.shape[1], -1).sum(dim=2)


# ----------------------------------------------------------------------------------------------- operations
def conv_backward(p: Patches, op: ConvOp, in_shape: tuple[int, ...]) -> tuple[Patches, Tensor | None] | None:
    """Through a convolution: each window becomes the transposed convolution of itself with the kernel."""
    m = op.module
    padding = m.padding
    if m.padding_mode != "zeros" or not isinstance(padding, tuple):
        return None
    weight, bias = op.parameters()
    batch, rows = p.values.shape[:2]
    flat = p.values.reshape(batch * rows, *p.values.shape[2:])
    grown = F.conv_transpose2d(flat, weight, None, m.stride, 0, 0, m.groups, m.dilation)
    bias_term = _rows_sum(p.values.sum(dim=(-2, -1)) * bias) if bias is not None else None
    stride = (p.stride[0] * m.stride[0], p.stride[1] * m.stride[1])
    pad = (p.padding[0] * m.stride[0] + padding[0], p.padding[1] * m.stride[1] + padding[1])
    shape = (int(in_shape[0]), int(in_shape[1]), int(in_shape[2]))
    out = Patches(grown.reshape(batch, rows, *grown.shape[1:]), p.location, p.grid, stride, pad, shape)
    out.values = out.values * inside(out)
    return out, bias_term


def affine_backward(p: Patches, op: ChannelAffineOp) -> tuple[Patches, Tensor]:
    scale = channel_view(op.scale().to(p.values.dtype), 5, channel_dim=2)
    shift = channel_view(op.shift().to(p.values.dtype), 5, channel_dim=2)
    bias = _rows_sum(p.values * shift)
    return Patches(p.values * scale, p.location, p.grid, p.stride, p.padding, p.shape), bias


def activation_backward(p: Patches, relax: Relaxation) -> tuple[Patches, Tensor]:
    """Through an elementwise activation with a relaxation shared by every row (the maps are (batch, C, H, W))."""
    positive, negative = p.values.clamp(min=0), p.values.clamp(max=0)
    passed = positive * windows(p, relax.lower_slope) + negative * windows(p, relax.upper_slope)
    bias = torch.zeros(p.values.shape[:2], dtype=p.values.dtype, device=p.values.device)
    if relax.lower_offset is not None:
        bias = bias + _rows_sum(positive * windows(p, relax.lower_offset))
    if relax.upper_offset is not None:
        bias = bias + _rows_sum(negative * windows(p, relax.upper_offset))
    return Patches(passed, p.location, p.grid, p.stride, p.padding, p.shape), bias


def pool_backward(p: Patches, pool: PoolWindows, lower_weight: Tensor) -> tuple[Patches, Tensor]:
    """Through max pooling: each window entry spreads over its pooling window with the relaxation's weights."""
    op = pool.op
    batch, rows, channels, kh, kw = p.values.shape
    area = pool.valid.shape[2]
    out_grid = p.grid
    out_h, out_w = p.shape[1:]

    def as_map(weight: Tensor) -> Tensor:  # (batch, C, area, outputs) -> (batch, C * area, Ho, Wo)
        return weight.reshape(weight.shape[0], channels * area, out_h, out_w)

    low = windows(p, as_map(lower_weight)).reshape(batch, rows, channels, area, kh * kw)
    high = windows(p, as_map(pool.upper_weight)).reshape(batch, rows, channels, area, kh * kw)
    flat = p.values.reshape(batch, rows, channels, 1, kh * kw)
    positive, negative = flat.clamp(min=0), flat.clamp(max=0)
    spread = (positive * low + negative * high).reshape(batch * rows, channels * area, kh * kw)
    size = ((kh - 1) * op.stride[0] + op.dilation[0] * (op.kernel[0] - 1) + 1,
            (kw - 1) * op.stride[1] + op.dilation[1] * (op.kernel[1] - 1) + 1)  # fmt: skip
    grown = F.fold(spread, size, op.kernel, dilation=op.dilation, stride=op.stride)
    offset = pool.upper_offset.reshape(pool.upper_offset.shape[0], channels, out_h, out_w)
    bias = _rows_sum(negative.squeeze(3).reshape(batch, rows, channels, kh, kw) * windows(p, offset))
    stride = (p.stride[0] * op.stride[0], p.stride[1] * op.stride[1])
    pad = (p.padding[0] * op.stride[0] + op.padding[0], p.padding[1] * op.stride[1] + op.padding[1])
    out = Patches(grown.reshape(batch, rows, channels, *size), p.location, out_grid, stride, pad, pool.in_shape)
    out.values = out.values * inside(out)
    return out, bias


def add(p: Patches, q: Patches) -> Patches | None:
    """The sum of two sets of patches of the same rows on the same node (e.g. both branches of a residual block
    reaching its input): the union window, when both grids have the same stride; None otherwise."""
    if p.stride != q.stride or p.grid != q.grid or p.shape != q.shape or not torch.equal(p.location, q.location):
        return None
    top = max(p.padding[0], q.padding[0])
    left = max(p.padding[1], q.padding[1])
    bottom = max(p.kernel[0] - p.padding[0], q.kernel[0] - q.padding[0])
    right = max(p.kernel[1] - p.padding[1], q.kernel[1] - q.padding[1])

    def embed(r: Patches) -> Tensor:
        dt, dl = top - r.padding[0], left - r.padding[1]
        return F.pad(r.values, (dl, right + left - dl - r.kernel[1], dt, bottom + top - dt - r.kernel[0]))

    total = embed(p) + embed(q)
    return Patches(total, p.location, p.grid, p.stride, (top, left), p.shape)


def concretize(p: Patches, lower: Tensor, upper: Tensor, x: Tensor, eps: float, dual: float | None) -> Tensor:
    """``min <a, x'>`` over the input box (and, for ``dual`` set, the l_p ball of radius eps around x)."""
    positive, negative = p.values.clamp(min=0), p.values.clamp(max=0)
    box = _rows_sum(positive * windows(p, lower) + negative * windows(p, upper))
    if dual is None:
        return box
    center = _rows_sum(p.values * windows(p, x))
    norms = p.values.reshape(p.values.shape[0], p.values.shape[1], -1).norm(p=dual, dim=2)
    return torch.maximum(box, center - eps * norms)
