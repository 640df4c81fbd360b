"""Minimum-norm attacks (FAB, FAB-T, FMN, DDN, C&W-L2) against closed forms and linear programs on linear models.

The exact minimal distances come from independent computations: the dual-norm formula ``|w.x + b| / ||w||_*`` where
the box is not active, and, where it is, a linear program (scipy's HiGHS) for l1 and linf, a bisection on the KKT
multiplier for l2 and a sort for l0. An attack's distance is that of a re-checked adversarial example, so it can
never be below the minimum; the tests bound it from above.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

import robustlab
from robustlab import ConfigError, ThreatModel
from robustlab.attacks.fab import boundary_projection, reference_l2_projection
from robustlab.attacks.minimum_norm import SmallestAdversarial, robust_accuracy_at, unconstrained_threat
from robustlab.goals import Goal
from robustlab.oracles import GradientOracle
from robustlab.threat import Norm
from tests.toys import LinearClassifier, binary_linear

DUAL = {"linf": 1.0, "l2": 2.0, "l1": math.inf}
# Iterations that bring each attack within 1e-3 of the minimum on these problems (FAB: see test_fab_*).
OPTIONS: dict[str, dict[str, Any]] = {
    "fmn": {"steps": 200},
    "ddn": {"steps": 1000},
    "cw-l2": {"steps": 300, "binary_search_steps": 5, "initial_const": 1.0},
    "fab": {},
}
# C&W's tanh change of variables barely moves coordinates on the box's faces: it needs more steps there.
BOXED_OPTIONS: dict[str, dict[str, Any]] = {
    **OPTIONS,
    "cw-l2": {"steps": 1000, "binary_search_steps": 5, "initial_const": 1.0},
}


# ---------------------------------------------------------------------------------------------- exact answers
def lp_minimum(w: np.ndarray, need: float, lo: np.ndarray, hi: np.ndarray, norm: str) -> float:
    """Smallest l1 or linf norm of d with w.d >= need and lo <= d <= hi, by linear programming."""
    d = w.size
    if norm == "l1":  # d = p - q, p, q >= 0
        result = linprog(
            np.ones(2 * d), A_ub=-np.concatenate([w, -w])[None], b_ub=[-need],
            bounds=[(0, h) for h in hi] + [(0, -lower) for lower in lo], method="highs",
        )  # fmt: skip
    else:  # variables d and t: minimize t with -t <= d_i <= t
        rows = np.zeros((2 * d + 1, d + 1))
        rows[:d, :d], rows[:d, -1] = np.eye(d), -1
        rows[d : 2 * d, :d], rows[d : 2 * d, -1] = -np.eye(d), -1
        rows[-1, :d] = -w
        cost = np.zeros(d + 1)
        cost[-1] = 1
        bounds = [(lower, h) for lower, h in zip(lo, hi, strict=True)] + [(0, None)]
        result = linprog(cost, A_ub=rows, b_ub=np.r_[np.zeros(2 * d), -need], bounds=bounds, method="highs")
    assert result.status == 0
    return float(result.fun)


def l2_minimum(w: np.ndarray, need: float, lo: np.ndarray, hi: np.ndarray) -> float:
    """Smallest l2 norm of d with w.d >= need in the box: d(lam) = clip(lam w, lo, hi), bisection on lam >= 0."""
    low, high = 0.0, 1.0
    while (w * np.clip(high * w, lo, hi)).sum() < need:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if (w * np.clip(middle * w, lo, hi)).sum() < need else (low, middle)
    return float(np.linalg.norm(np.clip(high * w, lo, hi)))


def l0_minimum(w: np.ndarray, need: float, lo: np.ndarray, hi: np.ndarray) -> int:
    """Fewest coordinates to change: take the largest gains ``|w_i| * room_i`` first."""
    gain = np.sort(np.abs(w) * np.where(w > 0, hi, -lo))[::-1]
    return int(np.searchsorted(np.cumsum(gain), need) + 1)


def binary_minimum(model: LinearClassifier, x: torch.Tensor, norm: str) -> np.ndarray:
    """Exact smallest perturbation (in the box [0, 1]) changing a binary linear model's prediction."""
    w = (model.weight[1] - model.weight[0]).detach().numpy()
    b = float((model.bias[1] - model.bias[0]).detach())
    out = []
    for row in x.numpy():
        f = float(w @ row + b)
        v = -np.sign(f) * w  # the direction that moves f toward the other class
        lo, hi = -row, 1 - row
        if norm == "l2":
            out.append(l2_minimum(v, abs(f), lo, hi))
        elif norm == "l0":
            out.append(l0_minimum(v, abs(f), lo, hi))
        else:
            out.append(lp_minimum(v, abs(f), lo, hi, norm))
    return np.array(out)


