"""Zeroth-order estimators: expectation and variance against their formulas, exactness of CGE, one-batch probing,
and exact per-example query accounting through a score oracle.

The statistical tests draw many independent estimates at once (one batch of identical rows), with fixed seeds, and
compare the sample mean (of each coordinate, and of the squared error) with the formula within 5 standard errors
estimated from the same sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from robustlab import ConfigError, InvalidInputError, QueryBudgetExceeded, ScoreOracle
from robustlab.goals import Goal
from robustlab.losses import attack_loss
from robustlab.oracles import module_function
from robustlab.zeroth_order import (
    CGE,
    RGE,
    ScoreObjective,
    cge,
    estimate_gradient,
    estimate_with_oracle,
    log_probabilities,
    rge,
)

DTYPE = torch.float64
SAMPLES = 20_000  # independent estimates per statistical test


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small tensors: intra-op threads only add scheduling overhead on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _within(sample: torch.Tensor, expected: torch.Tensor | float, z: float = 5.0) -> None:
    """The mean of ``sample`` (over dim 0) is within ``z`` standard errors of ``expected``, coordinate-wise."""
    mean = sample.mean(dim=0)
    se = sample.std(dim=0) / math.sqrt(sample.shape[0])
    gap = (mean - expected).abs()
    assert bool((gap <= z * se + 1e-12).all()), f"mean {mean} vs expected {expected} (se {se})"


def _linear(a: torch.Tensor):
    def f(points: torch.Tensor) -> torch.Tensor:
        return points.reshape(points.shape[0], -1) @ a.reshape(-1)

    return f


def _isotropic_quadratic(lam: float, b: torch.Tensor):
    """f(x) = lam / 2 ||x||^2 + b.x, gradient lam x + b."""

    def f(points: torch.Tensor) -> torch.Tensor:
        flat = points.reshape(points.shape[0], -1)
        return 0.5 * lam * (flat**2).sum(1) + flat @ b.reshape(-1)

    return f


def _repeat(x0: torch.Tensor, n: int) -> torch.Tensor:
    return x0.expand(n, *x0.shape[1:]).clone()


@pytest.mark.parametrize("directions", ["sphere", "gaussian"])
@pytest.mark.parametrize("difference", ["forward", "symmetric"])
def test_rge_on_a_linear_function_is_unbiased_with_the_formula_variance(directions, difference) -> None:
    g = torch.Generator().manual_seed(0)
    d, q = 12, 3
    a = torch.randn(d, generator=g, dtype=DTYPE)
    x = _repeat(torch.rand(1, 3, 4, generator=g, dtype=DTYPE), SAMPLES)
    est = estimate_gradient(_linear(a), x, RGE(q=q, mu=0.01, directions=directions, difference=difference), generator=g)
    grads = est.grad.reshape(SAMPLES, d)
    _within(grads, a)
    # E||g - a||^2 = (d - 1)||a||^2 / q on the unit sphere, (d + 1)||a||^2 / q for Gaussian directions.
    factor = d - 1 if directions == "sphere" else d + 1
    expected = factor * float(a @ a) / q
    _within(((grads - a) ** 2).sum(1, keepdim=True), expected)


@pytest.mark.parametrize("directions", ["sphere", "gaussian"])
def test_rge_variance_formula_is_sharp(directions) -> None:
    """The squared-error formula is not just an upper bound: halving or doubling it fails the same test."""
    g = torch.Generator().manual_seed(1)
    d, q = 6, 2
    a = torch.randn(d, generator=g, dtype=DTYPE)
    x = _repeat(torch.rand(1, d, generator=g, dtype=DTYPE), SAMPLES)
    grads = rge(_linear(a), x, q=q, mu=0.1, directions=directions, generator=g)
    error = ((grads - a) ** 2).sum(1)
    factor = d - 1 if directions == "sphere" else d + 1
    expected = factor * float(a @ a) / q
    se = float(error.std()) / math.sqrt(SAMPLES)
    assert abs(float(error.mean()) - expected) < 5 * se
    assert abs(float(error.mean()) - 1.5 * expected) > 5 * se


@pytest.mark.parametrize("directions", ["sphere", "gaussian"])
def test_rge_on_a_quadratic_forward_and_symmetric(directions) -> None:
    """Symmetric differences are exact on a quadratic's linear part; forward ones add mu * lam / 2 * ||u||^2 * u."""
    g = torch.Generator().manual_seed(2)
    d, q, lam, mu = 8, 2, 2.0, 0.5
    b = torch.randn(d, generator=g, dtype=DTYPE)
    x0 = torch.rand(1, d, generator=g, dtype=DTYPE)
    a = lam * x0[0] + b
    x = _repeat(x0, SAMPLES)
    f = _isotropic_quadratic(lam, b)
    base = (d - 1 if directions == "sphere" else d + 1) * float(a @ a) / q
    for difference in ("symmetric", "forward"):
        grads = rge(f, x, q=q, mu=mu, directions=directions, difference=difference, generator=g)
        _within(grads, a)
        extra = 0.0
        if difference == "forward":
            # sphere: ||d * mu lam / 2 * u||^2 = d^2 mu^2 lam^2 / 4; Gaussian: mu^2 lam^2 / 4 * E||u||^6.
            extra = (d**2 if directions == "sphere" else d * (d + 2) * (d + 4)) * (mu * lam) ** 2 / 4 / q
        _within(((grads - a) ** 2).sum(1, keepdim=True), base + extra)


