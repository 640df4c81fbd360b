"""PGD, FGSM, MI-FGSM and CW-PGD against closed-form answers on linear classifiers."""

from __future__ import annotations

import math

import pytest
import torch

import robustlab
from robustlab import ThreatModel
from tests.toys import LinearClassifier, binary_linear, tiny_cnn


def minimal_distance(model, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Distance to the boundary w.x + b = 0 of a binary linear model: |w.x + b| / ||w||_dual."""
    w = model.weight[1] - model.weight[0]
    margin = x.reshape(x.shape[0], -1) @ w + (model.bias[1] - model.bias[0])
    dual = {"linf": 1, "l2": 2, "l1": math.inf}[norm]
    return margin.abs().detach() / w.norm(p=dual).detach()


@pytest.mark.parametrize(
    ("method", "norm", "options"),
    [
        ("pgd", "linf", {"steps": 20}),
        ("pgd", "l2", {"steps": 20}),
        ("pgd", "l1", {"steps": 20}),
        ("cw-pgd", "linf", {"steps": 20}),
        ("mi-fgsm", "linf", {"steps": 20}),
        ("mi-fgsm", "l2", {"steps": 20}),
        ("fgsm", "linf", {}),
        ("fgsm", "l2", {}),
    ],
)
def test_linear_model_broken_exactly_when_eps_exceeds_minimal_distance(method, norm, options) -> None:
    dim = 16
    model = binary_linear(dim).eval()
    g = torch.Generator().manual_seed(1)
    x = 0.5 + 0.2 * (torch.rand(200, dim, generator=g, dtype=torch.float64) - 0.5)
    y = model(x).argmax(1)
    d_min = minimal_distance(model, x, norm)
    eps = float(d_min.median())
    # An unbounded box makes the closed form exact.
    threat = ThreatModel(norm, eps, -math.inf, math.inf)
    result = robustlab.attack(model, x, y, threat, method=method, seed=0, **options)
    reachable = d_min < eps / 1.02
    unreachable = d_min > eps * (1 + 1e-9)
    assert bool(result.success[reachable].all()), f"missed {int((~result.success[reachable]).sum())} reachable"
    assert not bool(result.success[unreachable].any()), "claimed success beyond the minimal distance"
    assert bool((result.distance[result.success] >= d_min[result.success] * (1 - 1e-9)).all())


def test_linf_pgd_finds_the_sign_vertex_on_a_linear_model() -> None:
    model = binary_linear(8).eval()
    x = torch.full((1, 8), 0.5, dtype=torch.float64) + 0.01
    y = model(x).argmax(1)
    result = robustlab.attack(model, x, y, ThreatModel("linf", 0.3), steps=10, seed=0, early_stop=False)
    w = (model.weight[1] - model.weight[0]).detach()
    direction = w.sign() if int(y) == 0 else -w.sign()
    assert torch.allclose(result.x_adv, (x + 0.3 * direction).clamp(0, 1))


def test_restarts_keep_the_per_example_worst_case() -> None:
    model = tiny_cnn()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 6, 6, generator=g)
    y = model(x).argmax(1)
    threat = ThreatModel("linf", 0.02)
    singles = [robustlab.attack(model, x, y, threat, steps=5, seed=s).success for s in range(3)]
    combined = robustlab.attack(model, x, y, threat, steps=5, restarts=3, early_stop=True, seed=0)
    # The first restart draws the same start as the seed-0 run, so everything it broke stays broken; later
    # restarts only add examples.
    assert not bool((singles[0] & ~combined.success).any())
    assert int(combined.success.sum()) > int(singles[0].sum())
    assert int(combined.success.sum()) < 64  # the budget is small enough that the test can fail


def test_early_stop_spends_no_gradients_on_broken_examples() -> None:
    model = binary_linear(4).eval()
    x = torch.full((2, 4), 0.5, dtype=torch.float64)
    x[1] += 0.2 * (model.weight[1] - model.weight[0]).detach().sign()  # far from the boundary
    y = torch.tensor([int(model(x[:1]).argmax(1)) ^ 1, int(model(x[1:]).argmax(1))])  # example 0 is misclassified
    result = robustlab.attack(
        model,
        x,
        y,
        ThreatModel("linf", 0.01),
        steps=7,
        restarts=2,
        early_stop=True,
        random_start=False,
        seed=0,
    )
    # Example 0: one gradient evaluation reveals it is already misclassified; example 1 runs 7 steps per restart.
    assert result.gradients is not None
    assert result.gradients.tolist() == [1, 14]
    assert result.success.tolist() == [True, False]
    # queries: the gradients + 1 final check per restart for example 1; the class-count probe (example 0) and
    # the re-check are audits, outside the attack's own count.
    assert result.queries.tolist() == [1, 16]
    assert result.audits.tolist() == [2, 1]
    assert result.extras["iterations"].tolist() == [0, -1]


def test_targeted_reaches_explicit_targets() -> None:
    g = torch.Generator().manual_seed(0)
    model = LinearClassifier(torch.randn(10, 36, generator=g), torch.zeros(10)).eval()
    x = torch.rand(20, 1, 6, 6, generator=g)
    y = model(x).argmax(1)
    targets = robustlab.random_targets(y, 10, g)
    result = robustlab.attack(model, x, y, ThreatModel("linf", 0.5), steps=30, targets=targets, seed=0)
    with torch.no_grad():
        reached = model(result.x_adv).argmax(1) == targets
    assert torch.equal(result.success, reached)
    assert float(reached.float().mean()) > 0.5
    weak = robustlab.attack(model, x, y, ThreatModel("linf", 0.01), steps=30, targets=targets, seed=0)
    assert float(weak.success.float().mean()) < 0.5  # the check above can fail


def test_mode_restored_after_an_exception() -> None:
    model = tiny_cnn().train()

    class Boom(robustlab.attacks.pgd.PGD):
        def _step(self, *args, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), pytest.warns(UserWarning):
        Boom(steps=2).run(model, torch.rand(2, 1, 6, 6), torch.tensor([0, 1]), ThreatModel("linf", 0.1))
    assert all(m.training for m in model.modules())


def test_success_curve_counts_queries_at_success() -> None:
    from robustlab.attacks.base import AttackResult

    result = AttackResult(
        method="x",
        threat=ThreatModel("linf", 0.1),
        targeted=False,
        x_adv=torch.zeros(4, 1),
        success=torch.tensor([True, False, True, True]),
        distance=torch.zeros(4),
        queries=torch.tensor([5, 100, 20, 5]),
        gradients=None,
        audits=torch.ones(4, dtype=torch.long),
        wall_time=1.0,
        config={},
    )
    assert result.success_curve([1, 5, 19, 20, 1000]) == ([1, 5, 19, 20, 1000], [0.0, 0.5, 0.5, 0.75, 0.75])
    assert result.success_curve() == ([5, 20], [0.5, 0.75])
    assert result.summary()["median_queries_successful"] == 5.0