def closed_form(model: LinearClassifier, x: torch.Tensor, norm: str) -> np.ndarray:
    """``|w.x + b| / ||w||_*`` (``*`` the dual norm) for a binary linear model: the minimum where the box is not
    active."""
    w = (model.weight[1] - model.weight[0]).detach()
    b = (model.bias[1] - model.bias[0]).detach()
    return ((x @ w + b).abs() / w.norm(p=DUAL[norm])).numpy()


def interior_batch(norm: str, n: int = 8, dim: int = 16) -> tuple[LinearClassifier, torch.Tensor, torch.Tensor]:
    """A binary linear model and points in the middle of the box, at distances 0.3-0.9 of the box's half-width
    scale: the box is not active, so the minimum is the closed form."""
    model = binary_linear(dim).eval()
    w = (model.weight[1] - model.weight[0]).detach()
    b = (model.bias[1] - model.bias[0]).detach()
    g = torch.Generator().manual_seed(1)
    x0 = 0.5 + 0.1 * (torch.rand(n, dim, generator=g, dtype=torch.float64) - 0.5)
    side = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(torch.float64)
    radius = {"linf": 0.05, "l2": 0.2, "l1": 0.15}[norm] * (1 + torch.arange(n, dtype=torch.float64) / n)
    x = x0 + ((side * radius * w.norm(p=DUAL[norm]) - (x0 @ w + b)) / (w @ w))[:, None] * w
    return model, x, model(x).argmax(1)


def boxed_batch(n: int = 8, dim: int = 16) -> tuple[LinearClassifier, torch.Tensor, torch.Tensor]:
    """Points whose coordinates of largest weight sit on the face of the box the other class lies beyond: the box
    is active (the dual-norm formula would move them out of the box)."""
    model = binary_linear(dim).eval()
    w = (model.weight[1] - model.weight[0]).detach()
    b = (model.bias[1] - model.bias[0]).detach()
    g = torch.Generator().manual_seed(2)
    x = 0.3 + 0.4 * torch.rand(n, dim, generator=g, dtype=torch.float64)
    side = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(torch.float64)  # +1: class 1, must move down
    heavy = w.abs() >= w.abs().median()
    blocked_face = ((side[:, None] * w) < 0).to(torch.float64)  # the face the boundary lies beyond
    x = torch.where(heavy, blocked_face, x)
    # Scale the free coordinates' offset so each point lies on its side at a moderate margin.
    f = x @ w + b
    x = torch.where(heavy, x, x + ((side * 0.5 * w.norm() - f) / (w[~heavy] @ w[~heavy]))[:, None] * w * ~heavy)
    x = x.clamp(0.0, 1.0)
    return model, x, model(x).argmax(1)


