"""APGD and APGD-T: checkpoint schedule, closed-form answers on linear models, accounting, strength, options."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import robustlab
from robustlab import ConfigError, ThreatModel
from robustlab.attacks.apgd import APGD, APGDTargeted, apgd_checkpoints
from robustlab.attacks.registry import get_attack
from tests.toys import LinearClassifier, binary_linear, tiny_cnn

DUAL = {"linf": 1.0, "l2": 2.0, "l1": math.inf}
UNBOUNDED = (-math.inf, math.inf)


# ---------------------------------------------------------------------------------------------- helpers
def binary_batch(norm: str, radius: float, n: int = 40, dim: int = 16, seed: int = 0):
    """A binary linear model and inputs all at distance exactly ``radius`` (in ``norm``) from its boundary."""
    model = binary_linear(dim).eval()
    w = (model.weight[1] - model.weight[0]).detach()
    b = (model.bias[1] - model.bias[0]).detach()
    g = torch.Generator().manual_seed(seed)
    x0 = 0.5 + 0.2 * (torch.rand(n, dim, generator=g, dtype=torch.float64) - 0.5)
    side = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    margin = side * radius * w.norm(p=DUAL[norm])
    x = x0 + ((margin - (x0 @ w + b)) / (w @ w))[:, None] * w
    y = model(x).argmax(1)
    return model, x, y


def multiclass_linear(dim: int = 16, classes: int = 10, seed: int = 0) -> LinearClassifier:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    return LinearClassifier(weight, 0.1 * torch.randn(classes, generator=g, dtype=torch.float64)).eval()


def multiclass_distance(model: LinearClassifier, x: torch.Tensor, y: torch.Tensor, norm: str) -> torch.Tensor:
    """Closed-form distance to the nearest other class of a linear model (no box)."""
    weight, bias = model.weight.detach(), model.bias.detach()
    logits = x @ weight.T + bias
    margins = logits.gather(1, y[:, None]) - logits
    norms = (weight[y][:, None, :] - weight[None, :, :]).norm(p=DUAL[norm], dim=2)
    distance = (margins / norms).scatter(1, y[:, None], math.inf)
    return distance.min(dim=1).values


def trained_mlp(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP fitted to random labels (a non-linear decision surface), and its (all correct) training points."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(256, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (256,), generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(36, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
        ).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    return model, x[correct], y[correct]


# ------------------------------------------------------------------------------------ step-size schedule
def reference_checkpoints(steps: int) -> list[int]:
    """The reference loop of autopgd_base.py, literally: a counter reset at each check of interval k."""
    k = max(int(0.22 * steps), 1)
    shortest = max(int(0.06 * steps), 1)
    decrease = max(int(0.03 * steps), 1)
    counter, points = 0, [0]
    for i in range(steps):
        counter += 1
        if counter == k:
            points.append(i + 1)
            k = max(k - decrease, shortest)
            counter = 0
    return points


def paper_checkpoints(steps: int) -> list[int]:
    """w_j = ceil(p_j * steps), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in 1/100."""
    p = [0, 22]
    while p[-1] < 100:
        p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
    return [-(-q * steps // 100) for q in p if q <= 100]


def test_checkpoints_for_100_steps() -> None:
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(100) == paper_checkpoints(100)


def test_checkpoints_match_the_reference_loop() -> None:
    for steps in range(1, 401):
        assert apgd_checkpoints(steps) == reference_checkpoints(steps), steps
    assert apgd_checkpoints(10) == [0, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert apgd_checkpoints(1) == [0, 1]
    # The paper's rounding and the reference's agree for multiples of 100 steps, not in general.
    for steps in (100, 200, 300, 1000):
        assert apgd_checkpoints(steps) == paper_checkpoints(steps), steps
    assert apgd_checkpoints(50) == [0, 11, 21, 30, 38, 45]
    assert paper_checkpoints(50) == [0, 11, 21, 29, 35, 40, 44, 47, 50]


def test_checkpoints_reject_bad_steps() -> None:
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError):
            apgd_checkpoints(bad)  # type: ignore[arg-type]


def test_step_size_halving_converges_to_an_interior_maximum() -> None:
    """The loss peaks at a point inside the ball: PGD with a fixed step oscillates around it, APGD must halve its
    step at every checkpoint (oscillation), restart from its best point and end within a few eps/256 of it."""

    class Bowl(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            d = ((x - 0.5) ** 2).reshape(x.shape[0], -1).sum(1)
            return torch.stack([torch.zeros_like(d), -d - 1.0], dim=1)  # class 0 always; CE grows toward 0.5

    g = torch.Generator().manual_seed(0)
    x = 0.5 + 0.05 * (2 * torch.rand(8, 16, generator=g, dtype=torch.float64) - 1)
    y = torch.zeros(8, dtype=torch.long)
    for norm, eps, tolerance in (("linf", 0.1, 0.015), ("l2", 0.4, 0.003)):
        result = robustlab.attack(Bowl().eval(), x, y, ThreatModel(norm, eps), method="apgd", early_stop=False, seed=0)
        error = ThreatModel(norm, eps).distance(result.x_adv, torch.full_like(x, 0.5))
        assert bool((error < tolerance * eps).all()), (norm, (error / eps).tolist())
        assert not bool(result.success.any())
        pgd = robustlab.attack(Bowl().eval(), x, y, ThreatModel(norm, eps), method="pgd", steps=100, seed=0)
        assert float(error.mean()) < 0.5 * float(ThreatModel(norm, eps).distance(pgd.x_adv, x * 0 + 0.5).mean())


# ------------------------------------------------------------------------------------- closed-form answers
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_binary_linear_broken_exactly_above_the_minimal_distance(norm: str) -> None:
    radius = 0.05 if norm == "linf" else 0.2
    model, x, y = binary_batch(norm, radius)
    above = robustlab.attack(model, x, y, ThreatModel(norm, 1.05 * radius, *UNBOUNDED), method="apgd", seed=0)
    assert bool(above.success.all()), f"missed {int((~above.success).sum())} of {len(y)}"
    assert bool((above.distance >= radius * (1 - 1e-9)).all())
    below = robustlab.attack(model, x, y, ThreatModel(norm, 0.95 * radius, *UNBOUNDED), method="apgd", seed=0)
    assert not bool(below.success.any())
    for result in (above, below):
        with torch.no_grad():
            fresh = model(result.x_adv).argmax(1) != y
        assert torch.equal(result.success, fresh)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize(("method", "options"), [("apgd", {"loss": "dlr"}), ("apgd-t", {"n_target_classes": 9})])
def test_multiclass_linear_closed_form(norm: str, method: str, options: dict) -> None:
    """The DLR losses reach the nearest other class of a 10-class linear model (CE often aims elsewhere)."""
    model = multiclass_linear()
    g = torch.Generator().manual_seed(1)
    x = 0.5 + 0.2 * (torch.rand(60, 16, generator=g, dtype=torch.float64) - 0.5)
    y = model(x).argmax(1)
    distance = multiclass_distance(model, x, y, norm)
    eps = float(distance.median())
    result = robustlab.attack(model, x, y, ThreatModel(norm, eps, *UNBOUNDED), method=method, seed=0, **options)
    reachable, unreachable = distance < eps / 1.05, distance > eps
    assert int(reachable.sum()) > 10 and int(unreachable.sum()) > 10
    assert bool(result.success[reachable].all()), f"missed {int((~result.success[reachable]).sum())}"
    assert not bool(result.success[unreachable].any())


def test_targeted_apgd_reaches_explicit_targets() -> None:
    model = multiclass_linear()
    g = torch.Generator().manual_seed(2)
    x = 0.5 + 0.2 * (torch.rand(30, 16, generator=g, dtype=torch.float64) - 0.5)
    y = model(x).argmax(1)
    targets = (y + 1 + torch.randint(0, 9, (30,), generator=g)) % 10
    for loss in ("ce", "dlr"):
        result = robustlab.attack(
            model, x, y, ThreatModel("linf", 0.6, *UNBOUNDED), method="apgd", targets=targets, loss=loss, seed=0
        )
        assert result.targeted
        assert bool(result.success.all()), loss
        with torch.no_grad():
            assert torch.equal(model(result.x_adv).argmax(1), targets)


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("method", ["apgd", "apgd-t"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract(method: str, norm: str, dtype: torch.dtype) -> None:
    model = tiny_cnn().to(dtype)
    model[2].train()  # a module left in train mode must come back in train mode
    modes = [m.training for m in model.modules()]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, 6, 6, generator=g, dtype=dtype)
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0  # pixels on the box faces
    y = torch.randint(0, 10, (10,), generator=g)
    before = x.clone()
    threat = ThreatModel(norm, 0.1 if norm == "linf" else 0.5)
    options: dict[str, Any] = {"steps": 8, "restarts": 2}
    if method == "apgd-t":
        options["n_target_classes"] = 3
    result = robustlab.attack(model, x, y, threat, method=method, seed=3, **options)
    assert torch.equal(x, before)
    assert [m.training for m in model.modules()] == modes
    assert result.x_adv.dtype == dtype and result.x_adv.shape == x.shape
    assert bool(threat.contains(result.x_adv, x).all())
    with torch.no_grad():
        fresh = model.eval()(result.x_adv).argmax(1) != y
    assert torch.equal(result.success, fresh)
    again = robustlab.attack(model, x, y, threat, method=method, seed=3, **options)
    assert torch.equal(again.x_adv, result.x_adv), "not reproducible with a fixed seed"
    assert set(result.extras) == {"run", "iterations", "clean_success"}


def test_registry_metadata() -> None:
    apgd, apgd_t = get_attack("apgd"), get_attack("apgd-t")
    assert apgd.cls is APGD and apgd_t.cls is APGDTargeted
    assert apgd.supports_targeted and not apgd_t.supports_targeted
    assert {n.value for n in apgd.norms} == {"linf", "l2", "l1"} == {n.value for n in apgd_t.norms}
    assert robustlab.Access.GRADIENT is apgd.access


# -------------------------------------------------------------------------------------------- accounting
def accounting_batch():
    """Binary linear inputs: 0-4 misclassified, 5-9 out of reach at eps 0.05, 10-19 within reach (linf)."""
    model = binary_linear(16).eval()
    w = (model.weight[1] - model.weight[0]).detach()
    b = (model.bias[1] - model.bias[0]).detach()
    g = torch.Generator().manual_seed(5)
    x0 = 0.5 + 0.1 * (torch.rand(20, 16, generator=g, dtype=torch.float64) - 0.5)
    radius = torch.cat([torch.full((10,), 0.2), torch.linspace(0.005, 0.045, 10)]).to(torch.float64)
    margin = radius * w.abs().sum() * torch.where(torch.arange(20) % 2 == 0, 1.0, -1.0).to(torch.float64)
    x = x0 + ((margin - (x0 @ w + b)) / (w @ w))[:, None] * w
    y = model(x).argmax(1)
    y[:5] = 1 - y[:5]
    return model, x, y


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_gradient_accounting_with_early_stop(norm: str) -> None:
    model, x, y = accounting_batch()
    steps, restarts = 10, 3
    w = (model.weight[1] - model.weight[0]).detach()
    eps = 0.05 if norm == "linf" else 0.05 * float(w.norm(p=1) / w.norm(p=2))  # the same radii in l2 units
    result = robustlab.attack(
        model, x, y, ThreatModel(norm, eps, *UNBOUNDED), method="apgd", steps=steps, restarts=restarts, seed=0
    )
    run, iteration, clean = result.extras["run"], result.extras["iterations"], result.extras["clean_success"]
    assert result.gradients is not None
    assert torch.equal(clean, torch.arange(20) < 5)
    expected = torch.where(
        result.success,
        run.clamp_min(0) * (steps + 1) + iteration + 1,
        torch.full_like(run, restarts * (steps + 1)),
    )
    expected[clean] = 0
    assert torch.equal(result.gradients, expected)
    # Queries: every gradient evaluation, the clean pass, and the class probe on the first example.
    assert torch.equal(result.queries, result.gradients + 1)
    assert bool(result.success[10:].all()) and not bool(result.success[5:10].any())


def test_gradient_accounting_over_restarts() -> None:
    """Few steps on a CNN, so that some examples fall only to a later restart."""
    model = tiny_cnn()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 6, 6, generator=g)
    y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10
    steps, restarts = 3, 4
    result = robustlab.attack(
        model, x, y, ThreatModel("linf", 0.03), method="apgd", steps=steps, restarts=restarts, seed=1
    )
    run, iteration = result.extras["run"], result.extras["iterations"]
    assert int(run.max()) >= 1, "no example fell to a later restart: the test does not exercise restarts"
    expected = torch.where(
        result.success, run.clamp_min(0) * (steps + 1) + iteration + 1, torch.full_like(run, restarts * (steps + 1))
    )
    expected[:4] = 0
    assert result.gradients is not None and torch.equal(result.gradients, expected)


def test_gradient_accounting_without_early_stop() -> None:
    model, x, y = accounting_batch()
    result = robustlab.attack(
        model, x, y, ThreatModel("linf", 0.05), method="apgd", steps=7, restarts=2, early_stop=False, seed=0
    )
    assert result.gradients is not None
    assert bool((result.gradients == 2 * 8).all())
    assert torch.equal(result.queries, result.gradients)
    assert bool(result.success[:5].all()) and bool(result.success[10:].all()) and not bool(result.success[5:10].any())


def test_apgd_t_accounting() -> None:
    model = multiclass_linear(classes=6)
    g = torch.Generator().manual_seed(3)
    x = 0.5 + 0.2 * (torch.rand(30, 16, generator=g, dtype=torch.float64) - 0.5)
    y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 6  # misclassified already
    steps, restarts, targets = 6, 2, 9  # capped at 5 targets for 6 classes
    result = robustlab.attack(
        model,
        x,
        y,
        ThreatModel("linf", 0.14, *UNBOUNDED),
        method="apgd-t",
        steps=steps,
        restarts=restarts,
        n_target_classes=targets,
        seed=0,
    )
    run, iteration = result.extras["run"], result.extras["iterations"]
    expected = torch.where(
        result.success, run.clamp_min(0) * (steps + 1) + iteration + 1, torch.full_like(run, 5 * restarts * (steps + 1))
    )
    expected[:3] = 0
    assert result.gradients is not None and torch.equal(result.gradients, expected)
    assert bool(result.success[3:].any()) and not bool(result.success.all())
    # Runs are numbered target-major: run 2 is the first restart on the second target class.
    assert 2 <= int(run.max()) <= 5 * restarts - 1


# ---------------------------------------------------------------------------------------------- strength
def test_apgd_at_least_as_strong_as_pgd_with_the_same_gradients() -> None:
    """An MLP fitted to random labels, 20 gradients per example for both attacks (PGD: 20 steps, its default step
    2.5 * eps / 20; APGD: 19 steps + the start point). Checked over seeds 0-9 of this set-up: APGD-DLR beat
    PGD-DLR every time (linf eps 0.04: +6 to +17 of 256 examples; l2 eps 0.25: +3 to +13), APGD-CE beat or tied
    PGD-CE in 19 of 20 cases (the exception: -4, linf, seed 5). Seed 0: +3, +15, +4, +5."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two busy cores make the training 10x slower
    try:
        model, x, y = trained_mlp(seed=0)
        for norm, eps in (("linf", 0.04), ("l2", 0.25)):
            threat = ThreatModel(norm, eps)
            for loss in ("ce", "dlr"):
                apgd = robustlab.attack(model, x, y, threat, method="apgd", steps=19, loss=loss, seed=0)
                pgd = robustlab.attack(model, x, y, threat, method="pgd", steps=20, loss=loss, early_stop=True, seed=0)
                assert apgd.gradients is not None and pgd.gradients is not None
                assert int(apgd.gradients.max()) == int(pgd.gradients.max()) == 20
                assert 0.5 < pgd.success_rate < 0.99, (norm, loss, pgd.success_rate)  # neither trivial nor hopeless
                lead = 0.03 if (norm, loss) == ("linf", "dlr") else 0.0
                assert apgd.success_rate >= pgd.success_rate + lead, (norm, loss, apgd.success_rate, pgd.success_rate)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    "options",
    [
        {"steps": 0},
        {"steps": -5},
        {"steps": 2.5},
        {"restarts": 0},
        {"rho": 0.0},
        {"rho": 1.0},
        {"rho": 1.5},
        {"momentum": 0.0},
        {"momentum": 1.2},
        {"initial_step": 0.0},
        {"loss": "hinge"},
        {"loss": "margin"},
        {"early_stop": "yes"},
        {"bogus": 1},
    ],
)
def test_bad_options_raise_config_error(options: dict) -> None:
    with pytest.raises(ConfigError):
        APGD(**options)


@pytest.mark.parametrize("options", [{"n_target_classes": 0}, {"rho": -0.1}, {"steps": 0}, {"loss": "ce"}])
def test_bad_targeted_options_raise_config_error(options: dict) -> None:
    with pytest.raises(ConfigError):
        APGDTargeted(**options)


def test_misuse_raises_config_error() -> None:
    model = multiclass_linear(classes=3)
    x = torch.full((2, 16), 0.5, dtype=torch.float64)
    y = model(x).argmax(1)
    with pytest.raises(ConfigError, match="at least 4 classes"):
        robustlab.attack(model, x, y, ThreatModel("linf", 0.1), method="apgd-t", steps=2)
    with pytest.raises(ConfigError, match="untargeted"):
        robustlab.attack(model, x, y, ThreatModel("linf", 0.1), method="apgd-t", targets=(y + 1) % 3)
    with pytest.raises(ConfigError, match="l0"):
        robustlab.attack(model, x, y, ThreatModel("l0", 2), method="apgd")
