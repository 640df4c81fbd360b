"""Frank-Wolfe white-box attack: closed forms on linear models, the geometric schedule, FGSM, accounting, options."""

from __future__ import annotations

import math

import pytest
import torch

import robustlab
from robustlab import ConfigError, ThreatModel
from robustlab.attacks.frank_wolfe import FrankWolfe
from robustlab.attacks.registry import get_attack
from tests.toys import LinearClassifier, binary_linear, tiny_cnn

DUAL = {"linf": 1.0, "l2": 2.0, "l1": math.inf}
UNBOUNDED = (-math.inf, math.inf)


def binary_batch(norm: str, radius: torch.Tensor, seed: int = 0):
    """A binary linear model and inputs at distances ``radius`` (per example, in ``norm``) from its boundary."""
    dim = 16
    model = binary_linear(dim).eval()
    w = (model.weight[1] - model.weight[0]).detach()
    b = (model.bias[1] - model.bias[0]).detach()
    n = radius.shape[0]
    g = torch.Generator().manual_seed(seed)
    x0 = 0.5 + 0.2 * (torch.rand(n, dim, generator=g, dtype=torch.float64) - 0.5)
    side = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    margin = side * radius * w.norm(p=DUAL[norm])
    x = x0 + ((margin - (x0 @ w + b)) / (w @ w))[:, None] * w
    return model, x, model(x).argmax(1)


def multiclass_linear(dim: int = 16, classes: int = 10, seed: int = 0) -> LinearClassifier:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    return LinearClassifier(weight, 0.1 * torch.randn(classes, generator=g, dtype=torch.float64)).eval()


# ------------------------------------------------------------------------------------- closed-form answers
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_binary_linear_broken_exactly_above_the_minimal_distance(norm: str) -> None:
    radius = {"linf": 0.05, "l2": 0.2, "l1": 0.4}[norm]
    model, x, y = binary_batch(norm, torch.full((40,), radius, dtype=torch.float64))
    above = robustlab.attack(model, x, y, ThreatModel(norm, 1.05 * radius, *UNBOUNDED), method="fw")
    assert bool(above.success.all()), f"missed {int((~above.success).sum())} of {len(y)}"
    assert bool((above.distance >= radius * (1 - 1e-9)).all())
    below = robustlab.attack(model, x, y, ThreatModel(norm, 0.95 * radius, *UNBOUNDED), method="fw")
    assert not bool(below.success.any())
    for result in (above, below):
        with torch.no_grad():
            fresh = model(result.x_adv).argmax(1) != y
        assert torch.equal(result.success, fresh)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_iterates_follow_the_geometric_schedule(norm: str) -> None:
    """On a binary linear model the momentum keeps the direction of the gradient, so the vertex never changes and
    x_t = x + (1 - (1 - gamma)^t) (v - x): the distance after T steps, and the first step that crosses the
    boundary, are known exactly; so are the gradients early stop spends."""
    eps, gamma, steps = 0.1, 0.2, 12
    # Radii crossed between steps k and k + 1 (k = 0..15), and radii beyond eps.
    between = eps * (1 - (1 - gamma) ** (torch.arange(16, dtype=torch.float64) + 0.37))
    radius = torch.cat([between, torch.tensor([1.2 * eps, 1.5 * eps, 3 * eps], dtype=torch.float64)])
    model, x, y = binary_batch(norm, radius, seed=1)
    threat = ThreatModel(norm, eps, *UNBOUNDED)

    fixed = robustlab.attack(model, x, y, threat, method="fw", steps=steps, gamma=gamma, beta=0.5, early_stop=False)
    unbroken = radius > eps
    reached = eps * (1 - (1 - gamma) ** steps)
    assert torch.allclose(fixed.distance[unbroken], torch.full_like(radius[unbroken], reached), rtol=1e-12)

    result = robustlab.attack(model, x, y, threat, method="fw", steps=steps, gamma=gamma, beta=0.5)
    crossing = torch.log1p(-(radius / eps).clamp(max=1 - 1e-12)) / math.log1p(-gamma)  # real-valued step count
    assert bool(((crossing - crossing.round()).abs() > 1e-6).all()), "choose radii away from exact crossings"
    first = torch.where(radius < eps, crossing.ceil().long(), torch.full_like(y, 10**6))
    first = torch.where(first <= steps, first, torch.full_like(first, -1))
    assert torch.equal(result.extras["iterations"], first)
    assert torch.equal(result.success, first >= 0)
    # Step t evaluates x_t: success at t < steps costs t + 1 gradients, the last iterate costs a forward pass.
    assert result.gradients is not None
    expected = torch.where((first >= 0) & (first < steps), first + 1, torch.full_like(first, steps))
    assert torch.equal(result.gradients, expected)
    final_forward = ((first < 0) | (first == steps)).long()
    assert torch.equal(result.queries, result.gradients + final_forward)


def test_targeted_reaches_explicit_targets() -> None:
    model = multiclass_linear()
    g = torch.Generator().manual_seed(2)
    x = 0.5 + 0.2 * (torch.rand(30, 16, generator=g, dtype=torch.float64) - 0.5)
    y = model(x).argmax(1)
    targets = (y + 1 + torch.randint(0, 9, (30,), generator=g)) % 10
    for loss in ("ce", "margin"):
        result = robustlab.attack(
            model, x, y, ThreatModel("linf", 0.6, *UNBOUNDED), method="fw", targets=targets, loss=loss
        )
        assert result.targeted and bool(result.success.all()), loss
        with torch.no_grad():
            assert torch.equal(model(result.x_adv).argmax(1), targets)
        assert bool((result.extras["iterations"] >= 1).all())


