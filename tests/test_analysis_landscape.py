"""Loss-landscape slices reproduce known functions; weight slices leave the model unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab import ThreatModel
from robustlab.analysis.landscape import (
    filter_normalized_direction,
    input_slice,
    perturbation_consistency,
    slice_figure,
    weight_line,
    weight_slice,
)
from robustlab.errors import ConfigError


class TwoClassLinear(nn.Module):
    """Logits ``(0, w.x + c)``: the cross-entropy of class 0 is ``softplus(w.x + c)``."""

    def __init__(self, w: Tensor, c: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.c = nn.Parameter(torch.tensor(c, dtype=w.dtype))

    def forward(self, x: Tensor) -> Tensor:
        score = x.reshape(len(x), -1) @ self.w + self.c
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_input_slice_reproduces_softplus_along_given_directions() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, dtype=torch.float64)
    model = TwoClassLinear(w, 0.3)
    x = torch.rand(3, 6, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    u, v = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    threat = ThreatModel("l2", 0.5)
    result = input_slice(model, x, y, threat, points=7, span=2.0, directions=(u, v))
    a = torch.tensor(result.coords[0], dtype=torch.float64)
    b = torch.tensor(result.coords[1], dtype=torch.float64)
    assert a[0] == pytest.approx(-1.0) and a[-1] == pytest.approx(1.0)
    assert result.per_example is not None
    expected = F.softplus(
        (x @ w)[:, None, None]
        + 0.3
        + a[None, :, None] * (u @ w)[:, None, None]
        + b[None, None, :] * (v @ w)[:, None, None]
    )
    assert torch.allclose(result.per_example, expected, atol=1e-12)


def test_adversarial_direction_of_a_linear_model_raises_the_loss_fastest() -> None:
    """For a linear score the l2-optimal perturbation is along w: the 1-D slice is softplus(w.x + c + a ||w||), up to
    how close PGD's (randomly started, 10-step) perturbation comes to w's direction."""
    torch.manual_seed(1)
    w = torch.randn(5, dtype=torch.float64)
    model = TwoClassLinear(w, -0.2)
    x = torch.full((2, 5), 0.5, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    result = input_slice(model, x, y, ThreatModel("l2", 0.05), points=5, two_d=False)
    a = torch.tensor(result.coords[0], dtype=torch.float64)
    expected = F.softplus((x @ w)[:, None] - 0.2 + a[None, :] * w.norm())
    assert result.per_example is not None
    assert torch.allclose(result.per_example, expected, atol=3e-3)
    assert (result.per_example.diff(dim=1) > 0).all()
    assert result.labels == ("adversarial",)


def test_weight_slice_of_a_linear_model_and_weights_untouched() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 1, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    result = weight_slice(model, x, y, ThreatModel("linf", 0.1), points=5, span=1.0, seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # Recompute by hand: the same filter-normalized direction moves the weight matrix only (bias at zero).
    direction = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    assert torch.count_nonzero(direction["1.bias"]) == 0
    weight = model.get_submodule("1").get_parameter("weight")
    rows = direction["1.weight"].norm(dim=1) / weight.detach().norm(dim=1)
    assert torch.allclose(rows, torch.ones(3, dtype=torch.float64))
    for a, loss in zip(result.coords[0], result.loss.tolist(), strict=True):
        bias = model.get_submodule("1").get_parameter("bias").detach()
        logits = x.reshape(8, -1) @ (weight.detach() + a * direction["1.weight"]).T + bias
        assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert result.adversarial_loss is not None and (result.adversarial_loss >= result.loss - 1e-6).all()
    two = weight_slice(model, x, y, None, points=3, two_d=True)
    assert two.loss.shape == (3, 3) and two.adversarial_loss is None
    assert float(two.loss[1, 1]) == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-5)
    slice_figure({"w": result})
    slice_figure({"2d": two})


def test_perturbation_consistency_is_one_for_identical_models_and_lower_when_they_differ() -> None:
    torch.manual_seed(4)
    a = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    b = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.rand(6, 1, 4, 4)
    y = torch.randint(0, 4, (6,))
    threat = ThreatModel("l2", 0.5)
    same = perturbation_consistency([a, a], x, y, threat)
    assert float(same[0]) == pytest.approx(1.0, abs=1e-5)
    line = perturbation_consistency(weight_line(a, b, [0.0, 0.5, 1.0]), x, y, threat)
    assert line.shape == (2,) and float(line.max()) < 0.999
    with pytest.raises(ConfigError):
        perturbation_consistency([a], x, y, threat)


def test_weight_slice_of_a_torchscript_model_matches_the_module_and_restores_its_weights() -> None:
    torch.manual_seed(3)
    module = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.rand(8, 1, 2, 3)
    y = torch.randint(0, 3, (8,))
    scripted = torch.jit.trace(module, x)
    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    threat = ThreatModel("linf", 0.1)
    expected = weight_slice(module, x, y, threat, points=5, attack_steps=3, seed=2)
    got = weight_slice(scripted, x, y, threat, points=5, attack_steps=3, seed=2)
    torch.testing.assert_close(got.loss, expected.loss)
    assert got.adversarial_loss is not None and expected.adversarial_loss is not None
    torch.testing.assert_close(got.adversarial_loss, expected.adversarial_loss)
    assert all(torch.equal(v, before[k]) for k, v in scripted.state_dict().items())
    # The weights come back also when the evaluation fails half-way (here: inputs of the wrong size).
    with pytest.raises(RuntimeError):
        weight_slice(scripted, torch.rand(8, 1, 2, 4), y, None, points=3)
    assert all(torch.equal(v, before[k]) for k, v in scripted.state_dict().items())


def test_collapse_slices_of_a_linear_model_follow_softplus_along_sign_w() -> None:
    """For a linear score both the FGSM and the (interior) PGD direction are sign(w): the loss along them is
    softplus(w.x + c + a ||w||_1)."""
    from robustlab.analysis.landscape import collapse_slices

    torch.manual_seed(4)
    w = torch.randn(6, dtype=torch.float64)
    x = 0.5 + 0.1 * torch.rand(3, 6, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    threat = ThreatModel("linf", 0.05)
    linear = {"before": TwoClassLinear(w, 0.3), "after": TwoClassLinear(-w, 0.1)}
    models: dict[str, nn.Module] = dict(linear)
    slices = collapse_slices(models, x, y, threat, points=9)
    assert set(slices) == {f"{m}, {d} direction" for m in models for d in ("FGSM", "PGD")}
    for name, model in linear.items():
        weight, bias = model.w.detach(), float(model.c.detach())
        a = torch.tensor(slices[f"{name}, FGSM direction"].coords[0], dtype=torch.float64)
        expected = F.softplus((x @ weight + bias)[:, None] + a[None, :] * weight.abs().sum()).mean(0)
        for direction in ("FGSM", "PGD"):
            torch.testing.assert_close(slices[f"{name}, {direction} direction"].loss, expected)
