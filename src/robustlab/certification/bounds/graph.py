"""A model as a graph of operations bound propagation understands, traced with ``torch.fx``.

:func:`trace_graph` traces ``model.forward`` symbolically (``torch.nn`` layers and robustlab's ``Normalize`` stay
whole), runs the trace once on a sample batch to learn every tensor's shape, and converts each operation that
depends on the input into an :mod:`~robustlab.certification.bounds.ops` operation. Tensors that do not depend on
the input (parameters, buffers, anything computed from them) are constants, evaluated afresh for every bound
computation so that training updates are seen. A BatchNorm in eval mode that directly follows a ``Linear`` or
``Conv2d`` is folded into it. An operation bound propagation cannot handle is a :class:`~robustlab.errors.ConfigError`
naming it and where it is in the model (module path and graph node). The converted graph is checked against the
model on a second sample batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from robustlab.errors import ConfigError

_TRACE_ERROR = (
    "bound propagation traces the model with torch.fx and could not trace {name}: {error}. Control flow and "
    "Python-level checks must not depend on the input's values"
)


@dataclass
class Node:
    """One operation of the graph.

    ``inputs`` are node indices, in the order the operation takes them; ``shape`` is per example (without the
    batch dimension) for perturbed nodes, the full shape for constants.
    """

    index: int
    name: str  # the torch.fx node name
    where: str  # module path and type, for messages
    op: Any  # an ops.Op
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    perturbed: bool
    consumers: list[int] = field(default_factory=list)
    # Number of coordinate-mixing linear maps between the input and this node (inf past a nonlinearity or a join):
    # interval bounds are exact on a box for rank <= 1.
    rank: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class BoundGraph:
    """A traced model: nodes in topological order, the input first, the logits last."""

    model: nn.Module
    input_shape: tuple[int, ...]
    nodes: list[Node]
    output: int
    # Constant nodes are evaluated by running their torch.fx nodes; static Python values (shapes) were recorded.
    constant_program: list[tuple[int, fx.Node]]
    static: dict[str, Any]
    _ancestors: dict[int, list[int]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.nodes[self.output].shape[0]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def describe(self) -> str:
        """One line per operation: index, graph node name, operation, inputs, per-example shape, place in the model."""
        lines = []
        for node in self.nodes:
            kind = node.op.describe() if node.perturbed else "constant"
            lines.append(
                f"{node.index:3d} {node.name:24s} {kind:28s} {list(node.inputs)!s:12s} {node.shape} {node.where}"
            )
        return "\n".join(lines)

    def ancestors(self, start: int) -> list[int]:
        """Perturbed nodes ``start`` depends on (itself included), latest first: the order of a backward pass."""
        cached = self._ancestors.get(start)
        if cached is None:
            seen = {start}
            stack = [start]
            while stack:
                for i in self.nodes[stack.pop()].inputs:
                    if i not in seen and self.nodes[i].perturbed:
                        seen.add(i)
                        stack.append(i)
            cached = sorted(seen, reverse=True)
            self._ancestors[start] = cached
        return cached

    def constants(self) -> dict[int, Tensor]:
        """The current value of every constant node (parameters may have changed since tracing)."""
        env: dict[str, Any] = dict(self.static)
        out: dict[int, Tensor] = {}
        for index, fx_node in self.constant_program:
            value = evaluate_fx_node(self.model, fx_node, env)
            env[fx_node.name] = value
            if index >= 0:
                out[index] = value
        return out

    def forward(self, x: Tensor) -> Tensor:
        """The model's output computed through the graph (what the bounds are about)."""
        values: dict[int, Tensor] = dict(self.constants())
        for node in self.nodes:
            if node.op.role == "input":
                values[node.index] = x
            elif node.perturbed:
                values[node.index] = node.op.forward(*(values[i] for i in node.inputs))
        return values[self.output]


def evaluate_fx_node(root: nn.Module, node: fx.Node, env: dict[str, Any]) -> Any:
    """Run one torch.fx node with its arguments taken from ``env`` (by node name)."""
    args = fx.node.map_arg(node.args, lambda n: env[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
    if node.op == "get_attr":
        value: Any = root
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        self_value, *rest = args
        return getattr(self_value, str(node.target))(*rest, **kwargs)
    if node.op == "call_module":
        return root.get_submodule(str(node.target))(*args, **kwargs)
    raise AssertionError(f"cannot evaluate {node.op}")


# nn.Module's own attribute lookup and call, taken before any tracing patches them (torch.fx replaces both while it
# traces, so that layers and parameters become graph nodes); the sample values are computed with the originals.
_MODULE_GETATTR = nn.Module.__getattr__
_MODULE_CALL = nn.Module.__call__


@contextmanager
def _untraced() -> Iterator[None]:
    patched_getattr, patched_call = nn.Module.__getattr__, nn.Module.__call__
    nn.Module.__getattr__ = _MODULE_GETATTR  # type: ignore[method-assign]
    nn.Module.__call__ = _MODULE_CALL  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__getattr__ = patched_getattr  # type: ignore[method-assign]
        nn.Module.__call__ = patched_call  # type: ignore[method-assign]


_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension", "element_size"})
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})


class _ConcreteProxy(fx.Proxy):
    """A traced value that also knows its value on the sample batch, so shape checks in ``forward`` work."""

    tracer: _Tracer

    def _static(self, use: str) -> Any:
        return self.tracer.static_value(self, use)

    def __int__(self) -> int:
        return int(self._static("int()"))

    def __index__(self) -> int:
        return int(self._static("an index"))

    def __float__(self) -> float:
        return float(self._static("float()"))

    def __len__(self) -> int:
        return len(self.tracer.values[self.node.name])


