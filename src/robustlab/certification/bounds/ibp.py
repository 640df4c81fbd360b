"""Interval bound propagation over a bound graph.

Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training Verifiably Robust Models", 2018:
every node's values are enclosed in a box, computed from its inputs' boxes. Two refinements keep IBP tight where
it is cheap: for l1/l2 balls the first weight layer is bounded by the dual norm of its rows (the ball, carried
through reshapes and uniform scalings, is far smaller than its enclosing box), and the margin specification is
folded into a final ``Linear`` layer (``C W`` instead of ``C`` applied to the logits' box), which makes IBP exact
on a linear model. Everything here is differentiable, for certified training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from robustlab.certification.bounds.graph import Node
from robustlab.certification.bounds.ops import (
    ChannelAffineOp,
    ConvOp,
    DenseOp,
    Interval,
    LinearOp,
    MonotoneLinearOp,
    ReshapeOp,
    ScaleShiftOp,
)
from robustlab.certification.bounds.state import Ball, BoundState
from robustlab.threat import Norm


def node_interval(state: BoundState, node: Node) -> Interval:
    """The interval of one perturbed node from its inputs' (the input node: the threat model's box)."""
    if node.op.role == "input":
        if state.threat.norm is not Norm.LINF:
            state.balls[node.index] = Ball(state.x, state.threat.eps)
        return state.input_box()
    inputs = [state.input_value(i) for i in node.inputs]
    lower, upper = node.op.interval(inputs)
    ball = _ball_input(state, node)
    if ball is None:
        return lower, upper
    if isinstance(node.op, (DenseOp, ConvOp)):
        return _dual_norm_interval(node.op, ball, state.threat.norm.dual, lower, upper)
    carried = _carry_ball(node, ball, [state.constants.get(i) for i in node.inputs])
    if carried is not None:
        state.balls[node.index] = carried
    return lower, upper


def _ball_input(state: BoundState, node: Node) -> Ball | None:
    perturbed = [i for i in node.inputs if state.graph.nodes[i].perturbed]
    if len(perturbed) != 1:
        return None
    return state.balls.get(perturbed[0])


def _carry_ball(node: Node, ball: Ball, constants: list[Tensor | None]) -> Ball | None:
    """The image of a ball under an operation that maps balls into balls: reshapes, slicing, padding and
    permutations (non-expansive), and scalings by the same factor everywhere."""
    op = node.op
    if isinstance(op, ReshapeOp) or (isinstance(op, MonotoneLinearOp) and not op.mixing):
        return Ball(op.forward(ball.center), ball.radius)
    if isinstance(op, ChannelAffineOp):
        scale = op.scale().abs()
        if bool((scale == scale.reshape(-1)[0]).all()):
            return Ball(op.forward(ball.center), ball.radius * float(scale.reshape(-1)[0]))
    if isinstance(op, ScaleShiftOp):
        values = [c if c is not None else ball.center for c in constants]
        factor = op.factor_value(values)
        size = factor.abs() if isinstance(factor, Tensor) else torch.tensor(abs(factor))
        if size.numel() == 1 or bool((size == size.reshape(-1)[0]).all()):
            return Ball(op.forward(*values), ball.radius * float(size.reshape(-1)[0]))
    return None


def _dual_norm_interval(op: DenseOp | ConvOp, ball: Ball, dual: float, lower: Tensor, upper: Tensor) -> Interval:
    """Each output is ``<w, patch> + b`` and every patch of a point of the ball lies in a ball of the same radius
    around the center's patch, so it is within ``radius * ||w||_dual`` of its value at the center."""
    weight, _ = op.parameters()
    center = op.forward(ball.center)
    if isinstance(op, DenseOp):
        spread = ball.radius * weight.norm(p=dual, dim=1)
    else:
        norms = weight.reshape(weight.shape[0], -1).norm(p=dual, dim=1)
        spread = ball.radius * norms.reshape(1, -1, 1, 1)
    return torch.maximum(lower, center - spread), torch.minimum(upper, center + spread)


def ibp_pass(state: BoundState) -> None:
    """Fill ``state.bounds`` with the interval of every perturbed node, in topological order."""
    for node in state.graph.nodes:
        if node.perturbed:
            state.bounds[node.index] = node_interval(state, node)


def spec_margins(state: BoundState, spec: Tensor) -> Tensor:
    """Lower bounds of ``spec @ logits`` (spec: (batch, rows, classes)) from the interval bounds in ``state``.

    When the logits come from a ``Linear`` layer the specification is folded into it first.
    """
    graph = state.graph
    out = graph.nodes[graph.output]
    if isinstance(out.op, DenseOp):
        source = out.inputs[0]
        weight, bias = out.op.parameters()
        folded = spec @ weight  # (batch, rows, in)
        lower, upper = state.bounds[source]
        lo, hi = lower.reshape(lower.shape[0], 1, -1), upper.reshape(upper.shape[0], 1, -1)
        margins = (folded.clamp(min=0) * lo + folded.clamp(max=0) * hi).sum(dim=2)
        if bias is not None:
            margins = margins + spec @ bias
        ball = state.balls.get(source)
        if ball is not None:
            center = (folded * ball.center.reshape(ball.center.shape[0], 1, -1)).sum(dim=2)
            center = center + (spec @ bias if bias is not None else 0.0)
            margins = torch.maximum(margins, center - ball.radius * folded.norm(p=state.threat.norm.dual, dim=2))
        return margins
    lower, upper = state.bounds[graph.output]
    return (spec.clamp(min=0) @ lower.unsqueeze(2) + spec.clamp(max=0) @ upper.unsqueeze(2)).squeeze(2)


def is_linear(node: Node) -> bool:
    return isinstance(node.op, LinearOp)
