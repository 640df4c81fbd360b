"""Local Lipschitz estimates and Hessian eigenvalues against closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab import ThreatModel
from robustlab.analysis.hessian import (
    PowerConfig,
    input_hessian_eigenvalue,
    top_input_eigenvalue,
    top_weight_eigenvalue,
    weight_hessian_eigenvalue,
)
from robustlab.analysis.lipschitz import LipschitzConfig, global_lipschitz_bound, local_lipschitz, operator_norm
from robustlab.errors import ConfigError, InvalidInputError

FAST = LipschitzConfig(ascent_steps=5, clever_batches=5, clever_batch_size=8)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_linear_model_constant_is_the_dual_norm_of_the_weight_difference(norm: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    x = torch.rand(6, 3, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    threat = ThreatModel(norm, 0.1)
    result = local_lipschitz(model, x, y, threat, FAST)
    weight = model.get_submodule("1").get_parameter("weight").detach()
    exact = torch.linalg.vector_norm(weight[y] - weight[result.target], ord=threat.norm.dual, dim=1)
    assert torch.allclose(result.ascent, exact, rtol=1e-9)
    assert torch.allclose(result.clever, exact, rtol=1e-9)
    assert result.global_bound is not None and torch.allclose(result.global_bound, exact, rtol=1e-9)
    assert (result.target != y).all()


def test_explicit_targets_are_used() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    y, t = torch.tensor([0, 1]), torch.tensor([2, 2])
    result = local_lipschitz(model, x, y, ThreatModel("l2", 0.1), FAST, target=t)
    weight = model.get_submodule("1").get_parameter("weight").detach()
    assert torch.allclose(result.ascent, (weight[y] - weight[t]).norm(dim=1))


def test_relu_network_lower_estimate_below_global_bound_and_exact_gradients_attained() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 5)
    ).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    threat = ThreatModel("l2", 0.3)
    result = local_lipschitz(model, x, y, threat, FAST)
    assert result.global_bound is not None
    assert (result.ascent <= result.global_bound * (1 + 1e-9)).all()
    # The ascent starts at the clean point, so it is at least the clean gradient's norm.
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    g = logits.gather(1, y[:, None]) - logits.gather(1, result.target[:, None])
    (grad,) = torch.autograd.grad(g.sum(), xg)
    assert (result.ascent >= grad.reshape(4, -1).norm(dim=1) - 1e-9).all()


def test_conv_operator_norm_by_power_iteration_matches_the_dense_matrix() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    shape = (1, 2, 5, 5)
    dense = torch.autograd.functional.jacobian(
        lambda v: conv(v.reshape(shape)).flatten() - conv(torch.zeros(shape, dtype=torch.float64)).flatten(),
        torch.zeros(50, dtype=torch.float64),
    )
    exact = float(torch.linalg.matrix_norm(dense, ord=2))

    def apply(v: torch.Tensor) -> torch.Tensor:
        return conv(v) - conv(torch.zeros_like(v))

    estimate = operator_norm(apply, shape, iterations=500, dtype=torch.float64, device="cpu")
    assert estimate == pytest.approx(exact, rel=1e-6)


def test_global_bound_of_two_layer_net_is_an_upper_bound_of_sampled_gradients() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.rand(3, 8, dtype=torch.float64)
    y, t = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    for norm in ("linf", "l2", "l1"):
        threat = ThreatModel(norm, 1.0)
        bound = global_lipschitz_bound(model, x, y, t, threat)
        points = torch.rand(200, 8, dtype=torch.float64).requires_grad_(True)
        logits = model(points)
        for k in range(3):
            (grad,) = torch.autograd.grad((logits[:, y[k]] - logits[:, t[k]]).sum(), points, retain_graph=True)
            assert float(torch.linalg.vector_norm(grad, ord=threat.norm.dual, dim=1).max()) <= float(bound[k])


def test_bad_inputs_are_named() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(InvalidInputError):
        local_lipschitz(model, x + 2, torch.tensor([0, 1]), ThreatModel("l2", 0.1), FAST)
    with pytest.raises(ConfigError):
        local_lipschitz(model, x, torch.tensor([0, 1]), ThreatModel("l0", 2), FAST)
    with pytest.raises(ConfigError):
        LipschitzConfig(clever_batches=1).validate()


def test_quadratic_input_hessian_top_eigenvalue() -> None:
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    a = a @ a.T
    exact = float(torch.linalg.eigvalsh(a)[-1])
    result = top_input_eigenvalue(
        lambda x: 0.5 * torch.einsum("ni,ij,nj->n", x, a, x), torch.randn(3, 6, dtype=torch.float64),
        PowerConfig(iterations=500, tol=1e-9),
    )  # fmt: skip
    assert torch.allclose(result.eigenvalue, torch.full((3,), exact, dtype=torch.float64), atol=1e-3)
    assert result.converged.all()


def test_negative_curvature_keeps_its_sign() -> None:
    a = torch.diag(torch.tensor([-5.0, 1.0, 2.0], dtype=torch.float64))
    result = top_input_eigenvalue(
        lambda x: 0.5 * torch.einsum("ni,ij,nj->n", x, a, x), torch.ones(1, 3, dtype=torch.float64),
        PowerConfig(iterations=500, tol=1e-10),
    )  # fmt: skip
    assert float(result.eigenvalue[0]) == pytest.approx(-5.0, abs=1e-3)


def test_quadratic_weight_hessian_top_eigenvalue() -> None:
    torch.manual_seed(1)
    a = torch.randn(5, 5, dtype=torch.float64)
    a = a @ a.T

    class Quadratic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.theta = nn.Parameter(torch.randn(5, dtype=torch.float64))

    def loss(model: nn.Module, batch: tuple[torch.Tensor]) -> torch.Tensor:
        theta = model.get_parameter("theta")
        return 0.5 * len(batch[0]) * (theta @ a @ theta)  # summed over the batch's examples

    result = top_weight_eigenvalue(Quadratic(), loss, lambda: [(torch.zeros(3),), (torch.zeros(2),)],
                                   PowerConfig(iterations=500, tol=1e-9))  # fmt: skip
    assert float(result.eigenvalue[0]) == pytest.approx(float(torch.linalg.eigvalsh(a)[-1]), abs=1e-3)


def test_cross_entropy_hessians_on_a_relu_net() -> None:
    """Input Hessian of CE on a ReLU net: J^T (diag p - p p^T) J on the example's linear region."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.rand(2, 6, dtype=torch.float64)
    y = torch.tensor([0, 2])
    result = input_hessian_eigenvalue(model, x, y, PowerConfig(iterations=1000, tol=1e-12))
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], x[i])
        p = torch.softmax(model(x[i : i + 1])[0], 0).detach()
        hessian = jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
        assert float(result.eigenvalue[i]) == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-3)
    weights = weight_hessian_eigenvalue(model, lambda: [(x, y)], PowerConfig(iterations=300, tol=1e-8))
    assert float(weights.eigenvalue[0]) > 0
