"""Local Lipschitz constants of a classifier's margin inside the threat model's ball.

For an example ``(x, y)`` the margin against class ``t`` is ``g(x') = f_y(x') - f_t(x')`` (``t``: the runner-up
class at the clean input unless given). Its local Lipschitz constant in the threat norm ``p`` on the ball ∩ box
``B`` is ``sup_{x' in B} ||grad g(x')||_q`` (``q`` the dual exponent: linf <-> l1, l2 <-> l2), and ``g(x) / L``
lower-bounds the distance to the boundary inside ``B`` (Hein & Andriushchenko 2017). Three numbers per example:

- :func:`ascent_lipschitz` — a lower bound: the largest dual gradient norm found by projected ascent on
  ``||grad g||_q`` inside ``B`` (every visited point lies in ``B``, so every value is attained);
- :func:`clever_lipschitz` — CLEVER (Weng et al., "Evaluating the Robustness of Neural Networks: An Extreme Value
  Theory Approach", ICLR 2018): per-batch maxima of gradient norms at points sampled in ``B``, a reverse Weibull
  distribution fitted to them by maximum likelihood (``scipy.stats.weibull_max``), its location (the upper end of
  its support) as the estimate. An estimate, not a bound: it may fall below the true constant;
- :func:`global_lipschitz_bound` — an upper bound valid everywhere: the product of layer operator norms along the
  model's graph (traced as bound propagation traces it), the margin row applied exactly to the last layer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.checks import check_number, check_positive_int
from robustlab.errors import ConfigError, InvalidInputError
from robustlab.threat import Norm, ThreatModel
from robustlab.utils import model_mode

__all__ = [
    "LipschitzConfig",
    "LipschitzResult",
    "ascent_lipschitz",
    "clever_lipschitz",
    "dual_norm",
    "global_lipschitz_bound",
    "local_lipschitz",
    "margin",
    "runner_up",
]


@dataclass(frozen=True)
class LipschitzConfig:
    """Options of the local Lipschitz estimators.

    Attributes:
        ascent_steps: projected-ascent steps on the dual gradient norm (from the clean input and from each restart).
        ascent_restarts: extra ascents from uniform random points of the ball.
        step_size: ascent step, as a fraction of eps.
        clever_batches, clever_batch_size: CLEVER's ``N_b`` batches of ``N_s`` sampled points (the paper uses
            500 x 1024; fewer batches make the fit noisier).
        power_iterations: iterations of the power method for each layer's operator norm (global bound).
        seed: seeds the random starts and samples.
    """

    ascent_steps: int = 20
    ascent_restarts: int = 1
    step_size: float = 0.25
    clever_batches: int = 50
    clever_batch_size: int = 64
    power_iterations: int = 100
    seed: int = 0

    def validate(self) -> None:
        check_positive_int("ascent_steps", self.ascent_steps)
        check_positive_int("ascent_restarts", self.ascent_restarts, minimum=0)
        check_number("step_size", self.step_size, low=0, low_open=True)
        check_positive_int("clever_batches", self.clever_batches, minimum=2)
        check_positive_int("clever_batch_size", self.clever_batch_size)
        check_positive_int("power_iterations", self.power_iterations)


@dataclass(frozen=True)
class LipschitzResult:
    """Per-example local Lipschitz estimates of the margin ``f_y - f_target`` (tensors of shape ``(n,)``).

    ``clever_score`` is CLEVER's robustness score ``min(g(x) / L_clever, eps)`` (0 for misclassified examples);
    ``global_bound`` is the model-wide upper bound for each example's margin row.
    """

    threat: ThreatModel
    target: Tensor
    margin: Tensor
    ascent: Tensor
    clever: Tensor
    clever_score: Tensor
    global_bound: Tensor | None

    def summary(self) -> dict[str, Any]:
        def stats(t: Tensor) -> dict[str, float]:
            return {"mean": float(t.mean()), "median": float(t.median()), "max": float(t.max())}

        out: dict[str, Any] = {
            "threat": str(self.threat),
            "examples": len(self.target),
            "ascent_lower_bound": stats(self.ascent),
            "clever_estimate": stats(self.clever),
            "clever_score": stats(self.clever_score),
        }
        if self.global_bound is not None:
            out["global_upper_bound"] = stats(self.global_bound)
        return out


def dual_norm(t: Tensor, norm: Norm) -> Tensor:
    """Per-row dual norm of ``t`` (linf -> l1, l2 -> l2, l1 -> linf)."""
    flat = t.reshape(t.shape[0], -1)
    return torch.linalg.vector_norm(flat, ord=norm.dual, dim=1)


def runner_up(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The highest-scoring class other than ``y`` at ``x``."""
    with torch.no_grad():
        logits = model(x)
    return logits.scatter(1, y[:, None], -math.inf).argmax(1)


