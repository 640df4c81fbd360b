"""From a torch.fx trace to a :class:`~robustlab.certification.bounds.graph.BoundGraph`: one converter per supported
module type or function, and the clear error for everything else."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.certification.bounds import ops
from robustlab.certification.bounds.graph import BoundGraph, Node, where_of
from robustlab.errors import ConfigError

SUPPORTED = (
    "Linear, Conv2d, ConvTranspose2d, BatchNorm (eval mode), Normalize, ReLU, LeakyReLU, Sigmoid, Tanh, MaxPool2d, "
    "AvgPool2d, AdaptiveAvgPool2d, Flatten/view/reshape/squeeze/unsqueeze, + and - of two branches, "
    "+ - * / with constants, torch.cat, mean/sum over non-batch dimensions, slicing, permute/transpose, pad, "
    "interpolate (nearest/linear), Identity, Dropout (eval)"
)

Result = tuple[ops.Op, list[fx.Node]] | fx.Node  # an operation and its tensor inputs, or an alias of one input


class Unsupported(Exception):
    """Raised by a converter; :class:`Builder` turns it into a ConfigError naming the node."""


class Builder:
    """Walks the fx graph in order, creating a graph node for every tensor that depends on the input."""

    def __init__(self, model: nn.Module, traced: fx.GraphModule, values: dict[str, Any]) -> None:
        self.model, self.traced, self.values = model, traced, values
        self.nodes: list[Node] = []
        self.index_of: dict[str, int] = {}
        self.static: dict[str, Any] = {}
        self.perturbed: set[str] = set()
        self.constant_program: list[tuple[int, fx.Node]] = []
        self.output: int | None = None

    # -------------------------------------------------------------------------------------------- helpers
    def is_tensor(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg.name in self.index_of

    def is_perturbed(self, arg: Any) -> bool:
        return self.is_tensor(arg) and self.nodes[self.index_of[arg.name]].perturbed

    def static_value(self, arg: Any) -> Any:
        """A Python-level argument with recorded values in place of fx nodes (shapes, sizes)."""

        def lookup(n: fx.Node) -> Any:
            if n.name in self.static:
                return self.static[n.name]
            raise Unsupported(f"an input-dependent tensor '{n.name}' where a fixed value is expected")

        return fx.node.map_arg(arg, lookup)

    def shape(self, n: fx.Node) -> tuple[int, ...]:
        return tuple(self.values[n.name].shape)

    # -------------------------------------------------------------------------------------------- walk
    def add(self, n: fx.Node, op: ops.Op, inputs: list[int], shape: tuple[int, ...], perturbed: bool) -> int:
        index = len(self.nodes)
        where = where_of(self.model, n) if n.op != "placeholder" else "the model's input"
        self.nodes.append(Node(index, n.name, where, op, tuple(inputs), shape, perturbed))
        self.index_of[n.name] = index
        return index

    def visit(self, n: fx.Node) -> None:
        if n.op == "placeholder":
            if self.nodes and any(node.op.role == "input" for node in self.nodes):
                raise ConfigError(
                    f"bound propagation needs a model with a single tensor input; {type(self.model).__name__}.forward "
                    f"also takes '{n.target}'"
                )
            self.perturbed.add(n.name)
            self.add(n, ops.InputOp(), [], self.shape(n)[1:], True)
            return
        if n.op == "output":
            self.finish(n)
            return
        value = self.values[n.name]
        depends = any(m.name in self.perturbed for m in n.all_input_nodes)
        if depends:
            self.perturbed.add(n.name)
        if not isinstance(value, Tensor):
            self.static[n.name] = value
            return
        if not depends:
            index = self.add(n, ops.ConstantOp(), [], tuple(value.shape), False)
            self.constant_program.append((index, n))
            return
        if value.dim() == 0 or value.shape[0] != 2:
            raise ConfigError(
                f"bound propagation needs every operation to keep examples apart: '{n.name}' {where_of(self.model, n)} "
                f"turns a batch of 2 into shape {tuple(value.shape)}"
            )
        self.convert(n)

    def convert(self, n: fx.Node) -> None:
        try:
            result = self.dispatch(n)
        except Unsupported as exc:
            raise ConfigError(
                f"bound propagation does not support {exc} at graph node '{n.name}' {where_of(self.model, n)}. "
                f"Supported: {SUPPORTED}"
            ) from None
        if isinstance(result, fx.Node):  # identity: the node is another name for its input
            self.index_of[n.name] = self.index_of[result.name]
            return
        op, tensor_args = result
        inputs = [self.index_of[a.name] for a in tensor_args]
        if isinstance(op, ops.ChannelAffineOp) and self.fold(n, op, inputs):
            return
        self.add(n, op, inputs, self.shape(n)[1:], True)

    def dispatch(self, n: fx.Node) -> Result:
        if n.op == "call_module":
            module = self.model.get_submodule(str(n.target))
            for kind, converter in MODULES:
                if isinstance(module, kind):
                    return converter(self, n, module)
            raise Unsupported(f"{type(module).__name__} layers")
        name = getattr(n.target, "__name__", str(n.target)) if n.op == "call_function" else str(n.target)
        converter_fn = FUNCTIONS.get(name)
        if converter_fn is None:
            kind = "method" if n.op == "call_method" else "function"
            raise Unsupported(f"the {kind} '{name}'")
        return converter_fn(self, n)

    def fold(self, n: fx.Node, op: ops.ChannelAffineOp, inputs: list[int]) -> bool:
        """Fold a BatchNorm into the Linear/Conv2d right before it when nothing else reads that layer's output."""
        if op.name != "BatchNorm" or len(inputs) != 1:
            return False
        source = self.nodes[inputs[0]]
        if not isinstance(source.op, (ops.DenseOp, ops.ConvOp)) or source.op.post is not None:
            return False
        source_fx = n.args[0]
        if not isinstance(source_fx, fx.Node) or len(source_fx.users) != 1 or source_fx.name != source.name:
            return False
        if isinstance(source.op, ops.DenseOp) and len(source.shape) != 1:
            return False
        source.op.post = ops.PostAffine(op.scale, op.shift)
        source.where = f"{source.where} + {where_of(self.model, n)}"
        self.index_of[n.name] = source.index
        return True

    def finish(self, n: fx.Node) -> None:
        out = n.args[0]
        if not isinstance(out, fx.Node) or not self.is_tensor(out):
            raise ConfigError(
                f"bound propagation needs a model returning one tensor of logits; {type(self.model).__name__} "
                f"returns {type(self.values.get(getattr(out, 'name', ''), out)).__name__}"
            )
        index = self.index_of[out.name]
        node = self.nodes[index]
        if not node.perturbed:
            raise ConfigError(f"the output of {type(self.model).__name__} does not depend on its input")
        if len(node.shape) != 1 or node.shape[0] < 2:
            raise ConfigError(
                f"bound propagation needs logits of shape (batch, classes) with at least 2 classes, got "
                f"(batch, *{node.shape})"
            )
        self.output = index