def test_rge_unbiased_on_a_general_quadratic() -> None:
    g = torch.Generator().manual_seed(3)
    d = 5
    m = torch.randn(d, d, generator=g, dtype=DTYPE)
    hessian = m @ m.T
    b = torch.randn(d, generator=g, dtype=DTYPE)
    x0 = torch.randn(1, d, generator=g, dtype=DTYPE)

    def f(p: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((p @ hessian) * p).sum(1) + p @ b

    x = _repeat(x0, SAMPLES)
    for difference in ("forward", "symmetric"):
        _within(rge(f, x, q=4, mu=0.3, difference=difference, generator=g), hessian @ x0[0] + b)


def test_cge_is_exact_on_linear_and_quadratic_functions() -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 3, 3, generator=g, dtype=DTYPE)
    x = torch.rand(4, 2, 3, 3, generator=g, dtype=DTYPE)
    grad = cge(_linear(a), x, mu=0.01)
    assert torch.allclose(grad, a.expand_as(x), atol=1e-10, rtol=0)
    m = torch.randn(18, 18, generator=g, dtype=DTYPE)
    hessian = m + m.T

    def quadratic(p: torch.Tensor) -> torch.Tensor:
        flat = p.reshape(p.shape[0], -1)
        return 0.5 * ((flat @ hessian) * flat).sum(1)

    expected = (x.reshape(4, -1) @ hessian).reshape(x.shape)
    assert torch.allclose(cge(quadratic, x, mu=0.3), expected, atol=1e-9, rtol=0)


def test_cge_over_a_subset_of_coordinates() -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(10, generator=g, dtype=DTYPE)
    x = torch.rand(3, 10, generator=g, dtype=DTYPE)
    shared = torch.tensor([1, 4, 7])
    grad = cge(_linear(a), x, coordinates=shared)
    expected = torch.zeros_like(x)
    expected[:, shared] = a[shared]
    assert torch.allclose(grad, expected, atol=1e-10, rtol=0)
    per_example = torch.tensor([[0, 1], [2, 3], [9, 5]])
    grad = cge(_linear(a), x, coordinates=per_example)
    for i in range(3):
        assert torch.allclose(grad[i, per_example[i]], a[per_example[i]], atol=1e-10)
        assert int((grad[i] != 0).sum()) == 2
    calls: list[int] = []

    def counted(p: torch.Tensor) -> torch.Tensor:
        calls.append(p.shape[0])
        return _linear(a)(p)

    est = estimate_gradient(counted, x, CGE(mu=0.01, subset=4), generator=g)
    assert calls == [3 * 8]  # one call, 2 * 4 probes per example
    assert (est.grad != 0).sum(1).tolist() == [4, 4, 4]
    nonzero = est.grad != 0
    assert torch.allclose(est.grad[nonzero], a.expand_as(x)[nonzero], atol=1e-10)
    with pytest.raises(InvalidInputError, match="coordinates must lie"):
        cge(_linear(a), x, coordinates=torch.tensor([10]))