# --------------------------------------------------------------------------------------------- the step
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_one_step_with_gamma_one_and_no_momentum_is_fgsm(norm: str, targeted: bool) -> None:
    model = tiny_cnn().double()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(16, 1, 6, 6, generator=g, dtype=torch.float64)
    x[:, :, 0, :] = 1.0  # rows on a box face: clipping must agree too
    with torch.no_grad():
        y = model(x).argmax(1)  # correctly classified at the start, so no example stops before its step
    targets = (y + 3) % 10 if targeted else None
    threat = ThreatModel(norm, 0.2 if norm == "linf" else 1.0)
    fw = robustlab.attack(
        model, x, y, threat, method="fw", targets=targets, steps=1, gamma=1.0, beta=0.0, early_stop=False
    )
    fgsm = robustlab.attack(model, x, y, threat, method="fgsm", targets=targets)
    if norm == "linf":
        assert torch.equal(fw.x_adv, fgsm.x_adv)
    else:
        assert torch.allclose(fw.x_adv, fgsm.x_adv, rtol=0, atol=1e-12)
    assert torch.equal(fw.success, fgsm.success)


def test_step_matches_the_formulas() -> None:
    """m_t = beta m_{t-1} + (1 - beta) g_t, v_t = x + eps sign(m_t), x_{t+1} = clip(x_t + gamma (v_t - x_t))."""
    attack = FrankWolfe(gamma=0.3, beta=0.8)
    threat = ThreatModel("linf", 0.25)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64)
    g1, g2 = torch.randn(2, 3, 2, 4, 4, generator=g, dtype=torch.float64)
    state = attack._start(x, threat, g)
    assert torch.equal(state["x_adv"], x) and not bool(state["momentum"].any())
    state = attack._step(state, g1, x, threat, 0)
    m1 = 0.2 * g1
    x1 = (x + 0.3 * (x + 0.25 * m1.sign() - x)).clamp(0, 1)
    assert torch.allclose(state["momentum"], m1) and torch.allclose(state["x_adv"], x1)
    state = attack._step(state, g2, x, threat, 1)
    m2 = 0.8 * m1 + 0.2 * g2
    x2 = (x1 + 0.3 * (x + 0.25 * m2.sign() - x1)).clamp(0, 1)
    assert torch.allclose(state["momentum"], m2) and torch.allclose(state["x_adv"], x2)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_iterates_stay_in_ball_and_box_without_projection(norm: str) -> None:
    attack = FrankWolfe(gamma=0.7, beta=0.3)
    threat = ThreatModel(norm, {"linf": 0.3, "l2": 1.5, "l1": 4.0}[norm])
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 6, 6, generator=g, dtype=torch.float64)
    x[:, :, 0, :2] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    state = attack._start(x, threat, g)
    for step in range(30):
        grad = torch.randn(x.shape, generator=g, dtype=torch.float64) * 10 ** float(torch.randn(1, generator=g))
        state = attack._step(state, grad, x, threat, step)
        assert bool(threat.contains(state["x_adv"], x, rtol=1e-12, atol=1e-12).all()), step


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("targeted", [False, True])
def test_contract(norm: str, dtype: torch.dtype, targeted: bool) -> None:
    model = tiny_cnn().to(dtype)
    model[2].train()  # a module left in train mode must come back in train mode
    modes = [m.training for m in model.modules()]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, 6, 6, generator=g, dtype=dtype)
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0
    y = torch.randint(0, 10, (10,), generator=g)
    targets = (y + 1) % 10 if targeted else None
    before = x.clone()
    threat = ThreatModel(norm, {"linf": 0.1, "l2": 0.5, "l1": 2.0}[norm])
    result = robustlab.attack(model, x, y, threat, method="fw", targets=targets, steps=10, gamma=0.3)
    assert torch.equal(x, before)
    assert [m.training for m in model.modules()] == modes
    assert result.x_adv.dtype == dtype and result.x_adv.shape == x.shape
    assert bool(threat.contains(result.x_adv, x).all())
    with torch.no_grad():
        predicted = model.eval()(result.x_adv).argmax(1)
    assert torch.equal(result.success, predicted == targets if targeted else predicted != y)
    assert result.targeted is targeted and "iterations" in result.extras


def test_registry_metadata() -> None:
    info = get_attack("fw")
    assert info.cls is FrankWolfe and info.supports_targeted
    assert {n.value for n in info.norms} == {"linf", "l2", "l1"}
    assert info.access is robustlab.Access.GRADIENT


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    "options",
    [
        {"steps": 0},
        {"steps": -1},
        {"steps": 1.5},
        {"gamma": 0.0},
        {"gamma": -0.1},
        {"gamma": 1.01},
        {"beta": 1.0},
        {"beta": -0.1},
        {"beta": True},
        {"loss": "hinge"},
        {"early_stop": 1},
        {"restarts": 2},
    ],
)
def test_bad_options_raise_config_error(options: dict) -> None:
    with pytest.raises(ConfigError):
        FrankWolfe(**options)


def test_boundary_options_are_valid() -> None:
    FrankWolfe(gamma=1.0, beta=0.0)
    FrankWolfe(gamma=1e-6, beta=0.999, loss="dlr")