def build_graph(
    model: nn.Module, traced: fx.GraphModule, values: dict[str, Any], input_shape: tuple[int, ...]
) -> BoundGraph:
    builder = Builder(model, traced, values)
    for n in traced.graph.nodes:
        builder.visit(n)
    if builder.output is None:
        raise ConfigError(f"{type(model).__name__} has no output")
    nodes = builder.nodes
    for node in nodes:
        for i in node.inputs:
            nodes[i].consumers.append(node.index)
        node.rank = _rank(node, nodes)
    static = {name: value for name, value in builder.static.items()}
    return BoundGraph(model, input_shape, nodes, builder.output, builder.constant_program, static)


def _rank(node: Node, nodes: list[Node]) -> float:
    if node.op.role == "input" or not node.perturbed:
        return 0.0
    if node.op.role != "linear":
        return math.inf
    perturbed = [nodes[i] for i in node.inputs if nodes[i].perturbed]
    if len(perturbed) != 1:
        return math.inf
    return perturbed[0].rank + (1.0 if node.op.mixing else 0.0)


# ----------------------------------------------------------------------------------------------- arguments
def _arg(n: fx.Node, position: int, name: str, default: Any = None) -> Any:
    if len(n.args) > position:
        return n.args[position]
    return n.kwargs.get(name, default)


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1])) if len(value) in (1, 2) else _bad_pair(value)
    return int(value), int(value)