@pytest.mark.parametrize(
    "estimator",
    [RGE(q=3), RGE(q=3, difference="forward"), RGE(q=2, directions="gaussian"), CGE(), CGE(subset=2)],
    ids=["rge-sym", "rge-fwd", "rge-gauss", "cge", "cge-subset"],
)
@pytest.mark.parametrize("center", [False, True])
def test_one_call_with_the_documented_layout(estimator, center) -> None:
    """All probes go to f in one call; example i owns rows i*k .. (i+1)*k - 1; center rows are x itself."""
    x = torch.rand(4, 2, 3, dtype=DTYPE)
    k = estimator.queries_per_example(6, center=center)
    seen: list[torch.Tensor] = []

    def f(points: torch.Tensor) -> torch.Tensor:
        seen.append(points)
        return points.reshape(points.shape[0], -1).sum(1)

    est = estimate_gradient(f, x, estimator, generator=torch.Generator().manual_seed(0), center=center)
    assert len(seen) == 1 and seen[0].shape == (4 * k, 2, 3)
    blocks = seen[0].reshape(4, k, 6)
    distance = (blocks - x.reshape(4, 1, 6)).norm(dim=2)
    assert float(distance.max()) < 1.0, "a probe is attributed to the wrong example"
    if center or (isinstance(estimator, RGE) and estimator.difference == "forward"):
        assert torch.equal(blocks[:, 0], x.reshape(4, 6))
        assert est.value is not None and torch.allclose(est.value, x.reshape(4, -1).sum(1))
    else:
        assert est.value is None
    assert est.values.shape == (4, k)


def test_bad_options_and_bad_functions() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="q"):
            RGE(q=bad)  # type: ignore[arg-type]
    for bad_mu in (0.0, -0.1, math.nan, math.inf):
        with pytest.raises(ConfigError, match="mu"):
            RGE(mu=bad_mu)
        with pytest.raises(ConfigError, match="mu"):
            CGE(mu=bad_mu)
    with pytest.raises(ConfigError, match="directions"):
        RGE(directions="cube")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="difference"):
        RGE(difference="central")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="subset"):
        CGE(subset=0)
    x = torch.rand(2, 3)
    with pytest.raises(InvalidInputError, match="one value per probe"):
        estimate_gradient(lambda p: p, x, RGE(q=2))
    with pytest.raises(InvalidInputError, match="NaN"):
        estimate_gradient(lambda p: torch.full((p.shape[0],), math.nan), x, RGE(q=2))
    with pytest.raises(InvalidInputError, match="floating-point batch"):
        estimate_gradient(lambda p: p.sum(1), torch.ones(3), RGE(q=2))