class _Tracer(fx.Tracer):
    """Symbolic tracing that runs every operation on a sample batch as it goes.

    ``torch.nn`` layers and robustlab's ``Normalize`` stay whole (containers are traced through). Python-level
    decisions on shapes (``if x.dim() != 4``, ``int(x.shape[1])``) take the sample's answer, which holds for every
    input of that shape; a decision on the input's *values* would not, and is refused.
    """

    def __init__(self, sample: Tensor) -> None:
        super().__init__()
        self.sample = sample
        self.values: dict[str, Any] = {}
        self.shape_derived: set[str] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from robustlab.models import Normalize

        return isinstance(m, Normalize) or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **more: Any) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        node = proxy.node
        if kind == "placeholder":
            value: Any = self.sample if not self.values else None
        else:
            with _untraced():
                value = evaluate_fx_node(self.root, node, self.values)
        self.values[node.name] = value
        if _queries_shape(node, self.shape_derived):
            self.shape_derived.add(node.name)
        return proxy

    def create_node(self, kind: str, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(kind, target, *args, **kwargs)
        if kind == "get_attr":  # tensors met while tracing become attributes without a proxy
            with _untraced():
                self.values[node.name] = evaluate_fx_node(self.root, node, self.values)
        return node

    def static_value(self, proxy: fx.Proxy, use: str) -> Any:
        """The sample's value of a traced value used by Python code: allowed for shapes only."""
        if proxy.node.name not in self.shape_derived:
            raise fx.proxy.TraceError(
                f"'{proxy.node.name}' (a value computed from the input's values) is used in {use}, so the model's "
                "computation depends on the input's values in Python code"
            )
        return self.values[proxy.node.name]

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.static_value(obj, "an if/while condition"))

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        return iter(self.static_value(obj, "a loop"))


def _queries_shape(node: fx.Node, shape_derived: set[str]) -> bool:
    """Whether a node's value depends on tensors' shapes only (``x.size(1)``, ``x.shape[2] * 2``, ``x.dim()``)."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRIBUTES:
        return True
    if node.op in ("call_function", "call_method"):
        inputs = node.all_input_nodes
        return bool(inputs) and all(n.name in shape_derived for n in inputs)
    return False


def trace_fx(model: nn.Module, sample: Tensor) -> tuple[fx.GraphModule, dict[str, Any]]:
    """The model's torch.fx graph and every node's value on ``sample``."""
    name = type(model).__name__
    tracer = _Tracer(sample)
    try:
        with torch.no_grad():
            graph = tracer.trace(model)
    except ConfigError:
        raise
    except fx.proxy.TraceError as exc:
        raise ConfigError(_TRACE_ERROR.format(name=name, error=str(exc))) from exc
    except Exception as exc:  # the model's own code failed on the sample, or it cannot be traced
        raise ConfigError(
            f"bound propagation could not trace {name} on an input of shape {tuple(sample.shape)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return fx.GraphModule(tracer.root, graph, name), tracer.values


def where_of(root: nn.Module, node: fx.Node) -> str:
    """Where an fx node sits in the model, for messages: ``module 'layer1.0.conv1' (Conv2d)`` or ``in 'layer1.0'
    (BasicBlock)``."""
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        return f"module '{node.target}' ({type(module).__name__})"
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, kind = list(stack.values())[-1]
        kind_name = getattr(kind, "__name__", str(kind))
        return f"in module '{path}' ({kind_name})"
    return f"in the forward of {type(root).__name__}"


def check_eval_mode(model: nn.Module) -> None:
    """BatchNorm needs its running statistics and Dropout must be off for the bounds to describe the model."""
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ConfigError(
                f"bound propagation needs BatchNorm in eval mode ({path or 'the model'} is in train mode): call "
                "model.eval() first"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise ConfigError(f"bound propagation needs Dropout off ({path} is in train mode): call model.eval() first")


def trace_graph(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> BoundGraph:
    """Trace ``model`` (in eval mode) for inputs of per-example shape ``input_shape`` into a :class:`BoundGraph`."""
    from robustlab.certification.bounds.convert import build_graph

    if not isinstance(model, nn.Module):
        raise ConfigError(f"bound propagation needs an nn.Module, got {type(model).__name__}")
    check_eval_mode(model)
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    traced, values = trace_fx(model, _sample((2, *input_shape), dtype, device, generator))
    graph = build_graph(model, traced, values, tuple(input_shape))
    _check_against_model(graph, model, _sample((3, *input_shape), dtype, device, generator))
    return graph


def _sample(shape: tuple[int, ...], dtype: torch.dtype, device: Any, generator: torch.Generator | None) -> Tensor:
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    return torch.rand(shape, generator=g, dtype=dtype).to(device)


def _check_against_model(graph: BoundGraph, model: nn.Module, sample: Tensor) -> None:
    """The converted graph must compute what the model computes (on a batch size other than the trace's)."""
    with torch.no_grad():
        expected = model(sample)
        got = graph.forward(sample)
    if not isinstance(expected, Tensor) or expected.shape != got.shape:
        raise ConfigError(
            f"bound propagation could not reproduce {type(model).__name__}: its output has shape "
            f"{getattr(expected, 'shape', type(expected).__name__)} on a batch of 3 but the traced graph gives "
            f"{tuple(got.shape)} (does the model reshape with a fixed batch size?)"
        )
    scale = float(expected.abs().max()) + 1.0
    error = float((expected - got).abs().max())
    if not error <= 1e-4 * scale:
        raise ConfigError(
            f"bound propagation could not reproduce {type(model).__name__}: the traced graph differs from the "
            f"model by {error:.3g} (in-place updates of a tensor used elsewhere, or a fixed batch size in a reshape?)"
        )


Converter = Callable[..., Any]