def _bad_pair(value: Any) -> tuple[int, int]:
    raise Unsupported(f"pooling with a window {value!r} (2-D pooling only)")


def _dim(b: Builder, n: fx.Node, dim: Any) -> int:
    """A dimension argument as a non-negative index; the batch dimension (0) is refused."""
    ndim = len(b.shape(n.args[0])) if isinstance(n.args[0], fx.Node) else len(b.shape(n))
    value = int(b.static_value(dim))
    value = value + ndim if value < 0 else value
    if value == 0:
        raise Unsupported(f"'{_name(n)}' over the batch dimension")
    return value


def _name(n: fx.Node) -> str:
    return getattr(n.target, "__name__", str(n.target))


def _source(b: Builder, n: fx.Node) -> fx.Node:
    """The single input-dependent tensor argument of an operation on one tensor."""
    first = n.args[0] if n.args else next(iter(n.kwargs.values()))
    if not isinstance(first, fx.Node) or not b.is_perturbed(first):
        raise Unsupported(f"'{_name(n)}' on a non-tensor or tuple value")
    return first


# ----------------------------------------------------------------------------------------------- modules
def _module_linear(b: Builder, n: fx.Node, m: nn.Linear) -> Result:
    return ops.DenseOp(m), [_source(b, n)]


def _module_conv(b: Builder, n: fx.Node, m: nn.Conv2d) -> Result:
    return ops.ConvOp(m), [_source(b, n)]


def _module_conv_transpose(b: Builder, n: fx.Node, m: nn.ConvTranspose2d) -> Result:
    if len(n.args) > 1 or n.kwargs:
        raise Unsupported("ConvTranspose2d called with an output_size")
    return ops.ConvTransposeOp(m), [_source(b, n)]


def _module_batchnorm(b: Builder, n: fx.Node, m: nn.modules.batchnorm._BatchNorm) -> Result:
    if m.running_mean is None or m.running_var is None:
        raise Unsupported("BatchNorm without running statistics (track_running_stats=False)")
    scale, shift = ops.batchnorm_affine(m)
    return ops.ChannelAffineOp(scale, shift, "BatchNorm"), [_source(b, n)]


def _module_normalize(b: Builder, n: fx.Node, m: Any) -> Result:
    def scale() -> Tensor:
        return 1.0 / m.std

    def shift() -> Tensor:
        return -m.mean / m.std

    return ops.ChannelAffineOp(scale, shift, "Normalize"), [_source(b, n)]


def _leaky(slope: float) -> ops.ActivationOp:
    if not 0.0 <= slope <= 1.0:
        raise Unsupported(f"LeakyReLU with negative slope {slope} (0 <= slope <= 1 only)")
    return ops.ActivationOp("relu", slope)


def _module_activation(b: Builder, n: fx.Node, m: nn.Module) -> Result:
    if isinstance(m, nn.LeakyReLU):
        return _leaky(float(m.negative_slope)), [_source(b, n)]
    kind = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}[type(m)]
    return ops.ActivationOp(kind), [_source(b, n)]


