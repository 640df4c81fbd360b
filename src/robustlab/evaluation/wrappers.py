"""Model wrappers the evaluation applies when a diagnostic shows the plain model would mislead attacks.

- :class:`LogOutputs`: a model ending in softmax returns probabilities; their logarithm are logits up to a
  per-example constant, so attacks and their losses behave as intended (Carlini & Wagner 2017 on softmax
  saturation).
- :class:`ExpectationOverTransformation`: a randomized model is attacked through the mean of its logits over
  ``samples`` draws, whose gradient is the expectation of the gradients (Athalye, Carlini, Wagner, "Obfuscated
  Gradients Give a False Sense of Security", ICML 2018, section 4.3).
- :func:`with_bpda`: named non-differentiable layers are replaced in the backward pass by the identity
  (Backward Pass Differentiable Approximation, same paper, section 4.1): the forward pass is unchanged.
  :func:`without_layers` removes them altogether, for an output layer that only hides the logits (a one-hot).
- :class:`NoiseSmoothedGradient`: the model's own outputs forward, the gradient of their mean over small Gaussian
  input noise backward (the gradient of a smoothed model, as in Athalye et al.'s EOT and Cohen et al. 2019's
  randomized smoothing): oscillating or piecewise-constant terms average out, the predictions are unchanged.
- :class:`MajorityVote`: the vote counts of ``votes`` draws of a randomized model, as scores; their argmax is the
  majority label. The evaluation re-checks every adversarial example through it, with more draws than any attack
  made per query.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from robustlab.checks import check_positive_int
from robustlab.errors import ConfigError

__all__ = [
    "ExpectationOverTransformation",
    "LogOutputs",
    "MajorityVote",
    "NoiseSmoothedGradient",
    "StraightThrough",
    "draws_per_query",
    "with_bpda",
    "without_layers",
]


class LogOutputs(nn.Module):
    """``log(model(x))`` for a model returning probabilities (clamped away from zero)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(self.model(x).clamp_min(1e-30))


class ExpectationOverTransformation(nn.Module):
    """Mean logits of ``samples`` independent forward passes of a randomized model."""

    def __init__(self, model: nn.Module, samples: int = 10) -> None:
        super().__init__()
        self.model = model
        self.samples = check_positive_int("EOT samples", samples)

    def forward(self, x: Tensor) -> Tensor:
        repeated = x.repeat((self.samples,) + (1,) * (x.dim() - 1))
        logits = self.model(repeated)
        return logits.reshape(self.samples, x.shape[0], -1).mean(dim=0)


class StraightThrough(nn.Module):
    """Forward through ``layer``, backward as the identity: ``x + (layer(x) - x).detach()``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(x)
        if out.shape != x.shape:
            raise ConfigError(
                f"BPDA with the identity needs a layer whose output has its input's shape; "
                f"{type(self.layer).__name__} maps {tuple(x.shape)} to {tuple(out.shape)}"
            )
        return x + (out - x).detach()


def with_bpda(model: nn.Module, layer_names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` whose named submodules (``model.named_modules()`` names) pass gradients straight through."""
    return _with_replaced(model, layer_names, StraightThrough, "BPDA")


def without_layers(model: nn.Module, layer_names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` whose named submodules are the identity, forward and backward: for an output layer that
    only hides the logits before it (a one-hot of their argmax), what attacks should see; the real model still
    judges every success."""
    return _with_replaced(model, layer_names, lambda _: nn.Identity(), "removal")


def _with_replaced(
    model: nn.Module, layer_names: Sequence[str], replacement: Callable[[nn.Module], nn.Module], purpose: str
) -> nn.Module:
    wrapped = copy.deepcopy(model)
    modules = dict(wrapped.named_modules())
    for name in layer_names:
        if name not in modules or name == "":
            available = ", ".join(n for n in modules if n) or "none"
            raise ConfigError(f"no submodule named {name!r} for {purpose}; the model's submodules are: {available}")
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else wrapped
        setattr(parent, child, replacement(modules[name]))
    return wrapped


class NoiseSmoothedGradient(nn.Module):
    """Forward: ``model(x)``. Backward: the gradient of the mean of ``model(x + sigma * n)`` over ``samples`` draws of
    standard Gaussian noise ``n``."""

    def __init__(self, model: nn.Module, sigma: float, samples: int = 8) -> None:
        super().__init__()
        self.model = model
        self.sigma = float(sigma)
        self.samples = check_positive_int("smoothing samples", samples)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return self.model(x)
        with torch.no_grad():
            plain = self.model(x)
        repeated = x.repeat((self.samples,) + (1,) * (x.dim() - 1))
        noisy = repeated + self.sigma * torch.randn_like(repeated)
        smooth = self.model(noisy).reshape(self.samples, x.shape[0], -1).mean(dim=0)
        return plain + (smooth - smooth.detach())


class MajorityVote(nn.Module):
    """Scores: how many of ``votes`` draws of ``model`` predict each class (the argmax is the majority label)."""

    def __init__(self, model: nn.Module, votes: int) -> None:
        super().__init__()
        self.model = model
        self.votes = check_positive_int("votes", votes)

    def forward(self, x: Tensor) -> Tensor:
        repeated = x.repeat((self.votes,) + (1,) * (x.dim() - 1))
        logits = self.model(repeated)
        winners = logits.argmax(1).reshape(self.votes, x.shape[0])
        counts = torch.zeros(x.shape[0], logits.shape[1], device=logits.device, dtype=logits.dtype)
        counts.scatter_add_(1, winners.T, torch.ones_like(winners.T, dtype=logits.dtype))
        # Ties go to the class with the higher mean logit, not to the lowest index.
        return counts + 1e-3 * torch.softmax(logits.reshape(self.votes, x.shape[0], -1).mean(0), dim=1)


def draws_per_query(model: object) -> int:
    """Forward passes of the underlying model one query of ``model`` costs (EOT, votes and smoothing multiply)."""
    draws = 1
    while isinstance(model, nn.Module):
        if isinstance(model, ExpectationOverTransformation):
            draws *= model.samples
        elif isinstance(model, MajorityVote):
            draws *= model.votes
        elif isinstance(model, NoiseSmoothedGradient):
            draws *= model.samples + 1
        inner = getattr(model, "model", None)
        if inner is None or inner is model:
            break
        model = inner
    return draws
