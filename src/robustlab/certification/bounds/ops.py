"""The operations of a bound graph: their forward pass, interval bounds and backward (transposed) linear maps.

Every operation a traced model is made of maps to one class here:

- *linear* operations (``Linear``, ``Conv2d``, ``ConvTranspose2d``, BatchNorm in eval mode and ``Normalize`` as
  per-channel affine maps, ``x * c + d`` with constants, sums and differences of two branches, concatenation,
  reshapes, pooling by averaging, padding, slicing and permutations) give interval bounds and, for CROWN, the
  transpose of their linear part applied to a coefficient tensor (``backward``);
- *activations* (ReLU, LeakyReLU, Sigmoid, Tanh) are elementwise; their linear relaxations live in
  :mod:`robustlab.certification.bounds.relaxations`;
- ``MaxPool2d`` has a relaxation of its own (also in ``relaxations``).

Coefficient tensors have shape ``(batch, rows, *node_shape)``: one row per bounded linear function (a margin of
the specification, or a neuron whose bounds are being computed), per example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Interval = tuple[Tensor, Tensor]
Bound = Interval | Tensor  # a perturbed input's interval, or a constant input's value


class Op:
    """One operation. ``role`` says how bound propagation treats it: input, constant, linear, activation, maxpool."""

    role: ClassVar[str] = "linear"
    # How much a linear operation mixes coordinates: interval bounds of a single mixing map applied to a box are
    # exact, a composition of two is not (see ``Node.exact_interval``).
    mixing: ClassVar[bool] = True

    def forward(self, *inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__.removesuffix("Op")


class LinearOp(Op):
    """Base of the linear operations: interval bounds and the transposed map."""

    def interval(self, inputs: Sequence[Bound]) -> Interval:
        raise NotImplementedError

    def backward(self, a: Tensor, inputs: Sequence[Tensor | None], shapes: Sequence[tuple[int, ...]]) -> Backward:
        """``a``: coefficients on the output, ``(batch, rows, *out)``; ``inputs``: the constant inputs' values (None
        for perturbed ones); ``shapes``: every input's per-example shape. Returns the coefficients on each perturbed
        input (None for constants) and the constant term ``<a, offset>`` of shape ``(batch, rows)`` (or None)."""
        raise NotImplementedError


@dataclass
class Backward:
    coefficients: list[Tensor | None]
    bias: Tensor | None


def rows_sum(t: Tensor) -> Tensor:
    """Sum over every dimension after (batch, rows)."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(dim=2)


def channel_view(v: Tensor, ndim: int, channel_dim: int = 1) -> Tensor:
    """A per-channel vector shaped to broadcast against a tensor of ``ndim`` dimensions along ``channel_dim``."""
    shape = [1] * ndim
    shape[channel_dim] = -1
    return v.reshape(shape)


def _vjp(fn: Callable[..., Tensor], a: Tensor, shapes: Sequence[tuple[int, ...]]) -> list[Tensor]:
    """The transpose of the linear map ``fn`` (its vector-Jacobian product at zero) applied to each row of ``a``."""
    batch, rows = a.shape[:2]
    flat = a.reshape(batch * rows, *a.shape[2:])
    with torch.enable_grad():
        probes = [torch.zeros((batch * rows, *s), dtype=a.dtype, device=a.device, requires_grad=True) for s in shapes]
        out = fn(*probes)
        grads = torch.autograd.grad(out, probes, grad_outputs=flat, create_graph=a.requires_grad, allow_unused=True)
    return [
        (g if g is not None else torch.zeros_like(p)).reshape(batch, rows, *s) for g, p, s in zip(grads, probes, shapes)
    ]


# ----------------------------------------------------------------------------------------------- leaves
class InputOp(Op):
    role = "input"
    mixing = False

    def forward(self, *inputs: Tensor) -> Tensor:
        return inputs[0]


class ConstantOp(Op):
    """A tensor that does not depend on the input (a buffer, a parameter, or computed from them)."""

    role = "constant"
    mixing = False

    def forward(self, *inputs: Tensor) -> Tensor:  # values are computed by the graph (see BoundGraph.constants)
        raise RuntimeError("constants are evaluated by the graph")


# ----------------------------------------------------------------------------------------------- dense layers
@dataclass
class PostAffine:
    """A per-output-channel affine map folded into the layer before it (BatchNorm in eval mode)."""

    scale: Callable[[], Tensor]
    shift: Callable[[], Tensor]


