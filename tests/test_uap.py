"""Universal adversarial perturbations: DeepFool's closed form on a linear model, the UAP inside ball and box,
fooling rates from labels only, and bad input."""

from __future__ import annotations

import pytest
import torch

from robustlab import ConfigError, InvalidInputError, ThreatModel
from robustlab.attacks.uap import UAPConfig, deepfool, fooling_rate, universal_perturbation
from tests.toys import binary_linear, tiny_cnn


def test_deepfool_on_a_linear_model_is_the_closed_form() -> None:
    model = binary_linear(10, dtype=torch.float64, seed=1).eval()
    x = torch.rand(6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.2 + 0.4
    labels = model(x).argmax(1)
    w = model.weight[1] - model.weight[0]
    f = (model(x)[:, 1] - model(x)[:, 0]).detach().abs()
    threat = ThreatModel("l2", 10.0, -100.0, 100.0)
    r, _ = deepfool(model, x, labels, threat, steps=5, overshoot=0.02, candidates=2)
    expected = 1.02 * (f + 1e-4) / w.norm()
    assert torch.allclose(r.norm(dim=1), expected.detach(), rtol=1e-6)
    assert bool((model(x + r).argmax(1) != labels).all())
    linf = ThreatModel("linf", 10.0, -100.0, 100.0)
    r_inf, _ = deepfool(model, x, labels, linf, steps=5, overshoot=0.02, candidates=2)
    assert torch.allclose(r_inf.abs().amax(dim=1), (1.02 * (f + 1e-4) / w.abs().sum()).detach(), rtol=1e-6)


@pytest.mark.parametrize("method", ["deepfool", "sgd"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_universal_perturbation_fools_a_linear_model_inside_ball_and_box(method: str, norm: str) -> None:
    """Points of class 1 near the boundary: one perturbation against w fools them all (eps chosen so it can)."""
    model = binary_linear(16, dtype=torch.float64, seed=2).eval()
    w = (model.weight[1] - model.weight[0]).detach()
    g = torch.Generator().manual_seed(1)
    x = (0.5 + 0.1 * torch.rand(200, 16, generator=g, dtype=torch.float64)).clamp(0, 1)
    x = x + (0.02 - (x @ w + model.bias[1].detach()) / w.norm() ** 2)[:, None] * w  # 0.02 ||w|| past the boundary
    assert bool((model(x).argmax(1) == 1).all())
    eps = 0.05 * w.norm().item() / w.abs().sum().item() * 4 if norm == "linf" else 0.1
    threat = ThreatModel(norm, eps)
    found = universal_perturbation(model, x[:100], threat, UAPConfig(method=method, passes=10), seed=0)
    v = found.perturbation
    assert v.shape == (1, 16) and float(threat.distance(v, torch.zeros_like(v))[0]) <= eps * (1 + 1e-9)
    held_out = fooling_rate(model, x[100:], v, threat)
    assert held_out.rate >= 0.9 and held_out.queries == 200
    moved = threat.clip_to_box(x[100:] + v)
    assert bool(threat.contains(moved, x[100:]).all())
    assert torch.equal(held_out.fooled, model(moved).argmax(1) != model(x[100:]).argmax(1))


def test_universal_perturbation_through_a_surrogate_on_a_cnn() -> None:
    target, surrogate = tiny_cnn(seed=0), tiny_cnn(seed=1)
    x = torch.rand(40, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    threat = ThreatModel("linf", 0.1)
    found = universal_perturbation(surrogate, x[:20], threat, UAPConfig(passes=2), seed=0)
    assert float(found.perturbation.abs().max()) <= 0.1 + 1e-7 and found.gradients > 0
    rate = fooling_rate(target, x[20:], found.perturbation, threat)
    assert 0.0 <= rate.rate <= 1.0 and rate.fooled.shape == (20,)


def test_bad_input_is_named() -> None:
    model = tiny_cnn()
    x = torch.rand(4, 1, 6, 6)
    threat = ThreatModel("linf", 0.1)
    with pytest.raises(InvalidInputError, match="perturbation has shape"):
        fooling_rate(model, x, torch.zeros(1, 1, 5, 5), threat)
    with pytest.raises(InvalidInputError, match="exceeds eps"):
        fooling_rate(model, x, torch.full((1, 1, 6, 6), 0.5), threat)
    with pytest.raises(ConfigError, match="method"):
        UAPConfig(method="svd").validate()
    with pytest.raises(ConfigError, match="linf or l2"):
        universal_perturbation(model, x, ThreatModel("l1", 1.0))
