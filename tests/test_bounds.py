"""Bound propagation: exact on linear models, sound on ReLU networks, never looser than IBP for CROWN."""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch
from torch import nn

import robustlab
from robustlab.certification import margin_bounds, verify
from robustlab.certification.bounds import _affine_transpose
from robustlab.models import Normalize


def linear_model(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(12, 5).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 12, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
    return nn.Sequential(nn.Flatten(), layer)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_linear_model_bounds_equal_the_dual_norm_closed_form(norm: str, method: Literal["ibp", "crown"]) -> None:
    model = linear_model()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 3, 4, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    eps = 0.07
    threat = robustlab.ThreatModel(norm, eps, -math.inf, math.inf)
    result = margin_bounds(model, x, y, threat, method)
    layer = model[1]
    assert isinstance(layer, nn.Linear)
    weight, bias = layer.weight, layer.bias
    dual = {"linf": 1, "l2": 2, "l1": math.inf}[norm]
    for i in range(6):
        others = [j for j in range(5) if j != int(y[i])]
        w = weight[y[i]] - weight[others]
        exact = w @ x[i].flatten() + bias[y[i]] - bias[others] - eps * w.norm(p=dual, dim=1)
        assert torch.allclose(result.margins[i], exact.detach(), atol=1e-10)


def relu_net(kind: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(36, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 4)
        )
    else:
        model = nn.Sequential(
            Normalize(0.5, 0.25),
            nn.Conv2d(1, 3, 3, stride=2, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(1),
            nn.Flatten(),
            nn.Linear(36, 10),
            nn.ReLU(),
            nn.Linear(10, 4),
        )
        norm = model[2]
        with torch.no_grad():
            norm.running_mean.uniform_(-0.2, 0.2)  # type: ignore[operator]
            norm.running_var.uniform_(0.5, 2.0)  # type: ignore[operator]
    return model.double().eval()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_bounds_are_sound_and_crown_never_looser(kind: str, norm: str) -> None:
    model = relu_net(kind)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(8, 1, 6, 6, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    threat = robustlab.ThreatModel(norm, 0.05 if norm == "linf" else 0.3)
    ibp = margin_bounds(model, x, y, threat, "ibp").margins
    crown = margin_bounds(model, x, y, threat, "crown").margins
    assert bool((crown >= ibp - 1e-12).all())
    if kind == "mlp":
        tight = margin_bounds(model, x, y, threat, "crown", intermediate="crown").margins
        assert bool((tight >= ibp - 1e-12).all())
        assert float(tight.sum()) >= float(crown.sum()) - 1e-9
        crown = tight
    # Sound: no point of the ball has a smaller margin than the lower bound.
    for _ in range(200):
        z = threat.random_start(x, g)
        logits = model(z)
        true = logits.gather(1, y[:, None])
        others = torch.stack([torch.cat([logits[i, :c], logits[i, c + 1 :]]) for i, c in enumerate(y.tolist())])
        assert bool((true - others >= crown - 1e-9).all())
    pgd = robustlab.attack(model, x, y, threat, "pgd", steps=30, seed=0)
    assert not bool((verify(model, x, y, threat, "crown") & pgd.success).any())


def test_crown_is_strictly_tighter_somewhere() -> None:
    model = relu_net("mlp")
    x = torch.rand(16, 1, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = model(x).argmax(1)
    threat = robustlab.ThreatModel("linf", 0.02)
    ibp = margin_bounds(model, x, y, threat, "ibp").margins
    crown = margin_bounds(model, x, y, threat, "crown").margins
    assert float((crown - ibp).max()) > 1e-3


def test_conv_transpose_matches_autograd() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    a = torch.randn(2, 5, 3, 4, 4, dtype=torch.float64)
    fast, bias = _affine_transpose(conv, a, (2, 7, 7))
    probe = torch.zeros(10, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    (slow,) = torch.autograd.grad(conv(probe), probe, grad_outputs=a.reshape(10, 3, 4, 4))
    assert torch.allclose(fast, slow.reshape(2, 5, 2, 7, 7))
    assert conv.bias is not None
    assert torch.allclose(bias, (a * conv.bias.reshape(1, 1, 3, 1, 1)).sum(dim=(2, 3, 4)))


def test_unsupported_models_are_named() -> None:
    x = torch.rand(2, 1, 6, 6)
    y = torch.tensor([0, 1])
    threat = robustlab.ThreatModel("linf", 0.1)
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)).eval()
    with pytest.raises(robustlab.ConfigError, match="does not support MaxPool2d"):
        margin_bounds(pooled, x, y, threat)
    with pytest.raises(robustlab.ConfigError, match=r"needs an nn\.Sequential"):
        margin_bounds(robustlab.models.SmallCNN(), torch.rand(2, 1, 28, 28), y, threat)
    trained = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(36), nn.Linear(36, 3)).train()
    with pytest.raises(robustlab.ConfigError, match="BatchNorm in eval mode"):
        margin_bounds(trained, x, y, threat)
    with pytest.raises(robustlab.ConfigError, match="unknown bound method"):
        margin_bounds(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)), x, y, threat, "deepz")  # type: ignore[arg-type]


def test_ibp_is_differentiable_for_training() -> None:
    model = relu_net("mlp").float()
    x = torch.rand(4, 1, 6, 6)
    y = torch.tensor([0, 1, 2, 3])
    margins = margin_bounds(model, x, y, robustlab.ThreatModel("linf", 0.05), "ibp").margins
    margins.sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