class CountingModel(nn.Module):
    """Logits of a fixed linear map; records each call's batch size."""

    def __init__(self, features: int, classes: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(features, classes).double()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        return self.linear(x.reshape(x.shape[0], -1))


def test_estimate_with_oracle_charges_each_example_exactly_in_one_call() -> None:
    model = CountingModel(6)
    oracle = ScoreOracle(module_function(model), budget=100).bind(3, torch.device("cpu"))
    goal = Goal(torch.tensor([0, 1, 2]))
    objective = ScoreObjective(attack_loss("ce"), goal)
    x = torch.rand(2, 6, dtype=DTYPE)
    index = torch.tensor([2, 0])  # row 0 belongs to example 2, row 1 to example 0
    estimator = RGE(q=5)
    est = estimate_with_oracle(
        oracle, x, estimator, objective, index=index, generator=torch.Generator().manual_seed(0), center=True
    )
    assert model.calls == [2 * 11]
    assert oracle.queries.tolist() == [11, 0, 11]
    assert est.center_scores is not None and est.value is not None
    with torch.no_grad():
        logits = model.linear(x)
    assert torch.allclose(est.center_scores, logits)
    expected = attack_loss("ce")(torch.log_softmax(logits, 1), Goal(torch.tensor([2, 0])))
    assert torch.allclose(est.value, expected)
    # A call some example cannot afford is refused before the model sees anything.
    before = list(model.calls)
    small = ScoreOracle(module_function(model), budget=9).bind(1, torch.device("cpu"))
    with pytest.raises(QueryBudgetExceeded):
        estimate_with_oracle(small, x[:1], estimator, objective)
    assert model.calls == before and small.queries.tolist() == [0]


def test_a_known_value_replaces_the_query_at_x_and_changes_nothing_else() -> None:
    goal = Goal(torch.tensor([0, 1, 2]))
    objective = ScoreObjective(attack_loss("ce"), goal)
    x = torch.rand(3, 6, dtype=DTYPE)
    estimator = RGE(q=5, difference="forward")
    runs = []
    model = CountingModel(6)
    for reuse in (False, True):
        model.calls = []
        oracle = ScoreOracle(module_function(model)).bind(3, torch.device("cpu"))
        with torch.no_grad():
            value = objective(torch.log_softmax(model.linear(x), 1), torch.arange(3))
        est = estimate_with_oracle(
            oracle, x, estimator, objective, generator=torch.Generator().manual_seed(0),
            known_value=value if reuse else None,
        )  # fmt: skip
        runs.append((est, oracle.queries.tolist(), model.calls))
    (plain, plain_queries, plain_calls), (reused, reused_queries, reused_calls) = runs
    assert plain_queries == [6, 6, 6] and reused_queries == [5, 5, 5]
    assert plain_calls == [18] and reused_calls == [15]
    assert torch.allclose(plain.grad, reused.grad, atol=1e-12)
    assert torch.allclose(plain.values, reused.values, atol=1e-12)
    # A symmetric estimator never queries x: a known value is simply not needed.
    model = CountingModel(6)
    oracle = ScoreOracle(module_function(model)).bind(3, torch.device("cpu"))
    estimate_with_oracle(oracle, x, RGE(q=5), objective, known_value=torch.zeros(3, dtype=DTYPE))
    assert oracle.queries.tolist() == [10, 10, 10]


def test_estimate_with_oracle_matches_the_true_gradient_of_a_linear_objective_through_a_decoder() -> None:
    """Estimating at a latent code: CGE through ``decode`` recovers the chain-rule gradient exactly."""
    model = CountingModel(6, classes=3)
    oracle = ScoreOracle(module_function(model)).bind(2, torch.device("cpu"))
    decoder = torch.randn(4, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))

    def objective(scores: torch.Tensor, examples: torch.Tensor) -> torch.Tensor:
        return scores[:, 0] - scores[:, 1]  # linear in the scores, hence in z

    z = torch.rand(2, 4, dtype=DTYPE)
    est = estimate_with_oracle(oracle, z, CGE(mu=0.1), objective, decode=lambda p: p @ decoder)
    weight = model.linear.weight.detach()
    true = decoder @ (weight[0] - weight[1])
    assert torch.allclose(est.grad, true.expand(2, 4), atol=1e-9)
    assert oracle.queries.tolist() == [8, 8]


def test_losses_are_the_same_for_logits_and_probabilities() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 4, generator=g, dtype=DTYPE)
    probabilities = torch.softmax(logits, dim=1)
    assert torch.allclose(log_probabilities(logits, False), log_probabilities(probabilities, True))
    goal = Goal(torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 2, 3, 0, 2]))
    rows = torch.arange(5)
    for name in ("ce", "margin"):
        from_logits = ScoreObjective(attack_loss(name), goal)(logits, rows)
        from_probabilities = ScoreObjective(attack_loss(name), goal)(probabilities, rows)
        assert torch.allclose(from_logits, from_probabilities)
    margin = ScoreObjective(attack_loss("margin"), Goal(goal.labels))(logits, rows)
    assert torch.allclose(margin, attack_loss("margin")(logits, Goal(goal.labels)))