def _maxpool(kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: Any, indices: Any) -> ops.MaxPoolOp:
    if indices:
        raise Unsupported("MaxPool2d returning indices")
    k = _pair(kernel)
    return ops.MaxPoolOp(k, _pair(stride) if stride else k, _pair(padding), _pair(dilation), bool(ceil_mode))


def _module_maxpool(b: Builder, n: fx.Node, m: nn.MaxPool2d) -> Result:
    return _maxpool(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices), [_source(b, n)]


def _module_pool(b: Builder, n: fx.Node, m: nn.Module) -> Result:
    return ops.MonotoneLinearOp(m, type(m).__name__, mixing=True), [_source(b, n)]


def _module_reshape(b: Builder, n: fx.Node, m: nn.Module) -> Result:
    if isinstance(m, nn.Flatten):
        start = m.start_dim + len(b.shape(n.args[0])) if m.start_dim < 0 else m.start_dim  # type: ignore[arg-type]
        if start == 0:
            raise Unsupported("Flatten over the batch dimension (start_dim=0)")
    return ops.ReshapeOp(b.shape(n)[1:]), [_source(b, n)]


def _module_identity(b: Builder, n: fx.Node, m: nn.Module) -> Result:
    return _source(b, n)


def _module_normalize_type() -> type[nn.Module]:
    from robustlab.models import Normalize

    return Normalize


MODULES: list[tuple[Any, Callable[..., Result]]] = [
    (nn.Linear, _module_linear),
    (nn.Conv2d, _module_conv),
    (nn.ConvTranspose2d, _module_conv_transpose),
    (nn.modules.batchnorm._BatchNorm, _module_batchnorm),
    (_module_normalize_type(), _module_normalize),
    ((nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh), _module_activation),
    (nn.MaxPool2d, _module_maxpool),
    ((nn.AvgPool2d, nn.AdaptiveAvgPool2d), _module_pool),
    ((nn.Flatten, nn.Unflatten), _module_reshape),
    ((nn.Identity, nn.modules.dropout._DropoutNd), _module_identity),
]


# ----------------------------------------------------------------------------------------------- functions
def _fn_relu(b: Builder, n: fx.Node) -> Result:
    return ops.ActivationOp("relu"), [_source(b, n)]


def _fn_leaky(b: Builder, n: fx.Node) -> Result:
    return _leaky(float(b.static_value(_arg(n, 1, "negative_slope", 0.01)))), [_source(b, n)]


def _fn_sigmoid(b: Builder, n: fx.Node) -> Result:
    return ops.ActivationOp("sigmoid"), [_source(b, n)]


def _fn_tanh(b: Builder, n: fx.Node) -> Result:
    return ops.ActivationOp("tanh"), [_source(b, n)]


def _fn_maxpool(b: Builder, n: fx.Node) -> Result:
    a = [b.static_value(_arg(n, i, key, d)) for i, (key, d) in enumerate(_POOL_ARGS, start=1)]
    return _maxpool(*a), [_source(b, n)]


