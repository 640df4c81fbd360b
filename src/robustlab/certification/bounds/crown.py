"""CROWN: backward linear bound propagation over a bound graph.

Zhang, Weng, Chen, Hsieh, Daniel, "Efficient Neural Network Robustness Certification with General Activation
Functions", NeurIPS 2018; on general graphs as in Xu et al., "Automatic Perturbation Analysis for Scalable
Certified Robustness and Beyond" (auto_LiRPA), NeurIPS 2020.

A lower bound of ``<a, z_s> + c`` for a node ``s`` is found by walking the graph backwards from ``s``: a linear
operation passes its transpose of ``a`` to its inputs (summed where a tensor feeds several operations, as at a
residual join), a nonlinearity replaces itself by the line below it where ``a`` is positive and the line above it
where ``a`` is negative (:mod:`~robustlab.certification.bounds.relaxations`), and at the input the linear function
is minimized over the threat model's set in closed form. Relaxations need the bounds of their inputs: those are
computed first, node by node in topological order, by this same backward pass (one row per neuron, for the neurons
whose relaxation is not exact under the cheaper interval bounds, in chunks that fit the memory limit), and
intersected with the interval bounds. The final margins are intersected with IBP's, so CROWN is never looser.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from robustlab.certification.bounds import patches
from robustlab.certification.bounds.ibp import node_interval
from robustlab.certification.bounds.ops import (
    ActivationOp,
    ChannelAffineOp,
    ConvOp,
    LinearOp,
    MaxPoolOp,
    SumOp,
    rows_sum,
)
from robustlab.certification.bounds.relaxations import pool_backward, pool_lower_weight, relu_relaxation
from robustlab.certification.bounds.state import BoundState
from robustlab.threat import Norm


@dataclass
class Slopes:
    """Optimizable lower relaxations for alpha-CROWN, per node index: ReLU slopes (batch, rows, *shape) and
    max-pooling simplex weights (batch, rows, channels, kernel_area, outputs). Absent nodes use CROWN's."""

    relu: dict[int, Tensor] = field(default_factory=dict)
    pool: dict[int, Tensor] = field(default_factory=dict)


Coefficients = Tensor | patches.Patches


def _accumulate(pending: dict[int, Coefficients], index: int, passed: Coefficients) -> None:
    """Add coefficients reaching a node along one more path (a tensor read by several operations)."""
    present = pending.get(index)
    if present is None:
        pending[index] = passed
        return
    if isinstance(present, patches.Patches) and isinstance(passed, patches.Patches):
        joined = patches.add(present, passed)
        if joined is not None:
            pending[index] = joined
            return
    pending[index] = _dense(present) + _dense(passed)


def _dense(c: Coefficients) -> Tensor:
    return patches.to_dense(c) if isinstance(c, patches.Patches) else c


def backward_bound(state: BoundState, start: int, a: Coefficients, slopes: Slopes | None = None) -> Tensor:
    """Lower bound of ``<a, z_start>`` over the threat model, for each row of ``a`` (batch, rows, *shape), given as
    a dense tensor or as patches."""
    graph = state.graph
    pending: dict[int, Coefficients] = {start: a}
    values = a.values if isinstance(a, patches.Patches) else a
    total = torch.zeros(values.shape[:2], dtype=values.dtype, device=values.device)
    for index in graph.ancestors(start):
        coefficients = pending.pop(index, None)
        if coefficients is None:
            continue
        node = graph.nodes[index]
        if node.op.role == "input":
            return total + _concretize(state, coefficients)
        if isinstance(coefficients, patches.Patches):
            local = _patches_step(state, index, coefficients, slopes)
            if local is not None:
                bias, passed = local
                total = total + bias if bias is not None else total
                for i, c in passed:
                    _accumulate(pending, i, c)
                continue
            coefficients = patches.to_dense(coefficients)
        bias, dense_passed = _dense_step(state, index, coefficients, slopes)
        total = total + bias if bias is not None else total
        for i, c in dense_passed:
            _accumulate(pending, i, c)
    return total  # the start does not depend on the input


