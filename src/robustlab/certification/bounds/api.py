"""Verified robustness by bound propagation: :func:`margin_bounds`, :func:`verify` and :func:`verify_cascade`.

An example is *verified* when the lower bound of every margin ``f_y(x') - f_j(x')`` (``j != y``) over the threat
model's ball intersected with its box is positive. Verified accuracy <= true robust accuracy <= empirical robust
accuracy against any attack. Three bounds, each at least as tight as the one before on the same graph:

- ``"ibp"``: interval bound propagation (:mod:`.ibp`), cheap and differentiable (certified training);
- ``"crown"``: backward linear relaxation (:mod:`.crown`), with intermediate bounds from CROWN itself (default) or
  from IBP (``intermediate="ibp"``, CROWN-IBP's cheap variant);
- ``"alpha-crown"``: CROWN with lower relaxations optimized per margin (:mod:`.alpha`).

The model is any ``nn.Module`` :func:`~robustlab.certification.bounds.graph.trace_graph` can trace (residual
connections, pooling, BatchNorm, Sigmoid/Tanh...), or an already traced :class:`BoundGraph`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor, nn

from robustlab.certification.bounds.alpha import alpha_crown
from robustlab.certification.bounds.crown import intermediate_pass, output_bound
from robustlab.certification.bounds.graph import BoundGraph, trace_graph
from robustlab.certification.bounds.ibp import spec_margins
from robustlab.certification.bounds.state import BoundState
from robustlab.checks import check_choice, check_number, check_positive_int
from robustlab.errors import ConfigError, InvalidInputError
from robustlab.threat import ThreatModel

__all__ = [
    "METHODS",
    "BoundOptions",
    "BoundResult",
    "Cascade",
    "Method",
    "ibp_and_crown_ibp",
    "margin_bounds",
    "spec_matrix",
    "verify",
    "verify_cascade",
]

Method = Literal["ibp", "crown", "alpha-crown"]
METHODS: tuple[str, ...] = ("ibp", "crown", "alpha-crown")
METHOD_NAMES = {"ibp": "IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}


@dataclass(frozen=True)
class BoundOptions:
    """How bounds are computed.

    Attributes:
        intermediate: "crown" (tight) or "ibp" (cheap) bounds for the nodes nonlinearities read.
        alpha_steps, alpha_lr, alpha_lr_decay: alpha-CROWN's optimization (auto_LiRPA's defaults).
        memory_mb: a backward pass is split into chunks of rows so that its coefficients stay within this.
    """

    intermediate: str = "crown"
    alpha_steps: int = 20
    alpha_lr: float = 0.5
    alpha_lr_decay: float = 0.98
    memory_mb: float = 2048.0

    def __post_init__(self) -> None:
        check_choice("intermediate", self.intermediate, ("crown", "ibp"))
        check_positive_int("alpha_steps", self.alpha_steps)
        check_number("alpha_lr", self.alpha_lr, low=0, low_open=True)
        check_number("alpha_lr_decay", self.alpha_lr_decay, low=0, high=1, low_open=True)
        check_number("memory_mb", self.memory_mb, low=1)


@dataclass(frozen=True)
class BoundResult:
    """Lower bounds of the margins ``f_y - f_j`` (j != y, in class order) over the threat model, per example."""

    margins: Tensor  # (batch, num_classes - 1)
    method: str

    @property
    def verified(self) -> Tensor:
        return (self.margins > 0).all(dim=1)


def spec_matrix(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """C with rows ``e_y - e_j`` for every ``j != y`` in class order: (batch, num_classes - 1, num_classes)."""
    eye = torch.eye(num_classes, dtype=dtype, device=labels.device)
    keep = ~torch.nn.functional.one_hot(labels, num_classes).bool()
    others = torch.arange(num_classes, device=labels.device).expand(len(labels), -1)[keep]
    return eye[labels].unsqueeze(1) - eye[others.reshape(len(labels), num_classes - 1)]


def _graph_for(model: nn.Module | BoundGraph, x: Tensor) -> BoundGraph:
    if isinstance(model, BoundGraph):
        if tuple(model.input_shape) != tuple(x.shape[1:]):
            raise InvalidInputError(
                f"the bound graph was traced for inputs of shape {model.input_shape}, got {tuple(x.shape[1:])}"
            )
        return model
    return trace_graph(model, tuple(x.shape[1:]), dtype=x.dtype, device=x.device)


def _check(graph: BoundGraph, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
    if not isinstance(threat, ThreatModel):
        raise ConfigError(f"threat must be a robustlab.ThreatModel, got {type(threat).__name__}")
    threat.check_inputs(x)
    classes = graph.num_classes
    labels = labels.to(x.device).long()
    if labels.shape != (x.shape[0],) or int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise InvalidInputError(f"labels must have shape ({x.shape[0]},) with values in 0..{classes - 1}")
    return labels


def _options(method: str, options: BoundOptions | None, intermediate: str | None) -> BoundOptions:
    check_choice("method", method, METHODS)
    options = options if options is not None else BoundOptions()
    if not isinstance(options, BoundOptions):
        raise ConfigError(f"options must be a BoundOptions, got {type(options).__name__}")
    return replace(options, intermediate=intermediate) if intermediate is not None else options


def margin_bounds(
    model: nn.Module | BoundGraph,
    x: Tensor,
    labels: Tensor,
    threat: ThreatModel,
    method: Method = "crown",
    *,
    intermediate: Literal["crown", "ibp"] | None = None,
    options: BoundOptions | None = None,
) -> BoundResult:
    """Lower bounds of ``f_y(x') - f_j(x')`` over the threat model for every ``j != y``.

    Args:
        model: a traceable module in eval mode (see :func:`trace_graph`), or a traced :class:`BoundGraph` (reuse
            one across calls: tracing costs a few forward passes).
        x, labels: inputs inside the box and their labels (any labels: a wrong one just gives negative margins).
        method: "ibp", "crown" or "alpha-crown"; each is at least as tight as the one before.
        intermediate: shorthand for ``options.intermediate``.

    Bounds are differentiable in the model's parameters (IBP and CROWN-IBP training); alpha-CROWN's are not.
    """
    options = _options(method, options, intermediate)
    graph = _graph_for(model, x)
    labels = _check(graph, x, labels, threat)
    if method == "alpha-crown":  # optimized slopes are not differentiable in the parameters
        with torch.no_grad():
            return _bounds(graph, x, labels, threat, method, options)
    return _bounds(graph, x, labels, threat, method, options)


def _bounds(
    graph: BoundGraph, x: Tensor, labels: Tensor, threat: ThreatModel, method: str, options: BoundOptions
) -> BoundResult:
    spec = spec_matrix(labels, graph.num_classes, x.dtype)
    state = BoundState(graph, x, threat, int(options.memory_mb * 2**20), constants=graph.constants())
    intermediate_pass(state, crown=method != "ibp" and options.intermediate == "crown")
    margins = spec_margins(state, spec)
    if method == "ibp":
        return BoundResult(margins, "ibp")
    margins = torch.maximum(output_bound(state, spec), margins)
    if method == "alpha-crown":
        margins = alpha_crown(
            state, spec, margins, steps=options.alpha_steps, lr=options.alpha_lr, decay=options.alpha_lr_decay
        )
    return BoundResult(margins, method)


def ibp_and_crown_ibp(
    graph: BoundGraph, x: Tensor, labels: Tensor, threat: ThreatModel, *, crown: bool = True
) -> tuple[Tensor, Tensor | None]:
    """IBP margins and CROWN-IBP margins (CROWN with IBP intermediate bounds, not intersected with IBP's) from one
    interval pass, both differentiable: what IBP and CROWN-IBP certified training mix (Zhang et al., ICLR 2020)."""
    labels = _check(graph, x, labels, threat)
    spec = spec_matrix(labels, graph.num_classes, x.dtype)
    state = BoundState(graph, x, threat, int(BoundOptions().memory_mb * 2**20), constants=graph.constants())
    intermediate_pass(state, crown=False)
    ibp = spec_margins(state, spec)
    return ibp, output_bound(state, spec) if crown else None


@dataclass
class Cascade:
    """Which bound verified each example: ``verified_by[i]`` is the index in ``methods`` of the cheapest bound that
    verified example ``i``, or -1. ``seconds`` and ``examples`` say what each stage cost and how many examples it
    bounded (those its predecessors left, correctly classified)."""

    methods: tuple[str, ...]
    verified_by: Tensor
    seconds: dict[str, float] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)

    def verified(self, method: str) -> Tensor:
        """Verified by ``method`` (every bound of the cascade is at least as tight as those before it)."""
        rank = self.methods.index(method)
        return (self.verified_by >= 0) & (self.verified_by <= rank)


def verify_cascade(
    model: nn.Module | BoundGraph,
    x: Tensor,
    labels: Tensor,
    threat: ThreatModel,
    methods: tuple[str, ...] = ("ibp", "crown"),
    *,
    batch_size: int = 256,
    options: BoundOptions | None = None,
) -> Cascade:
    """Verify with each bound in turn, each only on the examples the cheaper ones left (no gradients).

    Examples the model misclassifies at ``x`` itself are skipped: a margin negative at ``x`` cannot have a positive
    lower bound over a set containing ``x``. Since CROWN's margins are intersected with IBP's and alpha-CROWN's
    start from CROWN's, the result per method equals running that method on every example.
    """
    for method in methods:
        _options(method, options, None)
    if list(methods) != sorted(methods, key=METHODS.index):
        raise ConfigError(f"methods must be cheapest first ({', '.join(METHODS)}), got {', '.join(methods)}")
    check_positive_int("batch_size", batch_size)
    with torch.no_grad():
        graph = _graph_for(model, x)
        labels = _check(graph, x, labels, threat)
        predictions = torch.cat([graph.forward(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
        verified_by = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
        left = predictions == labels
        cascade = Cascade(tuple(methods), verified_by)
        for rank, method in enumerate(methods):
            todo = left.nonzero().flatten()
            started = time.perf_counter()
            for begin in range(0, len(todo), batch_size):
                rows = todo[begin : begin + batch_size]
                result = margin_bounds(graph, x[rows], labels[rows], threat, method, options=options)  # type: ignore[arg-type]
                verified_by[rows[result.verified]] = rank
            cascade.seconds[method] = time.perf_counter() - started
            cascade.examples[method] = len(todo)
            left = left & (verified_by < 0)
    return cascade


def verify(
    model: nn.Module | BoundGraph,
    x: Tensor,
    labels: Tensor,
    threat: ThreatModel,
    method: Method = "crown",
    *,
    intermediate: Literal["crown", "ibp"] | None = None,
    batch_size: int | None = None,
    options: BoundOptions | None = None,
) -> Tensor:
    """Per-example mask: the prediction ``labels`` provably holds on the whole ball (batched, no gradients).

    Runs the cheaper bounds first (:func:`verify_cascade`); the mask is the same as ``margin_bounds(...,
    method).verified``. ``batch_size`` examples are bounded at a time (default 256); within a batch, backward
    passes are split to stay within ``options.memory_mb``.
    """
    options = _options(method, options, intermediate)
    chain = tuple(METHODS[: METHODS.index(method) + 1])
    cascade = verify_cascade(model, x, labels, threat, chain, batch_size=batch_size or 256, options=options)
    return cascade.verified(method)