_POOL_ARGS = [("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False),
              ("return_indices", False)]  # fmt: skip


def _fn_monotone(mixing: bool) -> Callable[[Builder, fx.Node], Result]:
    """A function with non-negative weights on its first argument (pooling, padding, upsampling)."""

    def convert(b: Builder, n: fx.Node) -> Result:
        source = _source(b, n)
        rest = b.static_value(tuple(n.args[1:]))
        kwargs = b.static_value(dict(n.kwargs))
        target = n.target
        if _name(n) == "interpolate":
            mode = kwargs.get("mode", rest[2] if len(rest) > 2 else "nearest")
            if mode not in ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"):
                raise Unsupported(f"interpolate with mode '{mode}' (negative weights)")
        pad_mixing = _name(n) == "pad" and kwargs.get("mode", rest[1] if len(rest) > 1 else "constant") != "constant"

        def fn(z: Tensor) -> Tensor:
            return target(z, *rest, **kwargs)  # type: ignore[operator]

        return ops.MonotoneLinearOp(fn, _name(n), mixing=mixing or pad_mixing), [source]

    return convert


def _fn_reshape(b: Builder, n: fx.Node) -> Result:
    if _name(n) == "flatten":
        start = b.static_value(_arg(n, 1, "start_dim", 0))
        if start == 0 or start == -len(b.shape(_source(b, n))):
            raise Unsupported("flatten over the batch dimension (use torch.flatten(x, 1))")
    return ops.ReshapeOp(b.shape(n)[1:]), [_source(b, n)]


def _fn_reduce(b: Builder, n: fx.Node) -> Result:
    source = _source(b, n)
    dims = b.static_value(_arg(n, 1, "dim", None))
    if dims is None:
        raise Unsupported(f"'{_name(n)}' over every dimension, the batch included")
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    normalized = tuple(_dim(b, n, d) for d in dims)
    keepdim = bool(b.static_value(_arg(n, 2, "keepdim", False)))
    method = str(_name(n))

    def fn(z: Tensor) -> Tensor:
        return getattr(z, method)(dim=normalized, keepdim=keepdim)

    return ops.MonotoneLinearOp(fn, method, mixing=True), [source]


def _fn_getitem(b: Builder, n: fx.Node) -> Result:
    source = _source(b, n)
    index = b.static_value(n.args[1])
    parts = index if isinstance(index, tuple) else (index,)
    if not parts or not (parts[0] is Ellipsis or parts[0] == slice(None)):
        raise Unsupported(f"indexing {index!r} that touches the batch dimension")
    if any(not isinstance(p, (int, slice, type(None), type(Ellipsis))) for p in parts):
        raise Unsupported("advanced (tensor or list) indexing")
    return ops.MonotoneLinearOp(lambda z: z[index], "slice", mixing=False), [source]


def _fn_permute(b: Builder, n: fx.Node) -> Result:
    source = _source(b, n)
    if _name(n) == "transpose":
        d0, d1 = _dim(b, n, _arg(n, 1, "dim0")), _dim(b, n, _arg(n, 2, "dim1"))
        return ops.MonotoneLinearOp(lambda z: z.transpose(d0, d1), "transpose", mixing=False), [source]
    raw = b.static_value(n.args[1:]) or (b.static_value(n.kwargs.get("dims")),)
    dims = tuple(raw[0]) if len(raw) == 1 and isinstance(raw[0], (tuple, list)) else tuple(raw)
    ndim = len(dims)
    if (dims[0] + ndim) % ndim != 0:
        raise Unsupported("permute moving the batch dimension")
    return ops.MonotoneLinearOp(lambda z: z.permute(*dims), "permute", mixing=False), [source]


def _fn_identity(b: Builder, n: fx.Node) -> Result:
    if _name(n).startswith("dropout") or _name(n).startswith("feature_alpha_dropout"):
        training = b.static_value(_arg(n, 2, "training", True))
        p = b.static_value(_arg(n, 1, "p", 0.5))
        if training and p > 0:
            raise Unsupported("dropout with training=True")
    return _source(b, n)


def _fn_cat(b: Builder, n: fx.Node) -> Result:
    tensors = list(_arg(n, 0, "tensors"))
    if not all(b.is_tensor(t) for t in tensors):
        raise Unsupported("torch.cat of values that are not tensors")
    first = tensors[0]
    ndim = len(b.shape(first))
    dim = int(b.static_value(_arg(n, 1, "dim", 0)))
    dim = dim + ndim if dim < 0 else dim
    if dim == 0:
        raise Unsupported("torch.cat along the batch dimension")
    return ops.CatOp(dim), tensors


def _operand(b: Builder, arg: Any, position: int, tensors: list[fx.Node]) -> ops.Operand:
    if b.is_tensor(arg):
        tensors.append(arg)
        return ops.Operand(index=len(tensors) - 1)
    value = b.static_value(arg)
    if not isinstance(value, (int, float)):
        raise Unsupported(f"arithmetic with a {type(value).__name__}")
    return ops.Operand(number=float(value))


def _fn_add_sub(b: Builder, n: fx.Node) -> Result:
    left, right = n.args[0], n.args[1]
    alpha = b.static_value(n.kwargs.get("alpha", 1))
    if alpha != 1:
        raise Unsupported(f"'{_name(n)}' with alpha={alpha}")
    minus = _name(n) in ("sub", "isub", "rsub")
    if b.is_perturbed(left) and b.is_perturbed(right):
        return ops.SumOp((1.0, -1.0 if minus else 1.0)), [left, right]  # type: ignore[list-item]
    tensors: list[fx.Node] = []
    if b.is_perturbed(left):
        tensors.append(left)  # type: ignore[arg-type]
        offset = _operand(b, right, 1, tensors)
        return ops.ScaleShiftOp(0, offset=offset, offset_sign=-1.0 if minus else 1.0), tensors
    tensors.append(right)  # type: ignore[arg-type]
    offset = _operand(b, left, 0, tensors)
    return ops.ScaleShiftOp(0, sign=-1.0 if minus else 1.0, offset=offset), tensors


def _fn_mul_div(b: Builder, n: fx.Node) -> Result:
    left, right = n.args[0], n.args[1]
    name = _name(n)
    if n.kwargs.get("rounding_mode") is not None:
        raise Unsupported("division with rounding")
    divide = name in ("truediv", "div", "itruediv")
    if b.is_perturbed(left) and b.is_perturbed(right):
        raise Unsupported(f"'{name}' of two input-dependent tensors (not linear)")
    if divide and not b.is_perturbed(left):
        raise Unsupported("division by an input-dependent tensor")
    tensors: list[fx.Node] = []
    perturbed, other = (left, right) if b.is_perturbed(left) else (right, left)
    tensors.append(perturbed)  # type: ignore[arg-type]
    factor = _operand(b, other, 1, tensors)
    return ops.ScaleShiftOp(0, factor=factor, reciprocal=divide), tensors


def _fn_neg(b: Builder, n: fx.Node) -> Result:
    return ops.ScaleShiftOp(0, sign=-1.0), [_source(b, n)]


FUNCTIONS: dict[str, Callable[[Builder, fx.Node], Result]] = {
    **dict.fromkeys(["relu", "relu_"], _fn_relu),
    **dict.fromkeys(["leaky_relu", "leaky_relu_"], _fn_leaky),
    **dict.fromkeys(["sigmoid", "sigmoid_"], _fn_sigmoid),
    **dict.fromkeys(["tanh", "tanh_"], _fn_tanh),
    **dict.fromkeys(["max_pool2d", "_max_pool2d", "boolean_dispatch"], _fn_maxpool),
    **dict.fromkeys(["avg_pool2d", "adaptive_avg_pool2d", "interpolate"], _fn_monotone(mixing=True)),
    "pad": _fn_monotone(mixing=False),
    **dict.fromkeys(["flatten", "view", "reshape", "squeeze", "unsqueeze"], _fn_reshape),
    **dict.fromkeys(["mean", "sum"], _fn_reduce),
    "getitem": _fn_getitem,
    **dict.fromkeys(["permute", "transpose"], _fn_permute),
    **dict.fromkeys(["contiguous", "clone", "dropout", "dropout1d", "dropout2d", "alpha_dropout"], _fn_identity),
    **dict.fromkeys(["cat", "concat", "concatenate"], _fn_cat),
    **dict.fromkeys(["add", "iadd", "sub", "isub"], _fn_add_sub),
    **dict.fromkeys(["mul", "imul", "truediv", "div", "itruediv"], _fn_mul_div),
    "neg": _fn_neg,
}

__all__ = ["SUPPORTED", "build_graph"]

_ = F  # F.max_pool2d and friends are matched by name above