# ------------------------------------------------------------------------------------------------ projection
@pytest.mark.parametrize("norm", ["l1", "linf", "l2"])
def test_boundary_projection_is_the_box_constrained_minimum(norm: str) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        w = torch.randn(1, 12, generator=g, dtype=torch.float64) * (torch.rand(1, 12, generator=g) > 0.2)
        x = torch.rand(1, 12, generator=g, dtype=torch.float64)
        target = torch.randn(1, generator=g, dtype=torch.float64)
        d = boundary_projection(w, target, -x, 1 - x, Norm(norm))
        assert bool(((x + d >= -1e-12) & (x + d <= 1 + 1e-12)).all())
        v = (torch.sign(target) * w)[0].numpy()
        reachable = float((np.abs(v) * np.where(v > 0, 1 - x[0].numpy(), x[0].numpy())).sum())
        if reachable < abs(float(target)) * (1 + 1e-9):  # the box cannot reach the hyperplane: its nearest corner
            assert float((v * d[0].numpy()).sum()) == pytest.approx(reachable, rel=1e-9)
            continue
        assert float((w * d).sum()) == pytest.approx(float(target), abs=1e-9)
        size = {"l1": d.abs().sum(), "linf": d.abs().max(), "l2": d.norm()}[norm].item()
        lo, hi = (-x[0]).numpy(), (1 - x[0]).numpy()
        exact = (
            l2_minimum(v, abs(float(target)), lo, hi)
            if norm == "l2"
            else lp_minimum(v, abs(float(target)), lo, hi, norm)
        )
        assert size == pytest.approx(exact, abs=1e-9)


@pytest.mark.parametrize("norm", ["l1", "linf", "l2"])
def test_boundary_projection_in_float32_on_image_like_points(norm: str) -> None:
    """MNIST-like points (most coordinates on a face of the box) and gradients whose entries span many orders of
    magnitude, in float32: the projection still reaches the hyperplane at the float64 solution's size. (A slope
    sum that rounding drove below zero, times the huge kink of a tiny weight, once returned no step at all.)"""
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.rand(4, 784, generator=g)
        x = torch.where(x < 0.45, 0.0, torch.where(x > 0.85, 1.0, x))
        w = torch.randn(4, 784, generator=g) * 10 ** (-8 * torch.rand(4, 784, generator=g))
        target = torch.randn(4, generator=g) * 0.5
        d = boundary_projection(w, target, -x, 1 - x, Norm(norm))
        exact = boundary_projection(w.double(), target.double(), -x.double(), 1 - x.double(), Norm(norm))
        reachable = (
            (torch.sign(target)[:, None] * w).abs() * torch.where(torch.sign(target)[:, None] * w > 0, 1 - x, x)
        ).sum(1)
        inside = reachable > target.abs() * 1.01
        assert torch.allclose((w * d).sum(1)[inside], target[inside], rtol=1e-3, atol=1e-5)
        size = {"l1": lambda t: t.abs().sum(1), "linf": lambda t: t.abs().amax(1), "l2": lambda t: t.norm(dim=1)}[norm]
        assert torch.allclose(size(d).double(), size(exact), rtol=1e-3, atol=1e-6)


REFERENCE_L2_STEPS = Path(__file__).parent / "data" / "fab_reference_l2.npz"