def _concretize(state: BoundState, c: Coefficients) -> Tensor:
    if not isinstance(c, patches.Patches):
        return state.concretize(c)
    lower, upper = state.input_box()
    dual = None if state.threat.norm is Norm.LINF else state.threat.norm.dual
    return patches.concretize(c, lower, upper, state.x, state.threat.eps, dual)


def _dense_step(
    state: BoundState, index: int, a: Tensor, slopes: Slopes | None
) -> tuple[Tensor | None, list[tuple[int, Coefficients]]]:
    graph = state.graph
    node = graph.nodes[index]
    if isinstance(node.op, LinearOp):
        constants = [None if graph.nodes[i].perturbed else state.constants[i] for i in node.inputs]
        shapes = [graph.nodes[i].shape for i in node.inputs]
        result = node.op.backward(a, constants, shapes)
        passed: list[tuple[int, Coefficients]] = [
            (i, c) for i, c in zip(node.inputs, result.coefficients) if c is not None
        ]
        return result.bias, passed
    coefficients, bias = _through_nonlinear(state, index, a, slopes)
    return bias, [(node.inputs[0], coefficients)]


def _patches_step(
    state: BoundState, index: int, p: patches.Patches, slopes: Slopes | None
) -> tuple[Tensor | None, list[tuple[int, Coefficients]]] | None:
    """One node of the backward pass on patches, or None where only the dense form is supported."""
    node = state.graph.nodes[index]
    op = node.op
    source = node.inputs[0]
    if isinstance(op, ConvOp):
        done = patches.conv_backward(p, op, state.graph.nodes[source].shape)
        if done is None:
            return None
        moved, bias = done
    elif isinstance(op, ChannelAffineOp):
        moved, bias = patches.affine_backward(p, op)
    elif isinstance(op, SumOp):
        signed = [patches.Patches(p.values * s, p.location, p.grid, p.stride, p.padding, p.shape) for s in op.signs]
        return None, list(zip(node.inputs, signed))
    elif isinstance(op, ActivationOp) and (slopes is None or index not in slopes.relu):
        moved, bias = patches.activation_backward(p, state.relaxation(index))
    elif isinstance(op, MaxPoolOp) and (slopes is None or index not in slopes.pool):
        windows = state.windows(index)
        moved, bias = patches.pool_backward(p, windows, pool_lower_weight(windows))
    else:
        return None
    passed: Coefficients = patches.to_dense(moved) if moved.covers_map() else moved
    return bias, [(source, passed)]


def _through_nonlinear(state: BoundState, index: int, a: Tensor, slopes: Slopes | None) -> tuple[Tensor, Tensor]:
    node = state.graph.nodes[index]
    if isinstance(node.op, MaxPoolOp):
        windows = state.windows(index)
        weight = slopes.pool.get(index) if slopes is not None else None
        return pool_backward(windows, a, weight if weight is not None else pool_lower_weight(windows))
    assert isinstance(node.op, ActivationOp)
    alpha = slopes.relu.get(index) if slopes is not None else None
    if alpha is not None:
        lower, upper = state.bounds[node.inputs[0]]
        relax = relu_relaxation(node.op, lower.unsqueeze(1), upper.unsqueeze(1), alpha)
        lower_slope, upper_slope = relax.lower_slope, relax.upper_slope
        lower_offset, upper_offset = relax.lower_offset, relax.upper_offset
    else:
        relax = state.relaxation(index)
        lower_slope, upper_slope = relax.lower_slope.unsqueeze(1), relax.upper_slope.unsqueeze(1)
        lower_offset = relax.lower_offset.unsqueeze(1) if relax.lower_offset is not None else None
        upper_offset = relax.upper_offset.unsqueeze(1) if relax.upper_offset is not None else None
    passed = torch.where(a >= 0, lower_slope, upper_slope) * a
    bias = torch.zeros(a.shape[:2], dtype=a.dtype, device=a.device)
    if lower_offset is not None:
        bias = bias + rows_sum(a.clamp(min=0) * lower_offset)
    if upper_offset is not None:
        bias = bias + rows_sum(a.clamp(max=0) * upper_offset)
    return passed, bias


