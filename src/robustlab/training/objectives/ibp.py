"""Certified training with interval bound propagation (IBP) and CROWN-IBP.

Gowal, Dvijotham, Stanforth, Bunel, Qin, Uesato, Arandjelovic, Mann, Kohli. "On the Effectiveness of Interval
Bound Propagation for Training Verifiably Robust Models", 2018: minimize
``kappa * CE(f(x), y) + (1 - kappa) * CE(z_worst, y)`` where ``z_worst`` has 0 for the true class and minus the
lower bound of each margin ``f_y - f_j`` elsewhere, computed by IBP over the ball of radius ``eps_t``. ``eps_t``
ramps linearly from 0 to the threat model's eps and ``kappa`` from 1 to ``kappa_end`` between ``warmup`` and
``ramp`` (fractions of training). With ``bounds="crown-ibp"`` (Zhang et al., "Towards Stable and Efficient
Training of Verifiably Robust Neural Networks", ICLR 2020) the margins mix CROWN-IBP and IBP bounds, with the
CROWN-IBP weight ``beta`` ramping from 1 to 0.

Any model :func:`robustlab.certification.bounds.trace_graph` can trace works: residual networks, pooling,
BatchNorm (``robustlab train --method ibp --arch preactresnet18``). Deep networks under the usual initializations
have astronomically loose interval bounds (about 1e14 for PreActResNet-18 at 8/255, against about 50 for a 4-layer
CNN), whose gradients blow training up at the first step; ``init="auto"`` (the default) then re-initializes the
weight layers at the first step with the IBP initialization of Shi, Wang, Zhang, Yi, Hsieh, "Fast Certified Robust
Training with Short Warmup", NeurIPS 2021 (normal with standard deviation ``sqrt(2 pi) / fan_in``, halved after a
residual sum, the last layer kept), and warns; ``init="ibp"`` always does, ``init="keep"`` never does. The model
is traced once, at the first step, and the graph reused (it reads the live parameters). BatchNorm layers must be in
eval mode for bounds, so the bound pass runs in eval mode (the clean pass in train mode).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.certification.bounds import BoundGraph, ibp_and_crown_ibp, trace_graph
from robustlab.certification.bounds.ops import ConvOp, ConvTransposeOp, DenseOp, SumOp
from robustlab.checks import check_choice, check_number
from robustlab.errors import ConfigError
from robustlab.threat import ThreatModel
from robustlab.training.objectives.base import Objective, ObjectiveConfig, StepContext, StepOutput, register_objective
from robustlab.utils import model_mode


@dataclass(frozen=True)
class IBPConfig(ObjectiveConfig):
    """Options of :class:`IBPTraining`.

    Attributes:
        bounds: "ibp" or "crown-ibp".
        warmup: fraction of training with eps 0 and kappa 1 (clean training first).
        ramp: fraction of training at which eps reaches the threat model's eps and kappa reaches kappa_end.
        kappa_end: final weight of the clean loss (0.5 in Gowal et al.).
        train_eps_factor: train at this multiple of the threat model's eps (Gowal et al. use 1.1 on MNIST).
        init: "auto", "ibp" or "keep": Shi et al.'s IBP initialization at the first step (see the module docstring).
    """

    bounds: str = "ibp"
    warmup: float = 0.1
    ramp: float = 0.6
    kappa_end: float = 0.5
    train_eps_factor: float = 1.0
    init: str = "auto"

    def validate(self) -> None:
        check_choice("bounds", self.bounds, ("ibp", "crown-ibp"))
        check_choice("init", self.init, ("auto", "ibp", "keep"))
        check_number("warmup", self.warmup, low=0, high=1)
        check_number("ramp", self.ramp, low=0, high=1)
        if not self.warmup < self.ramp:
            raise ConfigError(f"need 0 <= warmup < ramp <= 1, got warmup={self.warmup!r}, ramp={self.ramp!r}")
        check_number("kappa_end", self.kappa_end, low=0, high=1)
        check_number("train_eps_factor", self.train_eps_factor, low=0, low_open=True)


# Interval bounds of the margins above this (in logit units) at initialization mean the network's intervals grow
# exponentially with depth: a 4-layer CNN starts near 50 at eps 0.3, PreActResNet-18 near 1e14 at 8/255.
EXPLODED = 1e4


def ibp_initialization(graph: BoundGraph, generator: torch.Generator) -> list[str]:
    """Shi et al.'s IBP initialization of every weight layer but the last; returns the layers re-initialized."""
    done = []
    for node in graph.nodes:
        if not isinstance(node.op, (DenseOp, ConvOp, ConvTransposeOp)) or node.index == graph.output:
            continue
        weight = node.op.module.weight
        fan_in = weight[0].numel() if not isinstance(node.op, ConvTransposeOp) else weight[:, 0].numel()
        std = math.sqrt(2 * math.pi) / fan_in
        source = graph.nodes[node.inputs[0]]
        before = [source, *(graph.nodes[i] for i in source.inputs)]
        if any(isinstance(n.op, SumOp) for n in before):  # a residual sum doubles the interval it passes on
            std /= 2
        with torch.no_grad():
            sample = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
            weight.copy_(sample.to(weight.device) * std)
        done.append(node.where)
    return done


