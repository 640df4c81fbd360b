"""Normalization as the model's first layer: :class:`Normalize` and :class:`NormalizedModel`.

``(x - mean) / std`` inside the model, so attacks, threat models and certificates all work in the raw input box
(RobustBench's ``normalize_model``; the ``NormalizeLayer`` of Cohen, Rosenfeld & Kolter, "Certified Adversarial
Robustness via Randomized Smoothing", ICML 2019).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from robustlab.errors import ConfigError, InvalidInputError

__all__ = ["Normalize", "NormalizedModel"]


def _per_channel(value: float | Sequence[float] | Tensor, what: str) -> Tensor:
    try:
        out = torch.as_tensor(value, dtype=torch.float32).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{what} must be a number or one number per channel, got {value!r}") from exc
    if out.numel() == 0 or not bool(torch.isfinite(out).all()):
        raise ConfigError(f"{what} must be finite numbers, one per channel, got {value!r}")
    return out


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, meant as a model's first layer.

    Inputs stay in the data's box (``[0, 1]`` for images), where threat models, attacks and certificates are
    defined; the normalization a network was trained with is part of the network. ``mean`` and ``std`` are
    registered buffers, so they move with ``.to(device)`` and are saved in the state dict.

    Args:
        mean, std: one value per channel, or a single value for every channel (e.g. ``(0.1307,), (0.3081,)``
            for MNIST, or the CIFAR-10 statistics for 3 channels). ``std`` must be positive.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``; any ``(N, C, ...)`` works.
    """

    if TYPE_CHECKING:  # buffers; annotated for type checkers only (TorchScript cannot read these annotations)
        mean: Tensor
        std: Tensor

    def __init__(self, mean: float | Sequence[float] | Tensor, std: float | Sequence[float] | Tensor) -> None:
        super().__init__()
        mean_t, std_t = _per_channel(mean, "mean"), _per_channel(std, "std")
        if mean_t.numel() != std_t.numel() and 1 not in (mean_t.numel(), std_t.numel()):
            raise ConfigError(f"mean has {mean_t.numel()} channels but std has {std_t.numel()}")
        if bool((std_t <= 0).any()):
            raise ConfigError(f"std must be positive, got {std_t.tolist()}")
        channels = max(mean_t.numel(), std_t.numel())
        self.register_buffer("mean", mean_t.expand(channels).clone())
        self.register_buffer("std", std_t.expand(channels).clone())

    @property
    def channels(self) -> int:
        return int(self.mean.numel())

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            self._check(x)
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = self.mean.to(x.dtype).reshape(shape)
        std = self.std.to(x.dtype).reshape(shape)
        return (x - mean) / std

    @torch.jit.unused
    def _check(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise InvalidInputError(f"Normalize needs inputs shaped (N, C, ...), got {tuple(x.shape)}")
        if self.channels > 1 and x.shape[1] != self.channels:
            raise InvalidInputError(
                f"Normalize has statistics for {self.channels} channels but the input has {x.shape[1]}"
            )

    def extra_repr(self) -> str:
        return f"mean={[round(v, 6) for v in self.mean.tolist()]}, std={[round(v, 6) for v in self.std.tolist()]}"


class NormalizedModel(nn.Module):
    """``model(normalize(x))``: a network together with the input normalization it was trained with.

    :func:`save_checkpoint` stores the inner model's weights with the statistics, and :func:`load_checkpoint`
    rebuilds this wrapper, so the model always takes raw inputs in ``[0, 1]``.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: float | Sequence[float] | Tensor,
        std: float | Sequence[float] | Tensor,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalize(x))