def margin(model: nn.Module, x: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """``f_y(x) - f_target(x)`` per example (differentiable)."""
    logits = model(x)
    return logits.gather(1, y[:, None])[:, 0] - logits.gather(1, target[:, None])[:, 0]


def _margin_gradient(model: nn.Module, x: Tensor, y: Tensor, target: Tensor, *, graph: bool = False) -> Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(margin(model, x, y, target).sum(), x, create_graph=graph)
    return grad


def _check(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"local Lipschitz estimates need gradients: pass an nn.Module, got {type(model).__name__}")
    if not isinstance(threat, ThreatModel):
        raise ConfigError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
    if threat.norm is Norm.L0:
        raise ConfigError("l0 has no dual norm: local Lipschitz constants need linf, l2 or l1")
    threat.check_inputs(x)
    if y.shape != (x.shape[0],):
        raise InvalidInputError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")


def ascent_lipschitz(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor,
    threat: ThreatModel,
    config: LipschitzConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The largest ``||grad g(x')||_q`` over points ``x'`` of the ball ∩ box visited by projected ascent: a lower bound.

    The ascent direction is the gradient of ``||grad g||_q`` itself (double backward). On piecewise-linear networks
    (ReLU) that gradient is zero almost everywhere; those rows step along ``-grad g`` instead (toward the decision
    boundary, where the linear regions, and so the gradients, change).
    """
    best = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    starts = [x] + [threat.random_start(x, generator) for _ in range(config.ascent_restarts)]
    step = config.step_size * threat.eps
    for start in starts:
        point = start.detach()
        for _ in range(config.ascent_steps + 1):
            point = point.detach().requires_grad_(True)
            grad = _margin_gradient(model, point, y, target, graph=True)
            size = dual_norm(grad, threat.norm)
            best = torch.maximum(best, size.detach())
            second = torch.autograd.grad(size.sum(), point, allow_unused=True)[0] if size.requires_grad else None
            if second is None:  # the gradient does not depend on the point here (piecewise linear, or linear)
                direction = -grad.detach()
            else:
                flat = second.reshape(len(second), -1)
                flat_zero = (flat.abs().amax(1) == 0)[:, None]
                direction = torch.where(flat_zero, -grad.detach().reshape_as(flat), flat).reshape(x.shape)
            point = threat.project(point.detach() + step * threat.steepest_ascent(direction), x)
    return best


def _reverse_weibull_location(maxima: Tensor) -> float:
    """The location (upper end) of a reverse Weibull distribution fitted to ``maxima`` by maximum likelihood.

    Falls back to the sample maximum when the values are (numerically) all equal or every fit fails; never returns
    less than the sample maximum (the likelihood is zero below it). A fit whose location lies more than three sample
    ranges above the maximum is discarded as degenerate (the likelihood can grow without bound as the location
    runs away with a shape parameter near 0).
    """
    values = maxima.detach().double().cpu().numpy()
    top = float(values.max())
    spread = float(values.max() - values.min())
    if spread <= 1e-9 * max(abs(top), 1e-30):
        return top
    from scipy import stats

    best_nll, best_loc = math.inf, top
    for shape in (0.1, 1.0, 5.0, 20.0):  # CLEVER refits from several shape starts and keeps the best likelihood
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                c, loc, scale = stats.weibull_max.fit(values, shape, loc=top + 0.1 * spread, scale=spread)
            except Exception:  # scipy's optimizer can fail on degenerate samples; the other starts remain
                continue
            nll = float(stats.weibull_max.nnlf((c, loc, scale), values))
        plausible = math.isfinite(loc) and loc <= top + 3 * spread  # a location far out is a degenerate fit
        if math.isfinite(nll) and nll < best_nll and plausible:
            best_nll, best_loc = nll, float(loc)
    return max(best_loc, top)


def clever_lipschitz(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor,
    threat: ThreatModel,
    config: LipschitzConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """CLEVER's Lipschitz estimate per example (Weng et al. 2018): reverse-Weibull location of batch maxima.

    Each of ``clever_batches`` batches samples ``clever_batch_size`` points uniformly from the ball (moved into the
    box, so every point lies in ball ∩ box) and keeps the largest dual gradient norm.
    """
    n, size = x.shape[0], config.clever_batch_size
    maxima = torch.empty((n, config.clever_batches), dtype=x.dtype, device=x.device)
    chunk = max(1, 4096 // size)  # examples whose samples go through the model together
    for first in range(0, n, chunk):
        part = slice(first, min(n, first + chunk))
        m = part.stop - part.start
        xs = x[part].repeat_interleave(size, dim=0)
        ys, ts = y[part].repeat_interleave(size), target[part].repeat_interleave(size)
        for b in range(config.clever_batches):
            grads = _margin_gradient(model, threat.random_start(xs, generator), ys, ts)
            maxima[part, b] = dual_norm(grads, threat.norm).reshape(m, size).amax(1).detach()
    return torch.tensor([_reverse_weibull_location(row) for row in maxima], dtype=x.dtype, device=x.device)


# ------------------------------------------------------------------------------------------- global upper bound
def _linear_part(op: Any, values: list[Tensor], position: int) -> Any:
    """``v -> A_position v``: the op's linear map on one perturbed input, the others and the offset removed."""
    base = list(values)

    def apply(v: Tensor) -> Tensor:
        args = list(base)
        args[position] = v
        zero = list(base)
        zero[position] = torch.zeros_like(v)
        return op.forward(*args) - op.forward(*zero)

    return apply


def operator_norm(apply: Any, shape: tuple[int, ...], *, iterations: int, dtype: torch.dtype, device: Any) -> float:
    """Spectral norm of the linear map ``apply`` on inputs of shape ``shape`` by power iteration on ``A^T A``.

    ``A^T u`` is the vector-Jacobian product of ``apply``. Power iteration approaches the norm from below; it runs
    until the estimate changes by less than 1e-7 relative, or ``iterations``.
    """
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(shape, generator=generator, dtype=dtype).to(device)
    v = v / v.norm()
    estimate = 0.0
    for _ in range(iterations):
        v = v.detach().requires_grad_(True)
        out = apply(v)
        (back,) = torch.autograd.grad(out, v, grad_outputs=out.detach())
        norm = float(back.norm())
        if norm == 0:
            return 0.0
        new = math.sqrt(norm)  # ||A^T A v|| -> sigma^2 for unit v at convergence
        v = back / norm
        if abs(new - estimate) <= 1e-7 * new:
            estimate = new
            break
        estimate = new
    with torch.no_grad():
        return max(estimate, float(apply(v.detach()).norm()))


def _activation_constant(op: Any) -> float:
    if op.kind == "relu":
        return max(1.0, abs(float(op.negative_slope)))
    return 0.25 if op.kind == "sigmoid" else 1.0


def _maxpool_constant(op: Any) -> float:
    """A max-pool's l2 Lipschitz constant: sqrt of the most windows any input coordinate falls in."""
    count = 1
    for k, s, d in zip(op.kernel, op.stride, op.dilation, strict=True):
        count *= min(k, math.ceil(((k - 1) * d + 1) / s))
    return math.sqrt(count)


def global_lipschitz_bound(
    model: nn.Module, x: Tensor, y: Tensor, target: Tensor, threat: ThreatModel, *, iterations: int = 100
) -> Tensor:
    """An upper bound on the Lipschitz constant of ``f_y - f_target`` in the threat norm, for each example's pair.

    The model is traced into a graph (:func:`robustlab.certification.bounds.trace_graph`; the supported layers are
    bound propagation's). Walking it in order, each node gets a bound on its l2 Lipschitz constant: a linear node
    ``sum_i ||A_i||_2 L_i`` over its perturbed inputs (spectral norms by power iteration on the operator, convolutions
    included), an activation its slope bound times its input's, a max-pool ``sqrt(windows per coordinate)`` times.
    The input starts at ``||I||_{p->2}``: ``sqrt(d)`` for linf, 1 for l2 and l1. The output row ``e_y - e_target``
    is applied exactly to the last linear node; when that node reads the input directly (a linear model), the
    bound is the exact dual norm of the row. Residual sums are covered (the sum of the branch bounds).
    """
    from robustlab.certification.bounds.graph import trace_graph

    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError(
            "the global Lipschitz bound reads the model's layers with torch.fx, which cannot trace a TorchScript "
            "model; skip it (robustlab analyze lipschitz --no-global, or global_bound=False) or load the model as a "
            "robustlab checkpoint"
        )
    with model_mode(model, "eval"):
        graph = trace_graph(model, tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        return _walk_graph(graph, x, y, target, threat, iterations)


def _walk_graph(graph: Any, x: Tensor, y: Tensor, target: Tensor, threat: ThreatModel, iterations: int) -> Tensor:
    constants = graph.constants()
    dim = math.prod(x.shape[1:])
    start = {Norm.LINF: math.sqrt(dim), Norm.L2: 1.0, Norm.L1: 1.0}[threat.norm]
    bound: dict[int, float] = {}
    direct: set[int] = set()  # nodes that are the input up to reshapes
    for node in graph.nodes:
        if not node.perturbed:
            continue
        role = node.op.role
        if role == "input":
            bound[node.index] = start
            direct.add(node.index)
        elif role == "activation":
            bound[node.index] = _activation_constant(node.op) * bound[node.inputs[0]]
        elif role == "maxpool":
            bound[node.index] = _maxpool_constant(node.op) * bound[node.inputs[0]]
        elif node.index != graph.output:
            values = _placeholders(graph, node, constants, x)
            total = 0.0
            for position, i in enumerate(node.inputs):
                if graph.nodes[i].perturbed:
                    apply = _linear_part(node.op, values, position)
                    norm = operator_norm(apply, (1, *graph.nodes[i].shape), iterations=iterations,
                                         dtype=x.dtype, device=x.device)  # fmt: skip
                    total += norm * bound[i]
            bound[node.index] = total
            if type(node.op).__name__ == "ReshapeOp" and node.inputs[0] in direct:
                direct.add(node.index)
        else:
            return _output_bound(graph, node, constants, x, y, target, threat, bound, direct)
    raise ConfigError("the traced model's output is not a linear layer: cannot apply the margin row")


def _placeholders(graph: Any, node: Any, constants: dict[int, Tensor], x: Tensor) -> list[Tensor]:
    """The inputs of ``node``: constants' values, zeros of one example for perturbed ones."""
    return [
        torch.zeros((1, *graph.nodes[i].shape), dtype=x.dtype, device=x.device) if graph.nodes[i].perturbed
        else constants[i]
        for i in node.inputs
    ]  # fmt: skip


def _output_bound(
    graph: Any,
    node: Any,
    constants: dict[int, Tensor],
    x: Tensor,
    y: Tensor,
    target: Tensor,
    threat: ThreatModel,
    bound: dict[int, float],
    direct: set[int],
) -> Tensor:
    """``sum_i ||c^T A_i|| L_i`` for the output node with the margin row ``c = e_y - e_target`` of each example."""
    if node.op.role != "linear":
        raise ConfigError(f"the model's last operation is {node.op.describe()}, not a linear layer")
    rows = torch.zeros((x.shape[0], graph.num_classes), dtype=x.dtype, device=x.device)
    rows.scatter_(1, y[:, None], 1.0)
    rows.scatter_add_(1, target[:, None], -torch.ones_like(rows[:, :1]))
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    values = _placeholders(graph, node, constants, x)
    for position, i in enumerate(node.inputs):
        if not graph.nodes[i].perturbed:
            continue
        apply = _linear_part(node.op, values, position)
        v = torch.zeros((1, *graph.nodes[i].shape), dtype=x.dtype, device=x.device).requires_grad_(True)
        out = apply(v)
        coefficients = torch.stack(
            [torch.autograd.grad(out, v, grad_outputs=row[None], retain_graph=True)[0][0] for row in rows]
        )
        if i in direct:  # the margin is linear in the input: its constant is exactly the row's dual norm
            total += dual_norm(coefficients, threat.norm)
        else:
            total += coefficients.reshape(len(rows), -1).norm(dim=1) * bound[i]
    return total


def local_lipschitz(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    config: LipschitzConfig | None = None,
    *,
    target: Tensor | None = None,
    global_bound: bool = True,
) -> LipschitzResult:
    """Ascent lower bound, CLEVER estimate and (optionally) global upper bound of each example's margin constant.

    Args:
        model: a classifier returning logits (evaluated in eval mode; left in its mode).
        x, y: a batch inside the threat model's box and its labels.
        threat: the ball and box the constant is taken over (its norm fixes the dual norm of the gradients).
        target: the other class of each margin (default: the runner-up class at the clean input).
        global_bound: also compute the layer-norm upper bound (needs a model bound propagation can trace).
    """
    config = config or LipschitzConfig()
    config.validate()
    _check(model, x, y, threat)
    generator = torch.Generator(device=x.device).manual_seed(config.seed)
    with model_mode(model, "eval"):
        target = runner_up(model, x, y) if target is None else target.to(x.device)
        with torch.no_grad():
            margins = margin(model, x, y, target)
        ascent = ascent_lipschitz(model, x, y, target, threat, config, generator)
        clever = clever_lipschitz(model, x, y, target, threat, config, generator)
        upper = None
        if global_bound:
            upper = global_lipschitz_bound(model, x, y, target, threat, iterations=config.power_iterations)
    ratio = (margins / clever.clamp_min(1e-30)).clamp(max=threat.eps)
    score = torch.where(margins > 0, ratio, torch.zeros_like(margins))
    return LipschitzResult(threat, target, margins, ascent, clever, score, upper)
