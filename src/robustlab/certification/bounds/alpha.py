"""alpha-CROWN: CROWN with the lower relaxations optimized for each margin.

Xu, Zhang, Wang, Wang, Jana, Lin, Hsieh, "Fast and Complete: Enabling Complete Neural Network Verification with
Rapid and Massively Parallel Incomplete Verifiers", ICLR 2021 (the "alpha" of alpha-CROWN).

Any slope in ``[a, 1]`` gives a valid lower line for an unstable (Leaky)ReLU, and any point of the simplex a valid
lower bound of a max-pooling window, so the margin's CROWN bound is a function of these choices that can be
maximized. Each margin row gets its own slopes, initialized at CROWN's adaptive choice, and a few steps of projected
gradient ascent (Adam, learning rate decayed geometrically; the defaults are auto_LiRPA's: 20 steps, lr 0.5,
decay 0.98) improve it. Every iterate is a sound bound, so the best value per margin over the steps is kept, and
the result is never below CROWN's. Intermediate bounds stay CROWN's and only the output margins' slopes are
optimized (auto_LiRPA with CROWN's intermediate bounds passed as ``interm_bounds``; its plain
``compute_bounds(method="CROWN-Optimized")`` re-optimizes every intermediate layer at each step: tighter, and
minutes and gigabytes per example on small convolutional networks, see docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from robustlab.certification.bounds.crown import Slopes, backward_bound
from robustlab.certification.bounds.ops import ActivationOp, MaxPoolOp
from robustlab.certification.bounds.relaxations import pool_lower_weight, project_simplex
from robustlab.certification.bounds.state import BoundState


def alpha_crown(state: BoundState, spec: Tensor, crown: Tensor, *, steps: int, lr: float, decay: float) -> Tensor:
    """Optimized lower bounds of ``spec @ logits``, at least ``crown`` (CROWN's bounds for the same rows)."""
    chunk = state.rows_per_pass(state.graph.output, retained=True)
    parts = []
    with torch.enable_grad():
        for begin in range(0, spec.shape[1], chunk):
            rows = slice(begin, begin + chunk)
            parts.append(_optimize(state, spec[:, rows], crown[:, rows], steps=steps, lr=lr, decay=decay))
    return torch.cat(parts, dim=1)


def initial_slopes(state: BoundState, rows: int) -> Slopes:
    """CROWN's lower relaxations as free parameters, one copy per row, for nodes where the choice matters."""
    slopes = Slopes()
    graph = state.graph
    for index in graph.ancestors(graph.output):
        node = graph.nodes[index]
        if isinstance(node.op, ActivationOp) and node.op.piecewise_linear:
            lower, upper = state.bounds[node.inputs[0]]
            if not bool(((lower < 0) & (upper > 0)).any()):
                continue
            start = state.relaxation(index).lower_slope.detach()
            slopes.relu[index] = _per_row(start, rows)
        elif isinstance(node.op, MaxPoolOp):
            windows = state.windows(index)
            if bool((windows.upper_weight.sum(dim=2) > 0).all()):  # every window decided: max is linear there
                continue
            slopes.pool[index] = _per_row(pool_lower_weight(windows).detach(), rows)
    return slopes


def _per_row(start: Tensor, rows: int) -> Tensor:
    expanded = start.unsqueeze(1).expand(start.shape[0], rows, *start.shape[1:])
    return expanded.clone().requires_grad_(True)


def _project(state: BoundState, slopes: Slopes) -> None:
    with torch.no_grad():
        for index, alpha in slopes.relu.items():
            op = state.graph.nodes[index].op
            alpha.clamp_(min=op.negative_slope, max=1.0)
        for index, weight in slopes.pool.items():
            valid = state.windows(index).valid.unsqueeze(0)
            weight.copy_(project_simplex(weight, valid.expand_as(weight)))


def _optimize(state: BoundState, spec: Tensor, crown: Tensor, *, steps: int, lr: float, decay: float) -> Tensor:
    best = crown.detach().clone()
    slopes = initial_slopes(state, spec.shape[1])
    parameters = [*slopes.relu.values(), *slopes.pool.values()]
    if not parameters:
        return best
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, decay)
    for step in range(steps):
        bound = backward_bound(state, state.graph.output, spec, slopes)
        best = torch.maximum(best, bound.detach())
        if step == steps - 1 or bool((best > 0).all()):
            break
        optimizer.zero_grad(set_to_none=True)
        (-bound.sum()).backward()
        optimizer.step()
        schedule.step()
        _project(state, slopes)
    return best
