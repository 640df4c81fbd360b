"""Model wrappers the evaluation applies when a diagnostic shows the plain model would mislead attacks.

- :class:`LogOutputs`: a model ending in softmax returns probabilities; their logarithm are logits up to a
  per-example constant, so attacks and their losses behave as intended (Carlini & Wagner 2017 on softmax
  saturation).
- :class:`ExpectationOverTransformation`: a randomized model is attacked through the mean of its logits over
  ``samples`` draws, whose gradient is the expectation of the gradients (Athalye, Carlini, Wagner, "Obfuscated
  Gradients Give a False Sense of Security", ICML 2018, section 4.3).
- :func:`with_bpda`: named non-differentiable layers are replaced in the backward pass by the identity
  (Backward Pass Differentiable Approximation, same paper, section 4.1): the forward pass is unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from robustlab.checks import check_positive_int
from robustlab.errors import ConfigError

__all__ = ["ExpectationOverTransformation", "LogOutputs", "StraightThrough", "with_bpda"]


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
    wrapped = copy.deepcopy(model)
    modules = dict(wrapped.named_modules())
    for name in layer_names:
        if name not in modules or name == "":
            available = ", ".join(n for n in modules if n) or "none"
            raise ConfigError(f"no submodule named {name!r} for BPDA; the model's submodules are: {available}")
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else wrapped
        setattr(parent, child, StraightThrough(modules[name]))
    return wrapped
