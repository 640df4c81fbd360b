"""Checks that catch models which only look robust, in the spirit of AutoAttack's ``checks.py`` and of Carlini
et al., "On Evaluating Adversarial Robustness" (2019).

Each check returns a :class:`Diagnostic` that says whether it fired, what it saw, why it matters and what the
evaluation did about it. The checks:

- ``probabilities``: the model ends in a softmax; losses saturate and gradients vanish. Fix: attack log-outputs.
- ``train_mode``: the model was handed over in train mode (BatchNorm statistics and dropout would be wrong).
  Fix: evaluate in eval mode and restore the mode afterwards.
- ``randomized``: two forward passes on the same input disagree. Fix: expectation over transformation (EOT).
- ``gradients``: the input gradient of the loss is exactly zero or vanishingly small for many examples, or
  disagrees with finite differences of the loss (a non-differentiable layer such as input quantization). Fix:
  margin-based losses, score-based and hard-label attacks with more budget, and BPDA if the user names the layer.
- ``black_box_beats_white_box``: a gradient-free attack broke examples every gradient attack failed on.
- ``large_eps``: robust accuracy does not fall to about zero when eps covers most of the input box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.api import attack as run_attack
from robustlab.attacks.registry import get_attack
from robustlab.evaluation.state import StepReport
from robustlab.evaluation.suites import Suite
from robustlab.oracles import Access, looks_like_probabilities
from robustlab.threat import Norm, ThreatModel

__all__ = [
    "Diagnostic",
    "check_black_box_beats_white_box",
    "check_gradients",
    "check_large_eps",
    "check_probabilities",
    "check_randomized",
    "check_train_mode",
    "has_input_gradient",
    "large_eps_radius",
]


@dataclass
class Diagnostic:
    """One check's verdict, with an explanation for the report."""

    name: str
    fired: bool
    evidence: str
    explanation: str
    action: str = ""
    seconds: float = 0.0  # the check's own time plus the stages it added
    broke: int = 0  # examples the stages it added broke

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "fired": self.fired,
            "evidence": self.evidence,
            "explanation": self.explanation,
            "action": self.action,
            "seconds": self.seconds,
            "broke": self.broke,
        }

    def cost_line(self) -> str:
        """``fired, cost X s, broke N more`` (or ``ok``) for the report."""
        if not self.fired:
            return "ok"
        return f"fired, cost {self.seconds:.1f} s, broke {self.broke} more"


def check_probabilities(model: nn.Module, x: Tensor) -> Diagnostic:
    with torch.no_grad():
        outputs = model(x)
    fired = looks_like_probabilities(outputs)
    return Diagnostic(
        "probabilities",
        fired,
        "outputs are non-negative and every row sums to 1" if fired else "outputs are not probabilities",
        "Attacks expect logits. After a softmax, confident predictions saturate: cross-entropy gradients vanish and "
        "robustness is overestimated (Carlini & Wagner 2017).",
    )


def check_train_mode(model: nn.Module) -> Diagnostic:
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    fired = bool(training)
    return Diagnostic(
        "train_mode",
        fired,
        f"{len(training)} module(s) in train mode, e.g. {training[0]}" if fired else "the model is in eval mode",
        "In train mode BatchNorm uses batch statistics and dropout is active, so predictions depend on the batch "
        "and on chance; a model must be evaluated as deployed.",
    )


def check_randomized(model: nn.Module, x: Tensor, *, trials: int = 3) -> Diagnostic:
    with torch.no_grad():
        first = model(x)
        differ = any(not torch.equal(first, model(x)) for _ in range(trials))
    return Diagnostic(
        "randomized",
        differ,
        "repeated forward passes on the same inputs gave different outputs" if differ else "outputs are repeatable",
        "A randomized defense gives each attack step a noisy gradient and each success check a coin flip; attacks "
        "must average over the randomness (expectation over transformation, Athalye et al. 2018).",
    )


def check_gradients(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Diagnostic:
    """Zero, vanishing or inconsistent input gradients of the cross-entropy on ``(x, y)``."""
    x_var = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x_var), y, reduction="none")
        differentiable = loss.requires_grad  # False for an output cut from the graph (argmax, one-hot)
        (grad,) = torch.autograd.grad(loss.sum(), x_var, allow_unused=True) if differentiable else (None,)
    if grad is None:
        grad = torch.zeros_like(x)
    norms = grad.reshape(grad.shape[0], -1).norm(dim=1)
    zero = float((norms == 0).float().mean())
    vanishing = float((norms < 1e-8).float().mean())
    # Finite differences along a random direction in the ball: a non-differentiable layer shows a loss that
    # changes while the autograd directional derivative says it should not (or the reverse).
    g = torch.Generator(device=x.device).manual_seed(0)
    ball = threat if threat.norm is not Norm.L0 else _l0_probe(threat)
    direction = ball.random_start(x, g) - x
    with torch.no_grad():
        changed = F.cross_entropy(model(x + direction), y, reduction="none") - loss.detach()
    predicted = (grad * direction).reshape(x.shape[0], -1).sum(dim=1)
    scale = changed.abs().clamp_min(1e-6)
    inconsistent = float(((predicted.abs() < 1e-3 * scale) & (changed.abs() > 1e-3)).float().mean())
    fired = zero > 0.5 or vanishing > 0.5 or inconsistent > 0.5
    evidence = (
        f"{100 * zero:.0f}% of examples have an exactly zero input gradient, {100 * vanishing:.0f}% a norm below "
        f"1e-8; for {100 * inconsistent:.0f}% the loss changes over a random step in the ball while the gradient "
        "predicts no change"
    )
    return Diagnostic(
        "gradients",
        fired,
        evidence,
        "Gradient attacks follow the gradient: if it is zero (saturated softmax, quantized or otherwise "
        "non-differentiable layers) they stop where they start, and the model looks robust without being so "
        "(obfuscated gradients, Athalye et al. 2018).",
    )