LayerT = TypeVar("LayerT", nn.Linear, nn.Conv2d)


class FoldableLayerOp(LinearOp, Generic[LayerT]):
    """A layer with a weight whose first dimension is the output channel, and optionally a BatchNorm (``post``)
    folded in by :mod:`.convert`."""

    layer_name: ClassVar[str]

    def __init__(self, module: LayerT, post: PostAffine | None = None) -> None:
        self.module: LayerT = module
        self.post = post

    def describe(self) -> str:
        return self.layer_name + ("+BatchNorm" if self.post is not None else "")

    def parameters(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias with ``post`` folded in: output channel ``i`` scaled by ``scale[i]``, then shifted
        by ``shift[i]``."""
        weight, bias = self.module.weight, self.module.bias
        if self.post is None:
            return weight, bias
        scale, shift = self.post.scale(), self.post.shift()
        base = bias if bias is not None else torch.zeros_like(shift)
        return weight * channel_view(scale, weight.dim(), channel_dim=0), base * scale + shift

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's map with the given weight and bias."""
        raise NotImplementedError

    def forward(self, *inputs: Tensor) -> Tensor:
        weight, bias = self.parameters()
        return self.apply(inputs[0], weight, bias)

    def interval(self, inputs: Sequence[Bound]) -> Interval:
        lower, upper = inputs[0]
        weight, bias = self.parameters()
        mid = self.apply((upper + lower) / 2, weight, bias)
        spread = self.apply((upper - lower) / 2, weight.abs(), None)
        return mid - spread, mid + spread


class DenseOp(FoldableLayerOp[nn.Linear]):
    """``nn.Linear`` (``post``: a BatchNorm1d folded in)."""

    layer_name = "Linear"

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def backward(self, a: Tensor, inputs: Sequence[Tensor | None], shapes: Sequence[tuple[int, ...]]) -> Backward:
        weight, bias = self.parameters()
        return Backward([a @ weight], rows_sum(a * bias) if bias is not None else None)


class ConvOp(FoldableLayerOp[nn.Conv2d]):
    """``nn.Conv2d`` (``post``: a BatchNorm2d folded in). The transpose is a transposed convolution."""

    layer_name = "Conv2d"

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        m = self.module
        if m.padding_mode != "zeros":
            return m._conv_forward(x, weight, bias)
        return F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)

    def backward(self, a: Tensor, inputs: Sequence[Tensor | None], shapes: Sequence[tuple[int, ...]]) -> Backward:
        weight, bias = self.parameters()
        m = self.module
        in_shape = shapes[0]
        bias_term = rows_sum(a.sum(dim=(-2, -1)) * bias) if bias is not None else None
        padding = m.padding
        if m.padding_mode != "zeros" or not isinstance(padding, tuple):  # "same"/"valid", reflect...: autograd
            return Backward([*_vjp(lambda z: self.apply(z, weight, None), a, shapes)], bias_term)
        batch, rows = a.shape[:2]
        flat = a.reshape(batch * rows, *a.shape[2:])
        out_h, out_w = flat.shape[-2:]
        kernel = weight.shape[-2:]
        # Rows and columns of the input the convolution never reached (stride) come back as output padding.
        extra = tuple(
            in_shape[1 + i] - ((o - 1) * m.stride[i] - 2 * padding[i] + m.dilation[i] * (kernel[i] - 1) + 1)
            for i, o in enumerate((out_h, out_w))
        )
        transposed = F.conv_transpose2d(flat, weight, None, m.stride, padding, extra, m.groups, m.dilation)
        return Backward([transposed.reshape(batch, rows, *in_shape)], bias_term)


class ConvTransposeOp(LinearOp):
    """``nn.ConvTranspose2d``; its transpose (a convolution) through autograd."""

    def __init__(self, module: nn.ConvTranspose2d) -> None:
        self.module = module

    def describe(self) -> str:
        return "ConvTranspose2d"

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.module(inputs[0])

    def _linear(self, x: Tensor, weight: Tensor) -> Tensor:
        m = self.module
        padding = m.padding
        assert isinstance(padding, tuple)  # ConvTranspose2d takes no padding strings
        return F.conv_transpose2d(x, weight, None, m.stride, padding, m.output_padding, m.groups, m.dilation)

    def interval(self, inputs: Sequence[Bound]) -> Interval:
        lower, upper = inputs[0]
        mid = self.module((upper + lower) / 2)
        spread = self._linear((upper - lower) / 2, self.module.weight.abs())
        return mid - spread, mid + spread

    def backward(self, a: Tensor, inputs: Sequence[Tensor | None], shapes: Sequence[tuple[int, ...]]) -> Backward:
        bias = self.module.bias
        coefficients = _vjp(lambda z: self._linear(z, self.module.weight), a, shapes)
        return Backward([*coefficients], rows_sum(a.sum(dim=(-2, -1)) * bias) if bias is not None else None)


