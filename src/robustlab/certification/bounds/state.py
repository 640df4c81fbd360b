"""What one bound computation knows: the input set, the constants, every node's interval, cached relaxations.

A :class:`BoundState` is filled in topological order (interval bounds, tightened by CROWN where a nonlinearity
needs them), then read by the backward passes of CROWN and alpha-CROWN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from robustlab.certification.bounds.graph import BoundGraph
from robustlab.certification.bounds.ops import ActivationOp, Interval, MaxPoolOp
from robustlab.certification.bounds.relaxations import PoolWindows, Relaxation, activation_relaxation, pool_windows
from robustlab.threat import Norm, ThreatModel


@dataclass
class Ball:
    """``{center + d : ||d||_p <= radius}`` contains the node's values: the input's threat ball, carried through
    reshapes and uniform scalings, so the first weight layer can be bounded by the dual norm of its rows."""

    center: Tensor
    radius: float


@dataclass
class BoundState:
    graph: BoundGraph
    x: Tensor
    threat: ThreatModel
    memory_bytes: int
    constants: dict[int, Tensor] = field(default_factory=dict)
    bounds: dict[int, Interval] = field(default_factory=dict)
    balls: dict[int, Ball] = field(default_factory=dict)
    _relaxations: dict[int, Relaxation] = field(default_factory=dict)
    _windows: dict[int, PoolWindows] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    def input_box(self) -> Interval:
        """Elementwise bounds of the ball intersected with the box (exact for Linf; l1/l2 balls lie inside the
        Linf ball of the same radius)."""
        eps, x = self.threat.eps, self.x
        return (x - eps).clamp(min=self.threat.lower), (x + eps).clamp(max=self.threat.upper)

    def input_value(self, index: int) -> Interval | Tensor:
        """What an operation sees of one of its inputs: an interval if perturbed, else the constant."""
        return self.bounds[index] if self.graph.nodes[index].perturbed else self.constants[index]

    def relaxation(self, index: int) -> Relaxation:
        """CROWN's relaxation of an activation node (cached: its input bounds are final once it is used)."""
        cached = self._relaxations.get(index)
        if cached is None:
            node = self.graph.nodes[index]
            assert isinstance(node.op, ActivationOp)
            lower, upper = self.bounds[node.inputs[0]]
            cached = activation_relaxation(node.op, lower, upper)
            self._relaxations[index] = cached
        return cached

    def windows(self, index: int) -> PoolWindows:
        cached = self._windows.get(index)
        if cached is None:
            node = self.graph.nodes[index]
            assert isinstance(node.op, MaxPoolOp)
            lower, upper = self.bounds[node.inputs[0]]
            cached = pool_windows(node.op, lower, upper, node.shape)
            self._windows[index] = cached
        return cached

    def rows_per_pass(self, start: int, *, retained: bool = False) -> int:
        """How many coefficient rows a backward pass from node ``start`` may carry within the memory limit.

        A pass holds a few coefficient tensors (batch, rows, *shape) of the widest node it crosses at once: the one
        being transformed, its positive and negative parts, the result, and pending ones at residual joins. When
        autograd keeps them (``retained``, for alpha-CROWN), every node's coefficients stay until the gradient.
        """
        ancestors = self.graph.ancestors(start)
        widest = max(self.graph.nodes[i].numel for i in ancestors)
        if retained:
            widest = max(widest * 6, 3 * sum(self.graph.nodes[i].numel for i in ancestors))
        else:
            widest *= 6
        per_row = self.batch * widest * self.x.element_size()
        return max(1, self.memory_bytes // max(per_row, 1))

    def concretize(self, a: Tensor) -> Tensor:
        """``min <a, x'>`` over the input set for each row: (batch, rows). Linf: the box exactly. l1/l2: the ball's
        dual-norm bound, improved by the box bound where tighter (both contain the set)."""
        lower, upper = self.input_box()
        flat = a.reshape(a.shape[0], a.shape[1], -1)
        lo = lower.reshape(lower.shape[0], 1, -1)
        hi = upper.reshape(upper.shape[0], 1, -1)
        box = (flat.clamp(min=0) * lo + flat.clamp(max=0) * hi).sum(dim=2)
        if self.threat.norm is Norm.LINF:
            return box
        center = (flat * self.x.reshape(self.x.shape[0], 1, -1)).sum(dim=2)
        return torch.maximum(box, center - self.threat.eps * flat.norm(p=self.threat.norm.dual, dim=2))