def _l0_probe(threat: ThreatModel) -> ThreatModel:
    """A ball to draw a random direction from for an l0 threat model (which has no random start): the l1 ball in
    which changing ``eps`` coordinates by half the box each lies."""
    span = threat.upper - threat.lower
    return ThreatModel(Norm.L1, threat.eps * (0.5 * span if math.isfinite(span) else 1.0), threat.lower, threat.upper)


def large_eps_radius(threat: ThreatModel) -> float:
    """A radius covering most of the input box, where robust accuracy must be about 0."""
    span = threat.upper - threat.lower
    if not math.isfinite(span):
        return 10 * threat.eps
    if threat.norm.value == "linf":
        return 0.5 * span
    return max(10 * threat.eps, 0.5 * span)


def check_black_box_beats_white_box(steps: Sequence[StepReport], suite: Suite) -> Diagnostic:
    """Did the gradient-free attacks of ``suite`` (reported in ``steps``) break what every gradient attack failed on?"""
    white = {i for i, s in enumerate(suite.steps) if get_attack(s.method).access is Access.GRADIENT}
    black = [s for i, s in enumerate(steps[: len(suite.steps)]) if i not in white]
    black_broken = sum(s.broken for s in black)
    left = max((s.candidates for s in black), default=0)
    attacked = max((s.attacked for s in black), default=0)
    # A stray example or two is common even on honest models (Square is in AutoAttack's cascade for a reason); a
    # gradient-free attack breaking more than 1% of what the gradient attacks left is the masking signature.
    fired = black_broken >= 2 and black_broken > 0.01 * left
    scope = f"the {left} examples" if attacked == left else f"the {attacked} weakest of the {left} examples"
    return Diagnostic(
        "black_box_beats_white_box",
        fired,
        f"gradient-free attacks broke {black_broken} of {scope} every gradient attack failed on"
        if attacked
        else "no gradient-free attack ran",
        "A gradient-free attack sees strictly less than a gradient attack. When it succeeds where gradient attacks "
        "failed, the gradients are misleading (masked or obfuscated), and the white-box numbers overestimate "
        "robustness.",
    )


def has_input_gradient(model: nn.Module, x: Tensor) -> bool:
    """Whether ``model``'s output is connected to its input in autograd's graph (False when its forward leaves the
    graph, e.g. an inline argmax that no BPDA or smoothing could route around)."""
    x_var = x[:2].detach().clone().requires_grad_(True)
    cuda = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():  # a random model's draws stay where they were
        return bool(model(x_var).requires_grad)


def check_large_eps(
    model: nn.Module, x: Tensor, clean_pred: Tensor, threat: ThreatModel, device: torch.device, seed: int
) -> Diagnostic:
    """APGD-DLR at :func:`large_eps_radius` on the first 100 examples: (almost) every prediction must change."""
    radius = large_eps_radius(threat)
    big = ThreatModel(threat.norm, radius, threat.lower, threat.upper)
    count = min(len(x), 100)
    # l0 has no APGD: FMN, the attack that searches it, with the same number of steps. A model no gradient reaches:
    # Square, which needs only scores (1,000 queries: at this eps a handful usually suffice).
    method, options, label = "apgd", dict[str, Any](loss="dlr", steps=50), "APGD-DLR"
    if threat.norm is Norm.L0:
        method, options, label = "fmn", dict[str, Any](steps=50), "FMN"
    elif not has_input_gradient(model, x[:2].to(device)):
        method, options, label = "square", dict[str, Any](queries=1000), "Square (no gradient reaches the input)"
    result = run_attack(model, x[:count].to(device), clean_pred[:count].to(device), big, method, seed=seed, **options)
    survived = float((~result.success).float().mean())
    fired = survived > 0.05
    return Diagnostic(
        "large_eps",
        fired,
        f"at eps={radius:g} (half the input box), {100 * survived:.0f}% of {count} predictions survived {label}",
        "With eps this large any input can be turned into one of another class, so an attack must succeed on "
        "(almost) every example. If it does not, the attack is being misled, and every robust accuracy it "
        "reports is suspect.",
    )
