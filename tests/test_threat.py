"""The threat model: projections checked inside, on and outside the ball, against independent solvers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustlab import ConfigError, InvalidInputError, Norm, ThreatModel


def project_l1_ball_duchi(v: np.ndarray, eps: float) -> np.ndarray:
    """Duchi et al. 2008 sort-based projection onto the l1 ball (an independent reference)."""
    if np.abs(v).sum() <= eps:
        return v.copy()
    u = np.sort(np.abs(v))[::-1]
    css = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, len(u) + 1) > (css - eps))[0][-1]
    theta = (css[rho] - eps) / (rho + 1.0)
    return np.sign(v) * np.maximum(np.abs(v) - theta, 0)


def project_l2_ball(v: np.ndarray, eps: float) -> np.ndarray:
    n = np.linalg.norm(v)
    return v if n <= eps else v * (eps / n)


def dykstra(y: np.ndarray, ball, lo: np.ndarray, hi: np.ndarray, iters: int = 20000) -> np.ndarray:
    """Dykstra's alternating projections: converges to the exact projection onto ball ∩ box."""
    x = y.copy()
    p = np.zeros_like(y)
    q = np.zeros_like(y)
    for _ in range(iters):
        z = ball(x + p)
        p = x + p - z
        x_new = np.clip(z + q, lo, hi)
        q_new = z + q - x_new
        # Stop only when the iterate and both correction terms have settled: x alone can stall early.
        if max(np.abs(x_new - x).max(), np.abs(q_new - q).max(), np.abs(z - x_new).max()) < 1e-14:
            x, q = x_new, q_new
            break
        x, q = x_new, q_new
    return x


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("seed", range(6))
def test_projection_matches_dykstra(norm: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = 7
    x = rng.uniform(0, 1, size=d)
    y = x + rng.normal(0, 0.8, size=d)
    eps = float(rng.uniform(0.1, 1.5))
    threat = ThreatModel(norm, eps)
    ball = (lambda v: project_l2_ball(v, eps)) if norm == "l2" else (lambda v: project_l1_ball_duchi(v, eps))
    expected = x + dykstra(y - x, ball, -x, 1 - x)
    got = threat.project(torch.tensor(y)[None], torch.tensor(x)[None])[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-8)


def test_linf_projection_is_clamp_to_intersection() -> None:
    x = torch.tensor([[0.05, 0.5, 0.95]], dtype=torch.float64)
    y = torch.tensor([[-1.0, 0.55, 2.0]], dtype=torch.float64)
    got = ThreatModel("linf", 0.1).project(y, x)
    assert torch.allclose(got, torch.tensor([[0.0, 0.55, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_points_inside_are_fixed_and_on_the_sphere_stay(norm: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64) * 0.5 + 0.25
    threat = ThreatModel(norm, 0.2)
    inside = threat.project(x + 0.01 * (torch.rand(x.shape, generator=g, dtype=x.dtype) - 0.5) / 48, x)
    assert torch.equal(threat.project(inside, x), inside)
    direction = torch.randn(x.shape, generator=g, dtype=x.dtype)
    on_sphere = x + 0.2 * direction / threat.distance(x + direction, x).reshape(-1, 1, 1, 1)
    assert torch.allclose(threat.distance(on_sphere, x), torch.full((5,), 0.2, dtype=x.dtype))
    assert torch.allclose(threat.project(on_sphere, x), on_sphere, atol=1e-12)


def test_l2_outside_ball_without_box_is_radial_scaling() -> None:
    x = torch.zeros(1, 4, dtype=torch.float64)
    y = torch.tensor([[3.0, 4.0, 0.0, 0.0]], dtype=torch.float64)
    got = ThreatModel("l2", 1.0, -math.inf, math.inf).project(y, x)
    assert torch.allclose(got, torch.tensor([[0.6, 0.8, 0.0, 0.0]], dtype=torch.float64))


def test_l1_known_projection() -> None:
    # Soft-thresholding at 1.5 maps (3, 1, -2) to (1.5, 0, -0.5): l1 norm 2.
    x = torch.zeros(1, 3, dtype=torch.float64)
    y = torch.tensor([[3.0, 1.0, -2.0]], dtype=torch.float64)
    got = ThreatModel("l1", 2.0, -math.inf, math.inf).project(y, x)
    assert torch.allclose(got, torch.tensor([[1.5, 0.0, -0.5]], dtype=torch.float64))


def _feasible_samples(threat: ThreatModel, x: torch.Tensor, count: int, g: torch.Generator) -> torch.Tensor:
    starts = [threat.random_start(x, g) for _ in range(count)]
    return torch.stack(starts)


@settings(max_examples=60, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2", "l1"]),
    dims=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    batch=st.integers(1, 4),
    eps=st.floats(1e-3, 3.0),
    scale=st.floats(0.0, 5.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_projection_properties(norm, dims, batch, eps, scale, dtype, seed) -> None:
    """Feasible, idempotent and nearest (variational inequality against feasible points), any shape/dtype."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *dims)
    x = torch.rand(shape, generator=g, dtype=dtype)
    y = x + scale * torch.randn(shape, generator=g, dtype=dtype)
    threat = ThreatModel(norm, eps)
    p = threat.project(y, x)
    assert p.dtype == dtype and p.shape == x.shape
    assert bool(threat.contains(p, x).all())
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert torch.allclose(threat.project(p, x), p, atol=tol * max(1.0, eps))
    # Nearest point of a convex set: <y - p, z - p> <= 0 for every feasible z.
    z = _feasible_samples(threat, x, 16, g)
    inner = ((y - p).unsqueeze(0) * (z - p.unsqueeze(0))).reshape(16, batch, -1).sum(-1)
    assert bool((inner <= tol * (1 + scale) * (1 + eps)).all())


@settings(max_examples=30, deadline=None)
@given(norm=st.sampled_from(["linf", "l2", "l1"]), eps=st.floats(1e-3, 2.0), seed=st.integers(0, 2**16))
def test_random_start_inside(norm, eps, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 2, 3, 3, generator=g)
    threat = ThreatModel(norm, eps)
    assert bool(threat.contains(threat.random_start(x, g), x).all())


def test_random_start_is_uniform_in_linf_ball() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.full((20000, 1), 0.5)
    delta = ThreatModel("linf", 0.2).random_start(x, g) - x
    assert abs(float(delta.mean())) < 0.005
    assert abs(float(delta.var()) - 0.2**2 / 3) < 0.001  # variance of U(-eps, eps)


def test_lmo_maximizes_inner_product() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(4, 10, dtype=torch.float64)
    d = torch.randn(4, 10, generator=g, dtype=torch.float64)
    for norm, dual in [("linf", 1), ("l2", 2), ("l1", math.inf)]:
        threat = ThreatModel(norm, 0.5, -math.inf, math.inf)
        v = threat.lmo(d, x)
        value = (v * d).sum(dim=1)
        # max over the ball of <v, d> = eps * ||d||_dual
        assert torch.allclose(value, 0.5 * d.norm(p=dual, dim=1))
        assert torch.allclose(threat.distance(v, x), torch.full((4,), 0.5, dtype=torch.float64))


def test_steepest_ascent_unit_norm() -> None:
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(3, 50, generator=g)
    for norm in ["linf", "l2", "l1"]:
        threat = ThreatModel(norm, 1.0)
        direction = threat.steepest_ascent(grad)
        assert torch.allclose(threat.distance(direction, torch.zeros_like(direction)), torch.ones(3))
        assert bool(((direction * grad).sum(dim=1) > 0).all())


def test_distances() -> None:
    x = torch.zeros(1, 2, 2)
    x_adv = torch.tensor([[[0.3, -0.4], [0.0, 0.0]]])
    assert float(ThreatModel("linf", 1).distance(x_adv, x)) == pytest.approx(0.4)
    assert float(ThreatModel("l2", 1).distance(x_adv, x)) == pytest.approx(0.5)
    assert float(ThreatModel("l1", 1).distance(x_adv, x)) == pytest.approx(0.7)


@pytest.mark.parametrize("eps", [0, -0.1, math.nan, math.inf, "abc"])
def test_bad_eps(eps) -> None:
    with pytest.raises(ConfigError, match="eps"):
        ThreatModel("linf", eps)


def test_bad_norm_and_bounds() -> None:
    with pytest.raises(ConfigError, match="unknown norm 'l3'"):
        ThreatModel("l3", 0.1)
    with pytest.raises(ConfigError, match="lower < upper"):
        ThreatModel("linf", 0.1, 1.0, 0.0)
    assert ThreatModel("Linf", 0.1).norm is Norm.LINF
    assert ThreatModel("L-2", 0.1).norm is Norm.L2


def test_check_inputs() -> None:
    threat = ThreatModel("linf", 0.1)
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        threat.check_inputs(torch.tensor([[0.1, math.nan]]))
    with pytest.raises(InvalidInputError, match="outside the threat model's input bounds"):
        threat.check_inputs(torch.tensor([[0.1, 255.0]]))
    with pytest.raises(InvalidInputError, match="floating-point"):
        threat.check_inputs(torch.tensor([[1, 2]]))
    with pytest.raises(InvalidInputError, match="batch"):
        threat.check_inputs(torch.rand(5))
    threat.check_inputs(torch.rand(2, 3))


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("seed", range(4))
def test_projection_beats_a_brute_force_grid_in_2d(norm: str, seed: int) -> None:
    """In two dimensions, no feasible point on a fine grid is nearer than the projection."""
    rng = np.random.default_rng(100 + seed)
    x = rng.uniform(0, 1, size=2)
    y = x + rng.normal(0, 0.7, size=2)
    eps = float(rng.uniform(0.1, 0.8))
    threat = ThreatModel(norm, eps)
    p = threat.project(torch.tensor(y)[None], torch.tensor(x)[None])[0].numpy()
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 801), np.linspace(0, 1, 801)), -1).reshape(-1, 2)
    order = 1 if norm == "l1" else 2
    feasible = grid[np.linalg.norm(grid - x, ord=order, axis=1) <= eps]
    best = np.min(np.linalg.norm(feasible - y, axis=1))
    assert np.linalg.norm(p - y) <= best + 1e-12
    assert np.linalg.norm(p - y) >= best - 2e-3  # the grid spacing bounds how much nearer the exact point is