# ----------------------------------------------------------------------------------------------- intermediate
def neurons_to_refine(state: BoundState, index: int) -> Tensor | None:
    """Which neurons of a node need CROWN bounds (batch, numel), or None when its interval is good enough.

    A node needs bounds when a nonlinearity reads it. Interval bounds are exact for a single mixing linear map of
    the Linf box (and as good as CROWN's for the first weight layer on an l1/l2 ball); otherwise ReLUs need the
    neurons whose sign is undecided, the other nonlinearities every neuron.
    """
    graph = state.graph
    node = graph.nodes[index]
    readers = [graph.nodes[c] for c in node.consumers if graph.nodes[c].op.role in ("activation", "maxpool")]
    if not readers or not isinstance(node.op, LinearOp):
        return None
    if node.rank <= 1 and (state.threat.norm is Norm.LINF or _on_ball(state, index)):
        return None
    lower, upper = state.bounds[index]
    if all(isinstance(r.op, ActivationOp) and r.op.piecewise_linear for r in readers):
        mask = (lower < 0) & (upper > 0)
    else:
        mask = torch.ones_like(lower, dtype=torch.bool)
    return mask.reshape(mask.shape[0], -1)


def _on_ball(state: BoundState, index: int) -> bool:
    node = state.graph.nodes[index]
    return any(i in state.balls for i in node.inputs)


def refine(state: BoundState, index: int, mask: Tensor) -> None:
    """Tighten the bounds of the masked neurons of node ``index`` by CROWN (both sides), in memory-sized chunks."""
    node = state.graph.nodes[index]
    lower, upper = state.bounds[index]
    batch, numel = mask.shape
    count = int(mask.sum(dim=1).max())
    if count == 0:
        return
    # Each example's masked neurons first (a stable sort keeps the rest after them): rows beyond an example's own
    # count are computed but not used.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :count]
    used = torch.arange(count, device=mask.device).unsqueeze(0) < mask.sum(dim=1, keepdim=True)
    new_lower, new_upper = lower.reshape(batch, -1).clone(), upper.reshape(batch, -1).clone()
    chunk = max(1, state.rows_per_pass(index) // 2)
    local = len(node.shape) == 3  # a feature map: start with patches
    for begin in range(0, count, chunk):
        picked = order[:, begin : begin + chunk]
        rows = picked.shape[1]
        if local:
            a: Coefficients = patches.start(node.shape, picked, (1.0, -1.0), lower.dtype)
        else:
            dense = torch.zeros(batch, 2 * rows, numel, dtype=lower.dtype, device=lower.device)
            dense[:, :rows].scatter_(2, picked.unsqueeze(2), 1.0)
            dense[:, rows:].scatter_(2, picked.unsqueeze(2), -1.0)
            a = dense.reshape(batch, 2 * rows, *node.shape)
        bound = backward_bound(state, index, a)
        keep = used[:, begin : begin + rows]
        old_low, old_high = new_lower.gather(1, picked), new_upper.gather(1, picked)
        low = torch.where(keep, torch.maximum(old_low, bound[:, :rows]), old_low)
        high = torch.where(keep, torch.minimum(old_high, -bound[:, rows:]), old_high)
        new_lower = new_lower.scatter(1, picked, low)
        new_upper = new_upper.scatter(1, picked, high)
    state.bounds[index] = (new_lower.reshape(lower.shape), new_upper.reshape(upper.shape))


def intermediate_pass(state: BoundState, *, crown: bool) -> None:
    """Bounds of every perturbed node in topological order: intervals, tightened by CROWN where a nonlinearity
    reads them (``crown=True``; with ``False`` this is plain IBP, as CROWN-IBP uses)."""
    for node in state.graph.nodes:
        if not node.perturbed:
            continue
        state.bounds[node.index] = node_interval(state, node)
        if crown:
            mask = neurons_to_refine(state, node.index)
            if mask is not None:
                # Gradients do not flow through CROWN's intermediate bounds: autograd would keep every pass.
                with torch.no_grad():
                    refine(state, node.index, mask)


def output_bound(state: BoundState, spec: Tensor) -> Tensor:
    """CROWN lower bounds of ``spec @ logits`` (spec: (batch, rows, classes)), in chunks of rows."""
    graph = state.graph
    chunk = state.rows_per_pass(graph.output)
    parts = [backward_bound(state, graph.output, spec[:, i : i + chunk]) for i in range(0, spec.shape[1], chunk)]
    return torch.cat(parts, dim=1)