def test_reference_l2_projection_is_the_exact_one_where_its_gain_is_monotone() -> None:
    """Well-scaled weights in float64: the reference's arithmetic finds the box-constrained minimum, including rows
    the box cannot bring to the hyperplane and rows reached before any coordinate saturates."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 50, generator=g, dtype=torch.float64)
    x = torch.rand(300, 50, generator=g, dtype=torch.float64)
    x = torch.where(torch.rand(300, 50, generator=g) < 0.3, 0.0, x)
    target = torch.randn(300, generator=g, dtype=torch.float64) * torch.logspace(-3, 1.5, 300, dtype=torch.float64)
    exact = boundary_projection(w, target, -x, 1 - x, Norm.L2)
    assert torch.allclose(reference_l2_projection(w, target, -x, 1 - x), exact, atol=1e-9)


def test_reference_l2_projection_reproduces_the_reference_code() -> None:
    """Known answers: image-like float32 rows (pixels on the faces of the box, half the gradient entries below 1e-8)
    and the steps ``projection_l2`` of fra31/auto-attack (commit a392200) returned for them, recorded. On three rows
    its rounding made it step past the hyperplane, far beyond the exact minimum; robustlab's twin must do the same
    (and be exact on the other three), or ``--suite autoattack`` is not the reference."""
    data = np.load(REFERENCE_L2_STEPS, allow_pickle=False)
    x, w, target, recorded = (torch.from_numpy(data[key]) for key in ("x", "w", "target", "step"))
    overshoots = torch.from_numpy(data["overshoots"])
    step = reference_l2_projection(w, target, -x, 1 - x)
    assert torch.allclose(step, recorded, atol=1e-5)
    exact = boundary_projection(w, target, -x, 1 - x, Norm.L2)
    assert bool(overshoots.any()) and bool((~overshoots).any())
    assert torch.allclose(step[~overshoots], exact[~overshoots], atol=1e-5)
    assert bool((step[overshoots].norm(dim=1) > 1.05 * exact[overshoots].norm(dim=1)).all())
    assert bool(((w * step).sum(1)[overshoots].abs() > target[overshoots].abs() * 1.01).all())  # past the plane
    assert bool((step[w.abs() < 1e-8] == 0).all())  # the reference never moves a coordinate of tiny weight
    assert bool(((x + step >= -1e-6) & (x + step <= 1 + 1e-6)).all())  # up to rounding; FAB clips after


def test_fab_projection_option_is_checked_and_only_changes_l2() -> None:
    with pytest.raises(ConfigError, match="projection must be one of"):
        robustlab.get_attack("fab-t").cls(projection="bisection")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(6, 1, 4, 4)
    y = model(x).argmax(1)
    for norm, eps in (("linf", 0.3), ("l1", 2.0)):
        runs = [
            robustlab.attack(model, x, y, ThreatModel(norm, eps), method="fab-t", projection=p, seed=0).x_adv
            for p in ("exact", "reference")
        ]
        assert torch.equal(runs[0], runs[1])


# --------------------------------------------------------------------------------------- closed forms, binary
CASES = [("fmn", "linf"), ("fmn", "l2"), ("fmn", "l1"), ("ddn", "l2"), ("cw-l2", "l2")]


@pytest.mark.parametrize(("method", "norm"), CASES, ids=[f"{m}-{n}" for m, n in CASES])
def test_binary_linear_exact_distance(method: str, norm: str) -> None:
    """Box not active: the smallest perturbation found is |w.x + b| / ||w||_* within 1e-3, never below."""
    model, x, y = interior_batch(norm)
    exact = closed_form(model, x, norm)
    assert np.allclose(exact, binary_minimum(model, x, norm), atol=1e-9)  # the box is indeed not active
    result = robustlab.minimum_norm(model, x, y, norm, method=method, seed=0, **OPTIONS[method])
    assert bool(result.success.all())
    gap = result.distance.numpy() - exact
    assert gap.min() >= -1e-9 and gap.max() <= 1e-3, gap


@pytest.mark.parametrize(("method", "norm"), CASES, ids=[f"{m}-{n}" for m, n in CASES])
def test_box_active_exact_distance(method: str, norm: str) -> None:
    """Half the coordinates sit on the faces the boundary lies beyond: the minimum (a linear program, or a
    bisection for l2) is larger than the dual-norm formula, and the attacks find it within 1e-3."""
    model, x, y = boxed_batch()
    exact = binary_minimum(model, x, norm)
    assert (exact > closed_form(model, x, norm) * 1.05).all()  # the box matters for every one of these points
    result = robustlab.minimum_norm(model, x, y, norm, method=method, seed=0, **BOXED_OPTIONS[method])
    assert bool(result.success.all())
    gap = result.distance.numpy() - exact
    assert gap.min() >= -1e-9 and gap.max() <= 1e-3, gap


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("batch", ["interior", "boxed"])
def test_fab_exact_with_a_small_overshoot(norm: str, batch: str) -> None:
    """FAB's projections are exact: with an extrapolation eta of 1.001 it lands within 1e-3 of the minimum (box
    active or not), never below."""
    model, x, y = interior_batch(norm) if batch == "interior" else boxed_batch()
    exact = binary_minimum(model, x, norm)
    if batch == "interior":  # the box is not active: the minimum is the closed form
        assert np.allclose(exact, closed_form(model, x, norm), atol=1e-9)
    result = robustlab.minimum_norm(model, x, y, norm, method="fab", eta=1.001, seed=0)
    assert bool(result.success.all())
    gap = result.distance.numpy() - exact
    assert gap.min() >= -1e-9 and gap.max() <= 1e-3, gap


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("batch", ["interior", "boxed"])
def test_fab_defaults_settle_just_beyond_the_boundary(norm: str, batch: str) -> None:
    """With the reference's eta 1.05 and beta 0.9, FAB settles 0.52% beyond a linear boundary where the box is not
    active (a fixed point of its extrapolation and pull-back), a little farther where it is: within 1% here."""
    model, x, y = interior_batch(norm) if batch == "interior" else boxed_batch()
    exact = binary_minimum(model, x, norm)
    result = robustlab.minimum_norm(model, x, y, norm, method="fab", seed=0)
    assert bool(result.success.all())
    ratio = result.distance.numpy() / exact
    assert ratio.min() >= 1 - 1e-9 and ratio.max() <= 1.01, ratio
    if batch == "interior":
        assert np.allclose(ratio, 1.00521, atol=1e-4), ratio


def test_fmn_l0_finds_the_fewest_coordinates() -> None:
    """l0 is not convex and FMN's search is local: it finds the fewest coordinates (a sort of the gains) here."""
    model, x, y = boxed_batch()
    exact = binary_minimum(model, x, "l0")
    result = robustlab.minimum_norm(model, x, y, "l0", method="fmn", steps=1000, seed=0)
    assert bool(result.success.all())
    assert np.array_equal(result.distance.numpy(), exact.astype(np.float64)), (result.distance, exact)


