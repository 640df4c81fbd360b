"""Tiny models with known answers, shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class LinearClassifier(nn.Module):
    """Logits ``W x + b`` over flattened inputs; the minimal perturbations are known in closed form."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1) @ self.weight.T + self.bias


def binary_linear(dim: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> LinearClassifier:
    """Two classes with logit difference ``w.x + b`` (class 1 minus class 0)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=g, dtype=dtype)
    weight = torch.stack([torch.zeros_like(w), w])
    bias = torch.tensor([0.0, -float(w.sum()) * 0.5], dtype=dtype)  # boundary through the centre of [0,1]^d
    return LinearClassifier(weight, bias)


def tiny_cnn(in_channels: int = 1, num_classes: int = 10, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.AdaptiveMaxPool2d(3),
        nn.Flatten(),
        nn.Linear(72, num_classes),
    )
    norm = model[2]
    assert isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None and norm.running_var is not None
    with torch.no_grad():
        norm.running_mean.fill_(0.3)
        norm.running_var.fill_(0.05)
    return model.eval()