def worst_case_logits(margin_lower: Tensor, labels: Tensor) -> Tensor:
    """Logits with 0 for the true class and ``-lower(f_y - f_j)`` for every other class j (in class order)."""
    batch, others = margin_lower.shape
    classes = others + 1
    out = torch.zeros(batch, classes, dtype=margin_lower.dtype, device=margin_lower.device)
    mask = torch.ones(batch, classes, dtype=torch.bool, device=margin_lower.device)
    mask[torch.arange(batch, device=labels.device), labels] = False
    out[mask] = -margin_lower.reshape(-1)
    return out


@register_objective
class IBPTraining(Objective):
    """IBP / CROWN-IBP certified training (Gowal et al. 2018; Zhang et al. 2020)."""

    name = "ibp"
    Config = IBPConfig
    config: IBPConfig
    attack_bn_mode = "eval"
    paper = "Gowal et al. 2018; Zhang et al., ICLR 2020"

    def schedule(self, progress: float) -> tuple[float, float, float]:
        """(eps_t, kappa_t, beta_t) at a fraction ``progress`` of training."""
        c = self.config
        ramp = min(max((progress - c.warmup) / (c.ramp - c.warmup), 0.0), 1.0)
        eps = ramp * self.threat.eps * c.train_eps_factor
        kappa = 1.0 - ramp * (1.0 - c.kappa_end)
        beta = 1.0 - ramp
        return eps, kappa, beta

    _graph: BoundGraph | None = None
    _initialized = False

    def _bound_graph(self, model: nn.Module, x: Tensor) -> BoundGraph:
        """The model's bound graph, traced at the first step (again if the model or the input shape changes)."""
        inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
        graph = self._graph
        if graph is None or graph.model is not inner or graph.input_shape != tuple(x.shape[1:]):
            graph = trace_graph(inner, tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            self._graph = graph
        return graph

    def _maybe_initialize(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        """At a run's first step: the IBP initialization if asked, or if the bounds at the final eps explode."""
        if self.config.init == "keep":
            return
        with model_mode(model, "eval"):
            graph = self._bound_graph(model, x)
            if self.config.init == "auto":
                threat = self.threat.with_eps(self.threat.eps * self.config.train_eps_factor)
                with torch.no_grad():
                    margins, _ = ibp_and_crown_ibp(graph, x, y, threat, crown=False)
                size = float(margins.abs().median())
                if not size > EXPLODED:
                    return
                warnings.warn(
                    f"IBP bounds of this model are about {size:.2g} at eps {threat.eps:g} at the start of training "
                    "(their intervals grow exponentially with depth): re-initializing its weight layers with Shi et "
                    "al.'s IBP initialization (ibp option init='keep' to keep the weights)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            ibp_initialization(graph, torch.Generator().manual_seed(0))

    def step(self, model: nn.Module, x: Tensor, y: Tensor, context: StepContext) -> StepOutput:
        if context.step == 0 and not self._initialized:
            self._initialized = True
            self._maybe_initialize(model, x, y)
        eps, kappa, beta = self.schedule(context.progress)
        logits = model(x)
        loss = kappa * F.cross_entropy(logits, y)
        scalars = {"eps": eps, "kappa": kappa}
        if eps > 0:
            threat = ThreatModel(self.threat.norm, eps, self.threat.lower, self.threat.upper)
            crown = self.config.bounds == "crown-ibp" and beta > 0
            with model_mode(model, "eval"):
                margins, crown_ibp = ibp_and_crown_ibp(self._bound_graph(model, x), x, y, threat, crown=crown)
                if crown_ibp is not None:
                    margins = beta * torch.maximum(crown_ibp, margins) + (1 - beta) * margins
            loss = loss + (1 - kappa) * F.cross_entropy(worst_case_logits(margins, y), y)
            scalars["verified_fraction"] = float((margins.detach() > 0).all(dim=1).float().mean())
        return StepOutput(loss=loss, logits_clean=logits.detach(), scalars=scalars)