# ----------------------------------------------------------------------------------------------- multi-class
def multiclass(dim: int = 16, classes: int = 5, n: int = 10) -> tuple[LinearClassifier, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    model = LinearClassifier(
        torch.randn(classes, dim, generator=g, dtype=torch.float64),
        torch.randn(classes, generator=g, dtype=torch.float64),
    ).eval()
    x = 0.5 + 0.1 * (torch.rand(n, dim, generator=g, dtype=torch.float64) - 0.5)
    return model, x, model(x).argmax(1)


def nearest_boundary(model: LinearClassifier, x: torch.Tensor, y: torch.Tensor, norm: str) -> torch.Tensor:
    """Closed form on a multi-class linear model with the box inactive: the distance to the nearest hyperplane
    ``f_j = f_y``, ``min_j (f_y - f_j) / ||w_y - w_j||_*``."""
    weight, bias = model.weight.detach(), model.bias.detach()
    logits = x @ weight.T + bias
    margins = logits.gather(1, y[:, None]) - logits
    norms = (weight[y][:, None, :] - weight[None, :, :]).norm(p=DUAL[norm], dim=2)
    return (margins / norms).scatter(1, y[:, None], math.inf).min(dim=1).values


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("method", ["fab", "fab-t"])
def test_fab_takes_the_nearest_of_several_boundaries(method: str, norm: str) -> None:
    """On a 5-class linear model (box inactive), untargeted FAB (the nearest linearized boundary) and FAB-T (each
    other class's boundary in turn; untargeted success) find the nearest other class's hyperplane: with an
    extrapolation eta of 1.001 within 1e-3 of the closed form, with the reference's defaults within 0.6%."""
    model, x, y = multiclass()
    exact = nearest_boundary(model, x, y, norm)
    targets: dict[str, Any] = {"n_target_classes": 4} if method == "fab-t" else {}
    overshoots: tuple[tuple[dict[str, Any], float | None], ...] = (({"eta": 1.001}, 1e-3), ({}, None))
    for options, gap in overshoots:
        result = robustlab.minimum_norm(model, x, y, norm, method=method, seed=0, **targets, **options)
        assert bool(result.success.all()) and not result.targeted
        assert bool((result.distance >= exact - 1e-9).all())
        if gap is not None:
            assert float((result.distance - exact).max()) <= gap, result.distance - exact
        else:
            assert bool((result.distance <= exact * 1.006).all())


TARGETED = [("fmn", "linf"), ("fmn", "l2"), ("fmn", "l1"), ("fmn", "l0"), ("ddn", "l2"), ("cw-l2", "l2"),
            ("fab", "linf"), ("fab", "l2"), ("fab", "l1")]  # fmt: skip


@pytest.mark.parametrize(("method", "norm"), TARGETED, ids=[f"{m}-{n}" for m, n in TARGETED])
def test_targeted_variants_reach_their_targets(method: str, norm: str) -> None:
    model, x, y = multiclass()
    targets = (y + 2) % 5
    options = {**OPTIONS[method], **({"steps": 300} if method == "ddn" else {})}
    result = robustlab.minimum_norm(model, x, y, norm, method=method, targets=targets, seed=0, **options)
    assert result.targeted and bool(result.success.all())
    with torch.no_grad():
        assert torch.equal(model(result.x_adv).argmax(1), targets)


# ------------------------------------------------------------------------------------------ the two views
def test_eps_view_agrees_with_the_minimum_norm_view() -> None:
    """With an eps, an example is broken exactly when its smallest perturbation (found without eps) is within it;
    robust_accuracy_at gives the same curve from one run."""
    model, x, y = interior_batch("l2", n=16)  # distances 0.2, 0.2125, ..., 0.3875
    smallest = robustlab.minimum_norm(model, x, y, "l2", method="fmn", steps=200, seed=0)
    eps_values = [0.205, 0.305]
    curve = robust_accuracy_at(smallest, eps_values)
    for eps, robust in zip(eps_values, curve, strict=True):
        threat = ThreatModel("l2", eps)
        result = robustlab.attack(model, x, y, threat, method="fmn", steps=200, seed=0)
        assert bool(threat.contains(result.x_adv, x).all())
        assert torch.equal(result.success, smallest.distance <= eps)
        assert robust == pytest.approx(1 - float(result.success.float().mean()))


def test_unconstrained_threat_covers_the_box() -> None:
    x = torch.rand(2, 3, 4, 4)
    assert unconstrained_threat("linf", x).eps == 1.0
    assert unconstrained_threat("l2", x).eps == pytest.approx(math.sqrt(48))
    assert unconstrained_threat("l1", x, -1.0, 1.0).eps == pytest.approx(96)
    assert unconstrained_threat("l0", x).eps == 48
    assert unconstrained_threat("l2", x, -math.inf, math.inf).eps == 1e300


def test_misuse_is_a_clear_error() -> None:
    model, x, y = interior_batch("l2", n=2)
    with pytest.raises(ConfigError, match="not a minimum-norm attack"):
        robustlab.minimum_norm(model, x, y, "l2", method="pgd")
    with pytest.raises(ConfigError, match="early_stop"):
        robustlab.minimum_norm(model, x, y, "l2", method="fmn", early_stop=True)
    with pytest.raises(ConfigError, match="does not support the l1 norm"):
        robustlab.minimum_norm(model, x, y, "l1", method="ddn")
    with pytest.raises(ConfigError, match="eta"):
        robustlab.minimum_norm(model, x, y, "l2", method="fab", eta=0.5)
    with pytest.raises(ConfigError, match="l0"):
        robustlab.attack(model, x, y, ThreatModel("l0", 3), method="fab")


# -------------------------------------------------------------------------------------------- evaluate()
def test_evaluate_reports_the_minimum_norm_curve() -> None:
    model, x, y = interior_batch("l2", n=12)
    result = robustlab.evaluate(  # (the diagnostics' DLR checks need 3 classes; this model has 2)
        model, (x, y), ThreatModel("l2", 0.255), "quick", progress=False, diagnostics=False,
        minimum_norm=("fmn", {"steps": 200}),
    )  # fmt: skip
    smallest = result.minimum_norm
    assert smallest is not None and smallest.method == "fmn" and smallest.attacked == 12
    w = (model.weight[1] - model.weight[0]).detach()
    exact = ((x @ w + (model.bias[1] - model.bias[0]).detach()).abs() / w.norm()).float()
    assert torch.allclose(smallest.distance.float(), exact, atol=1e-3)
    assert smallest.median_distance == pytest.approx(float(exact.sort().values[5]), abs=1e-3)
    summary = result.summary()["minimum_norm"]
    assert summary["method"] == "fmn" and summary["robust_accuracy_at_eps"] == pytest.approx(
        float((exact > 0.255).float().mean())
    )
    # The curve over eps (0 to 2 eps) from the same run: the grid's points lie 1e-3 or more from every distance.
    grid, robust = summary["curve"]["eps"], summary["curve"]["robust"]
    assert grid[0] == 0 and grid[-1] == pytest.approx(0.51) and len(set(robust)) >= 4
    assert robust == pytest.approx([float((exact > eps).float().mean()) for eps in grid])


def test_evaluate_refuses_a_bad_minimum_norm_request_before_attacking(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = interior_batch("l2", n=2)

    def no_cascade(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cascade ran before the request was checked")

    monkeypatch.setattr("robustlab.evaluation.cascade.Cascade.start", no_cascade)
    requests: list[tuple[str | tuple[str, dict[str, Any]], str]] = [
        ("pgd", "not a minimum-norm attack"),
        ("ddn", "does not minimize the l1"),
        (("fmn", {"bogus": 1}), "unknown option"),
    ]
    for request, message in requests:
        with pytest.raises(ConfigError, match=message):
            norm = "l1" if request == "ddn" else "l2"
            robustlab.evaluate(model, (x, y), ThreatModel(norm, 0.3), "quick", progress=False, minimum_norm=request)


def test_evaluate_in_l0_with_fmn() -> None:
    """l0 has no random start or APGD: the diagnostics probe it with an l1 ball and check a large eps with FMN."""
    model, x, y = boxed_batch()
    exact = binary_minimum(model, x, "l0")
    eps = float(np.median(exact))
    result = robustlab.evaluate(
        model, (x, y), ThreatModel("l0", eps), robustlab.Suite.custom([("fmn", {"steps": 300})]), progress=False,
        diagnostics=True,
    )  # fmt: skip
    assert {d.name for d in result.diagnostics} >= {"gradients", "large_eps"}
    assert torch.equal(result.broken, torch.as_tensor(exact <= eps))


def test_line_search_brings_a_far_adversarial_point_to_the_boundary_along_its_segment() -> None:
    """A point twice as far as needed along the normal: 20 bisection steps leave it at the closed-form distance
    (to 2^-20 of the segment), still adversarial; an attack's own line search never lengthens what it found."""
    model, x, y = interior_batch("l2")
    exact = torch.from_numpy(closed_form(model, x, "l2"))
    w = (model.weight[1] - model.weight[0]).detach()
    away = torch.where(y == 0, 1.0, -1.0).to(x.dtype)[:, None] * w / w.norm()
    threat = unconstrained_threat("l2", x)
    record = SmallestAdversarial(x, threat)
    far = x + 2 * exact[:, None] * away
    assert bool((model(far).argmax(1) != y).all())
    record.offer(far, torch.ones(len(x), dtype=torch.bool))
    oracle = GradientOracle(model).bind(len(x), x.device)
    record.shrink_along_segment(oracle, Goal(y), 20)
    assert torch.allclose(record.distance, exact, rtol=1e-5)
    assert bool((model(record.point).argmax(1) != y).all())
    plain = robustlab.minimum_norm(model, x, y, "l2", method="ddn", seed=0, line_search=0).distance
    searched = robustlab.minimum_norm(model, x, y, "l2", method="ddn", seed=0).distance
    assert bool((searched <= plain).all()) and float(searched.sum()) < float(plain.sum())