class ChannelAffineOp(LinearOp):
    """``x * scale + shift`` per channel (dimension 1): BatchNorm in eval mode, ``Normalize``."""

    mixing = False

    def __init__(self, scale: Callable[[], Tensor], shift: Callable[[], Tensor], name: str) -> None:
        self.scale, self.shift, self.name = scale, shift, name

    def describe(self) -> str:
        return self.name

    def _parts(self, ndim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return channel_view(self.scale().to(dtype), ndim), channel_view(self.shift().to(dtype), ndim)

    def forward(self, *inputs: Tensor) -> Tensor:
        scale, shift = self._parts(inputs[0].dim(), inputs[0].dtype)
        return inputs[0] * scale + shift

    def interval(self, inputs: Sequence[Bound]) -> Interval:
        lower, upper = inputs[0]
        scale, shift = self._parts(lower.dim(), lower.dtype)
        mid, spread = (upper + lower) / 2 * scale + shift, (upper - lower) / 2 * scale.abs()
        return mid - spread, mid + spread

    def backward(self, a: Tensor, inputs: Sequence[Tensor | None], shapes: Sequence[tuple[int, ...]]) -> Backward:
        scale = channel_view(self.scale().to(a.dtype), a.dim(), channel_dim=2)
        shift = channel_view(self.shift().to(a.dtype), a.dim(), channel_dim=2)
        return Backward([a * scale], rows_sum(a * shift))


def batchnorm_affine(norm: nn.modules.batchnorm._BatchNorm) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    """BatchNorm in eval mode as ``x * scale + shift`` (functions, so they follow the running statistics)."""

    def scale() -> Tensor:
        assert norm.running_var is not None
        out = torch.rsqrt(norm.running_var + norm.eps)
        return out * norm.weight if norm.weight is not None else out

    def shift() -> Tensor:
        assert norm.running_mean is not None
        out = -norm.running_mean * scale()
        return out + norm.bias if norm.bias is not None else out

    return scale, shift


# ----------------------------------------------------------------------------------------------- elementwise
@dataclass(frozen=True)
class Operand:
    """A constant operand: the value of an input of the node (``index`` into its inputs) or a Python number."""

    index: int | None = None
    number: float | None = None

    def value(self, inputs: Sequence[Bound | Tensor | None]) -> Tensor | float:
        if self.index is None:
            assert self.number is not None
            return self.number
        value = inputs[self.index]
        assert isinstance(value, Tensor)
        return value


class ScaleShiftOp(LinearOp):
    """``sign * x * factor + offset_sign * offset`` elementwise with constant factor and offset: ``x + c``,
    ``c - x``, ``x * c``, ``x / c`` (``reciprocal``), ``-x``. Constants broadcast against the input and must not
    vary over the batch."""

    mixing = False

    def __init__(
        self,
        perturbed: int,
        *,
        sign: float = 1.0,
        factor: Operand | None = None,
        reciprocal: bool = False,
        offset: Operand | None = None,
        offset_sign: float = 1.0,
    ) -> None:
        self.perturbed, self.sign, self.factor, self.reciprocal = perturbed, sign, factor, reciprocal
        self.offset, self.offset_sign = offset, offset_sign

    def describe(self) -> str:
        return "elementwise affine"

    def factor_value(self, inputs: Sequence[Bound | Tensor | None]) -> Tensor | float:
        if self.factor is None:
            return self.sign
        value = self.factor.value(inputs)
        return self.sign / value if self.reciprocal else self.sign * value

    def _offset(self, inputs: Sequence[Bound | Tensor | None]) -> Tensor | float:
        return 0.0 if self.offset is None else self.offset_sign * self.offset.value(inputs)

    def forward(self, *inputs: Tensor) -> Tensor:
        return inputs[self.perturbed] * self.factor_value(inputs) + self._offset(inputs)

    def interval(self, inputs: Sequence[Bound]) -> Interval:
        lower, upper = inputs[self.perturbed]
        factor, offset = self.factor_value(inputs), self._offset(inputs)
        mid = (upper + lower) / 2 * factor + offset
        spread = (upper - lower) / 2 * (factor.abs() if isinstance(factor, Tensor) else abs(factor))
        return mid - spread, mid + spread

    def backward(self, a: Tensor, inputs: Sequence[Tensor | None], shapes: Sequence[tuple[int, ...]]) -> Backward:
        factor, offset = self.factor_value(inputs), self._offset(inputs)
        out_shape = a.shape[2:]
        coefficients: list[Tensor | None] = [None] * len(shapes)
        scaled = a * _lift(factor, out_shape) if isinstance(factor, Tensor) else a * factor
        coefficients[self.perturbed] = _unbroadcast(scaled, shapes[self.perturbed])
        if isinstance(offset, Tensor):
            bias: Tensor | None = rows_sum(a * _lift(offset, out_shape))
        else:
            bias = rows_sum(a) * offset if offset != 0 else None
        return Backward(coefficients, bias)


def _lift(value: Tensor, out_shape: Sequence[int]) -> Tensor:
    """A constant shaped like a model tensor (batch first), broadcast against coefficients (batch, rows, *out)."""
    full = value.reshape((1,) * (len(out_shape) + 1 - value.dim()) + tuple(value.shape))
    return full.unsqueeze(1)  # (1 or batch, 1, *out)


def _unbroadcast(a: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Coefficients on a broadcast output summed back onto an input of per-example ``shape``."""
    if tuple(a.shape[2:]) == shape:
        return a
    target = (a.shape[0], a.shape[1], *shape)
    return _vjp_broadcast(a, target)


def _vjp_broadcast(a: Tensor, target: tuple[int, ...]) -> Tensor:
    lead = a.dim() - len(target)
    out = a.sum(dim=tuple(range(2, 2 + lead))) if lead > 0 else a
    dims = [i for i in range(2, out.dim()) if target[i] == 1 and out.shape[i] != 1]
    return out.sum(dim=dims, keepdim=True) if dims else out


class SumOp(LinearOp):
    """``sign_0 * x_0 + sign_1 * x_1``: a residual connection (``+``) or a difference of two branches."""

    mixing = True  # adds two branches: interval bounds ignore their correlation

    def __init__(self, signs: tuple[float, ...]) -> None:
        self.signs = signs

    def describe(self) -> str:
        return "add" if all(s > 0 for s in self.signs) else "sub"

    def forward(self, *inputs: Tensor) -> Tensor:
        out = inputs[0] * self.signs[0]
        for sign, value in zip(self.signs[1:], inputs[1:]):
            out = out + value * sign
        return out

    def interval(self, inputs: Sequence[Bound]) -> Interval:
        lower: Tensor | float = 0.0
        upper: Tensor | float = 0.0
        for sign, (lo, hi) in zip(self.signs, inputs):
            lower = lower + (lo if sign > 0 else -hi)
            upper = upper + (hi if sign > 0 else -lo)
        assert isinstance(lower, Tensor) and isinstance(upper, Tensor)
        return lower, upper

    def backward(self, a: Tensor, inputs: Sequence[Tensor | None], shapes: Sequence[tuple[int, ...]]) -> Backward:
        return Backward([_unbroadcast(a * sign, shape) for sign, shape in zip(self.signs, shapes)], None)


class CatOp(LinearOp):
    """``torch.cat`` along a non-batch dimension; constant pieces contribute to the offset."""

    mixing = False

    def __init__(self, dim: int) -> None:
        self.dim = dim  # in the model's coordinates (batch = 0), non-negative

    def forward(self, *inputs: Tensor) -> Tensor:
        return torch.cat([_batched(v, inputs) for v in inputs], dim=self.dim)

    def interval(self, inputs: Sequence[Bound]) -> Interval:
        reference = next(v[0] for v in inputs if isinstance(v, tuple))
        lows = [v[0] if isinstance(v, tuple) else v.expand(reference.shape[0], *v.shape[1:]) for v in inputs]
        highs = [v[1] if isinstance(v, tuple) else v.expand(reference.shape[0], *v.shape[1:]) for v in inputs]
        return torch.cat(lows, dim=self.dim), torch.cat(highs, dim=self.dim)

    def backward(self, a: Tensor, inputs: Sequence[Tensor | None], shapes: Sequence[tuple[int, ...]]) -> Backward:
        sizes = [shape[self.dim - 1] for shape in shapes]
        pieces = torch.split(a, sizes, dim=self.dim + 1)
        coefficients: list[Tensor | None] = []
        bias: Tensor | None = None
        for piece, value in zip(pieces, inputs):
            if value is None:
                coefficients.append(piece)
            else:
                coefficients.append(None)
                term = rows_sum(piece * value.unsqueeze(1))
                bias = term if bias is None else bias + term
        return Backward(coefficients, bias)


def _batched(value: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    batch = max(v.shape[0] for v in inputs)
    return value.expand(batch, *value.shape[1:]) if value.shape[0] != batch else value


class ReshapeOp(LinearOp):
    """Flatten, view, reshape: the batch dimension stays, the rest takes the traced per-example shape."""

    mixing = False

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def describe(self) -> str:
        return "reshape"

    def forward(self, *inputs: Tensor) -> Tensor:
        return inputs[0].reshape(inputs[0].shape[0], *self.shape)

    def interval(self, inputs: Sequence[Bound]) -> Interval:
        lower, upper = inputs[0]
        return self.forward(lower), self.forward(upper)

    def backward(self, a: Tensor, inputs: Sequence[Tensor | None], shapes: Sequence[tuple[int, ...]]) -> Backward:
        return Backward([a.reshape(a.shape[0], a.shape[1], *shapes[0])], None)


class MonotoneLinearOp(LinearOp):
    """A linear map with non-negative weights on one perturbed input (plus a constant offset): average pooling,
    mean and sum over non-batch dimensions, padding, slicing, permutations, nearest/bilinear upsampling.

    Being non-decreasing, its interval bounds are its values at the lower and upper bounds; its transpose comes
    from autograd.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str, *, mixing: bool) -> None:
        self.fn, self.name = fn, name
        self.mixing = mixing  # type: ignore[misc]

    def describe(self) -> str:
        return self.name

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.fn(inputs[0])

    def interval(self, inputs: Sequence[Bound]) -> Interval:
        lower, upper = inputs[0]
        return self.fn(lower), self.fn(upper)

    def backward(self, a: Tensor, inputs: Sequence[Tensor | None], shapes: Sequence[tuple[int, ...]]) -> Backward:
        zero = torch.zeros((1, *shapes[0]), dtype=a.dtype, device=a.device)
        offset = self.fn(zero)
        bias = rows_sum(a * offset.unsqueeze(1)) if bool(offset.any()) else None
        return Backward([*_vjp(self.fn, a, shapes[:1])], bias)


# ----------------------------------------------------------------------------------------------- nonlinear
class ActivationOp(Op):
    """An elementwise activation; see :mod:`robustlab.certification.bounds.relaxations` for its relaxation."""

    role = "activation"
    mixing = False

    def __init__(self, kind: str, negative_slope: float = 0.0) -> None:
        self.kind = kind  # "relu" (leaky when negative_slope > 0), "sigmoid", "tanh"
        self.negative_slope = negative_slope

    def describe(self) -> str:
        if self.kind == "relu":
            return f"LeakyReLU({self.negative_slope:g})" if self.negative_slope else "ReLU"
        return self.kind.capitalize()

    @property
    def piecewise_linear(self) -> bool:
        return self.kind == "relu"

    def forward(self, *inputs: Tensor) -> Tensor:
        x = inputs[0]
        if self.kind == "relu":
            return F.leaky_relu(x, self.negative_slope) if self.negative_slope else F.relu(x)
        return torch.sigmoid(x) if self.kind == "sigmoid" else torch.tanh(x)

    def interval(self, inputs: Sequence[Bound]) -> Interval:
        lower, upper = inputs[0]
        return self.forward(lower), self.forward(upper)  # non-decreasing


class MaxPoolOp(Op):
    """``MaxPool2d`` (any kernel, stride, padding, dilation, ceil mode)."""

    role = "maxpool"
    mixing = False

    def __init__(
        self,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        ceil_mode: bool,
    ) -> None:
        self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode = (
            kernel,
            stride,
            padding,
            dilation,
            ceil_mode,
        )

    def describe(self) -> str:
        return f"MaxPool2d(kernel={self.kernel}, stride={self.stride})"

    def forward(self, *inputs: Tensor) -> Tensor:
        return F.max_pool2d(inputs[0], self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)

    def interval(self, inputs: Sequence[Bound]) -> Interval:
        lower, upper = inputs[0]
        return self.forward(lower), self.forward(upper)
