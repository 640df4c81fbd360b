"""P-RGF (Cheng et al. 2019): the estimator against the true gradient, exact query accounting, budgets, bad input."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import robustlab
from robustlab import ModelError, ScoreOracle, ThreatModel
from robustlab.attacks.prgf import estimate_gradient_norm, free_coordinates, optimal_lambda, prior_guided_estimate
from robustlab.errors import InvalidInputError
from robustlab.oracles import module_function
from tests.toys import tiny_cnn


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Counting(nn.Module):
    """Counts the rows it is asked about."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += int(x.shape[0])
        return self.model(x)


def smooth_mlp(dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, 3)).double().eval()


def test_optimal_lambda_closed_form_and_edges() -> None:
    n, q = 100, 10
    width = n + 2 * q - 2
    alpha = torch.tensor([0.0, 0.5 / math.sqrt(width), 0.2, 0.9, 1.0], dtype=torch.float64)
    lam = optimal_lambda(alpha, n, q)
    assert lam[0] == 0 and lam[1] == 0  # below 1 / sqrt(n + 2q - 2): plain RGF
    a2 = 0.04
    expected = (1 - a2) * (a2 * width - 1) / (2 * a2 * n * q - a2**2 * n * width - 1)  # the paper's form
    assert float(lam[2]) == pytest.approx(expected, rel=1e-12) and 0 < float(lam[2]) < 1
    assert lam[3] == 1 and lam[4] == 1


def test_target_as_its_own_prior_aligns_with_one_query() -> None:
    """The true gradient as prior: alpha ~ 1, lambda = 1, the estimate IS the gradient after one query."""
    model = smooth_mlp(30, 0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 30, generator=g, dtype=torch.float64)

    def f(points: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        return model(points)[:, 0]

    xv = x.clone().requires_grad_(True)
    (true,) = torch.autograd.grad(model(xv)[:, 0].sum(), xv)
    value = f(x, torch.arange(8))
    norm_square = estimate_gradient_norm(f, x, value, samples=200, sigma=1e-6, generator=g)
    assert torch.allclose(norm_square, true.pow(2).sum(1), rtol=0.3)  # the estimate of ||grad||^2
    est = prior_guided_estimate(f, x, value, true, true.pow(2).sum(1), q=10, sigma=1e-6, generator=g)
    assert torch.allclose(est.alpha, torch.ones(8, dtype=torch.float64), atol=1e-3)
    assert bool((est.lam == 1).all()) and est.queries.tolist() == [1] * 8
    cosine = nn.functional.cosine_similarity(est.grad, true)
    assert bool((cosine > 0.999).all())
    # The prior pointing the wrong way is flipped: alpha is a cosine's absolute value.
    flipped = prior_guided_estimate(f, x, value, -true, true.pow(2).sum(1), q=10, sigma=1e-6, generator=g)
    assert bool((nn.functional.cosine_similarity(flipped.grad, true) > 0.999).all())


def test_free_coordinates_are_those_a_step_along_the_prior_can_move() -> None:
    threat = ThreatModel("linf", 0.1)
    x = torch.tensor([[0.5, 0.5, 0.0, 1.0, 0.5, 0.5]])
    x_adv = torch.tensor([[0.6, 0.4, 0.0, 1.0, 0.45, 0.6]])  # ball faces, box faces, inside, ball face
    prior = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0]])
    assert free_coordinates(x_adv, x, prior, threat).tolist() == [[False, True, False, True, True, True]]
    # l2: only the box is coordinate-wise
    assert free_coordinates(x_adv, x, prior, ThreatModel("l2", 0.1)).tolist() == [[True] * 2 + [False] + [True] * 3]
    # every coordinate blocked: nothing to restrict to, all of them stay
    assert bool(free_coordinates(x + 0.1, x, torch.ones_like(x), threat).all())


def test_restricted_to_free_coordinates_the_target_prior_gives_the_free_gradient() -> None:
    """With the free part of the true gradient as its own prior and the free part's norm, alpha ~ 1, lambda = 1;
    with a useless prior the random directions live on the free coordinates only, and fewer of them than ``q``
    when the free subspace is smaller."""
    model = smooth_mlp(30, 0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 30, generator=g, dtype=torch.float64)
    free = torch.rand(6, 30, generator=g) < 0.5
    free[5] = False
    free[5, :4] = True  # 4 free coordinates: at most 3 directions orthogonal to the prior

    def f(points: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        return model(points)[:, 0]

    xv = x.clone().requires_grad_(True)
    (true,) = torch.autograd.grad(model(xv)[:, 0].sum(), xv)
    value = f(x, torch.arange(6))
    free_part = true * free
    norm_free = estimate_gradient_norm(f, x, value, samples=400, sigma=1e-6, generator=g, free=free)
    assert torch.allclose(norm_free, free_part.pow(2).sum(1), rtol=0.3)
    est = prior_guided_estimate(f, x, value, true, free_part.pow(2).sum(1), q=10, sigma=1e-6, generator=g, free=free)
    assert torch.allclose(est.alpha, torch.ones(6, dtype=torch.float64), atol=1e-3) and bool((est.lam == 1).all())
    assert bool((nn.functional.cosine_similarity(est.grad, free_part) > 0.999).all())
    assert bool((est.grad[~free] == 0).all())
    useless = torch.randn(6, 30, generator=g, dtype=torch.float64)
    rge = prior_guided_estimate(f, x, value, useless, free_part.pow(2).sum(1), q=10, sigma=1e-6, generator=g, free=free)
    assert bool((rge.grad[~free] == 0).all()) and bool((rge.lam < 1).any())
    mixed = rge.lam < 1
    expected = torch.minimum(free.sum(1) - 1, torch.tensor(10))
    assert torch.equal(rge.directions[mixed], expected[mixed]) and torch.equal(rge.queries, 1 + rge.directions)


def _cosines(kind: str, trials: int = 300, n: int = 200, q: int = 10) -> tuple[torch.Tensor, float]:
    """Cosines of the estimate with the gradient of random linear functions, and the fraction of lambda = 0."""
    g = torch.Generator().manual_seed({"rge": 0, "orthogonal": 1, "random": 2}[kind])
    out, fallback = [], 0
    for _ in range(trials):
        a = torch.randn(n, generator=g, dtype=torch.float64)
        x = torch.rand(1, n, generator=g, dtype=torch.float64)
        prior = None
        if kind != "rge":
            v = torch.randn(n, generator=g, dtype=torch.float64)
            prior = (v - (v @ a) / (a @ a) * a if kind == "orthogonal" else v)[None]

        def linear(points: torch.Tensor, owners: torch.Tensor, a: torch.Tensor = a) -> torch.Tensor:
            return points.reshape(points.shape[0], -1) @ a

        est = prior_guided_estimate(linear, x, x @ a, prior, (a @ a)[None], q=q, sigma=1e-4, generator=g)
        out.append(float(nn.functional.cosine_similarity(est.grad, a[None])))
        fallback += int(est.lam == 0)
    return torch.tensor(out, dtype=torch.float64), fallback / trials


@pytest.mark.parametrize("kind", ["orthogonal", "random"])
def test_a_useless_prior_gives_rge_statistics(kind: str) -> None:
    """A prior with no information (orthogonal to the gradient, or a random direction): the estimate's cosine with
    the true gradient has RGE's mean and spread, within 4 standard errors of the difference of means."""
    rge, _ = _cosines("rge")
    useless, fallback = _cosines(kind)
    margin = 4 * math.sqrt(rge.var().item() / len(rge) + useless.var().item() / len(useless))
    assert abs(useless.mean().item() - rge.mean().item()) < margin
    assert 0.75 < useless.std().item() / rge.std().item() < 1.33
    # Using the prior as the estimate (lambda = 1) would give cosines near 1 / sqrt(n) ~ 0.07, far off.
    assert rge.mean().item() > 0.15
    if kind == "orthogonal":
        assert fallback == 1.0  # alpha ~ 0 every time: plain RGE, and counted as such


def test_query_counts_are_exact_and_match_the_step_structure() -> None:
    target = tiny_cnn(seed=0)
    counting = Counting(target)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 6, 6, generator=g)
    y = target(x).argmax(1)
    q, budget = 5, 200
    result = robustlab.attack(
        counting, x, y, ThreatModel("linf", 0.05), method="p-rgf", surrogate=tiny_cnn(seed=1), q=q,
        queries=budget, seed=0,
    )  # fmt: skip
    assert counting.rows == int(result.queries.sum()) + 6 + 1  # + one audit each + the class-count probe
    steps, prior_steps = result.extras["steps"], result.extras["prior_steps"]
    norm_steps = torch.tensor([sum(1 for s in range(int(k)) if s % 10 == 0 or s == 3) for k in steps])
    directions = result.extras["directions"]  # q per mixing step, fewer where fewer coordinates are free
    assert bool((directions <= q * (steps - prior_steps)).all()) and int(directions.sum()) > 0
    expected = 1 + 2 * steps + 10 * norm_steps + directions
    started = steps > 0
    assert torch.equal(result.queries[started], expected[started])
    assert bool((result.queries <= budget).all())


def test_self_surrogate_needs_few_queries_per_step() -> None:
    target = tiny_cnn(seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(10, 1, 6, 6, generator=g)
    y = target(x).argmax(1)
    threat = ThreatModel("linf", 0.03)
    own = robustlab.attack(target, x, y, threat, method="p-rgf", surrogate=target, q=20, queries=300, seed=0)
    steps = own.extras["steps"].sum().item()
    assert own.extras["prior_steps"].sum().item() >= 0.8 * steps  # lambda = 1: the prior alone
    # At most the odd step where an example stuck at a stationary point has a vanishing free gradient (alpha ~ 0/0).
    assert own.extras["fallback_steps"].sum().item() <= 0.02 * steps
    # queries per step: 2, plus 10 every 10 steps and 20 on the few steps that mix
    assert (own.queries.sum().item() - 10) / steps < 8


@pytest.mark.parametrize("budget", [1, 2, 7, 13, 40])
def test_budget_is_never_exceeded(budget: int) -> None:
    target = tiny_cnn(seed=0)
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(budget))
    y = target(x).argmax(1)
    handle = ScoreOracle(module_function(target), budget=budget)  # any query past it raises
    result = robustlab.attack(
        handle, x, y, ThreatModel("l2", 0.2), method="p-rgf", surrogate=tiny_cnn(seed=2), q=4, queries=budget
    )
    assert bool((result.queries <= budget).all()) and bool((result.queries >= 1).all())
    assert bool(ThreatModel("l2", 0.2).contains(result.x_adv, x).all())


def test_contract_outputs_rechecks_and_reproducibility() -> None:
    target = tiny_cnn(seed=0)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 1, 6, 6, generator=g, dtype=torch.float64)
    target = target.double()
    y = target(x).argmax(1)
    threat = ThreatModel("linf", 0.2)
    surrogate = tiny_cnn(seed=1).double()
    options: dict[str, Any] = {"surrogate": surrogate, "q": 4, "queries": 120, "seed": 5}
    result = robustlab.attack(target, x, y, threat, method="p-rgf", **options)
    assert bool(threat.contains(result.x_adv, x).all())
    assert torch.equal(result.success, target(result.x_adv).argmax(1) != y)
    again = robustlab.attack(target, x, y, threat, method="p-rgf", **options)
    assert torch.equal(again.x_adv, result.x_adv) and torch.equal(again.queries, result.queries)
    plain = robustlab.attack(target, x, y, threat, method="p-rgf", q=4, queries=120, seed=5)
    assert not bool(plain.extras["prior"].any()) and int(plain.extras["prior_steps"].sum()) == 0


def test_a_surrogate_that_does_not_fit_is_named() -> None:
    target = tiny_cnn(seed=0)
    x = torch.rand(2, 1, 6, 6)
    y = target(x).argmax(1)
    threat = ThreatModel("linf", 0.1)
    with pytest.raises(ModelError, match=r"surrogate 2 \(Sequential\) answers 5 classes but the target .* 10"):
        robustlab.attack(target, x, y, threat, method="p-rgf", surrogate=[tiny_cnn(), tiny_cnn(num_classes=5)])
    wrong_shape = nn.Sequential(nn.Flatten(), nn.Linear(49, 10))
    with pytest.raises(InvalidInputError, match=r"surrogate 1 .* cannot take the target's inputs"):
        robustlab.attack(target, x, y, threat, method="p-rgf", surrogate=wrong_shape)
    with pytest.raises(ModelError, match="surrogate 1 is a black-box handle"):
        robustlab.attack(target, x, y, threat, method="p-rgf", surrogate=ScoreOracle(module_function(target)))
    with pytest.raises(ModelError, match=r"surrogate 1 must be a torch\.nn\.Module"):
        robustlab.attack(target, x, y, threat, method="p-rgf", surrogate="model.pt")


def test_rival_margin_loss_known_answers() -> None:
    from robustlab.goals import Goal
    from robustlab.losses import margin_loss, rival_margin_loss

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 4.0]])
    goal = Goal(torch.tensor([0, 2]))
    assert rival_margin_loss(torch.tensor([2, 0]))(logits, goal).tolist() == [1.0, -3.5]  # z_rival - z_label
    unknown = rival_margin_loss(torch.tensor([-1, -1]))(logits, goal)
    assert torch.equal(unknown, margin_loss(logits, goal))  # -1: the largest other class
    targeted = Goal(torch.tensor([0, 2]), targets=torch.tensor([1, 0]))
    assert rival_margin_loss(torch.tensor([0, 2]))(logits, targeted).tolist() == [2.0, -3.5]  # z_target - z_rival


def test_the_search_records_the_targets_rival_class() -> None:
    from robustlab.attacks.zo_engine import ScoreSearch
    from robustlab.goals import Goal
    from robustlab.losses import margin_loss
    from robustlab.zeroth_order import ScoreObjective

    target = tiny_cnn(seed=0)
    x = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    y = target(x).argmax(1)
    goal = Goal(y)
    oracle = ScoreOracle(module_function(target)).bind(5, x.device)
    search = ScoreSearch(oracle, goal, ScoreObjective(margin_loss, goal), 10, x)
    assert search.rival.tolist() == [-1] * 5
    search.evaluate(x[1:3], torch.tensor([1, 2]))
    expected = target(x[1:3]).detach().scatter(1, y[1:3, None], float("-inf")).argmax(1)
    assert search.rival[1:3].tolist() == expected.tolist() and search.rival[[0, 3, 4]].tolist() == [-1] * 3


@pytest.mark.parametrize("budget", [15, 60, 200])
def test_restarts_keep_the_budget_and_the_query_count(budget: int) -> None:
    target = tiny_cnn(seed=0)
    counting = Counting(target)
    x = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(budget))
    y = target(x).argmax(1)
    threat = ThreatModel("linf", 0.02)
    result = robustlab.attack(counting, x, y, threat, method="p-rgf", surrogate=tiny_cnn(seed=2), q=4,
                              queries=budget, restarts=3, patience=1, min_gain=1e6, seed=0)  # fmt: skip
    restarts = result.extras["restarts"]
    assert bool((result.queries <= budget).all()) and bool((restarts <= 3).all())
    assert int(restarts.max()) > 0 or budget < 20  # every step stalls (no gain is 1e6): restarts happen
    assert counting.rows == int(result.queries.sum()) + 5 + 1  # + the audits and the class-count probe
    assert bool(threat.contains(result.x_adv, x).all())
    assert torch.equal(result.success, target(result.x_adv).argmax(1) != y)


def test_linf_steps_scaled_by_the_largest_coordinate_or_signed() -> None:
    from robustlab.attacks.prgf import PRGF

    grad = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, -0.25, 0.1, 0.05]])
    linf = ThreatModel("linf", 0.3)
    scaled = PRGF()._direction(grad, linf)
    assert torch.allclose(scaled, torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, -1.0, 0.4, 0.2]]))
    assert torch.equal(PRGF(linf_step="sign")._direction(grad, linf), torch.sign(grad))
    l2 = PRGF()._direction(grad, ThreatModel("l2", 1.0))
    assert torch.allclose(l2.norm(dim=1), torch.ones(2))  # l2: the unit estimate, whatever linf_step says
    assert PRGF().config.step_fraction(linf) == 2.0 and PRGF(linf_step="sign").config.step_fraction(linf) == 0.1
    assert PRGF().config.step_fraction(linf, with_prior=False) == 1.0  # plain RGF: eps
    assert PRGF(rel_lr=0.2).config.step_fraction(linf) == 0.2
    assert PRGF(rel_lr=0.2).config.step_fraction(linf, with_prior=False) == 0.2
    with pytest.raises(robustlab.ConfigError, match="linf_step"):
        PRGF(linf_step="round")


def test_free_faces_follow_the_running_average_of_the_estimates() -> None:
    """The faces a step may leave are judged by the target's recent estimates (each scaled to a largest coordinate
    of 1, older ones times face_decay), by the prior only where no estimate has been made; a restart forgets."""
    from robustlab.attacks.prgf import PRGF, _Progress

    progress = _Progress.begin(torch.zeros(3), 4)
    rows = torch.tensor([0, 2])
    progress.remember(rows, torch.tensor([[2.0, -1.0, 0.0, 0.0], [0.0, 0.5, -0.25, 0.0]]), 0.5)
    progress.remember(rows, torch.tensor([[-4.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0]]), 0.5)
    expected = torch.tensor([[-0.5, -0.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, -0.5, -0.25, 0.0]])
    assert torch.allclose(progress.trend, expected)
    prior = torch.tensor([[1.0, 1.0, 1.0, -1.0]]).expand(3, 4)
    guide = progress.face_guide(torch.arange(3), prior)
    assert torch.allclose(guide, torch.tensor([[-0.5, -0.25, 1, -1], [1, 1, 1, -1], [1, -0.5, -0.25, -1]]))
    # At a corner of the ball (every coordinate on its upper face) a coordinate is free where the guide points in.
    x = torch.full((3, 4), 0.5)
    free = free_coordinates(x + 0.1, x, guide, ThreatModel("linf", 0.1))
    assert free.tolist() == [[True, True, False, True], [False, False, False, True], [False, True, True, True]]
    progress.restart(torch.tensor([2]), torch.zeros(1))
    assert bool((progress.trend[2] == 0).all()) and torch.allclose(progress.trend[0], expected[0])
    assert PRGF().config.face_decay == 0.5
    for bad in (1.0, -0.1):
        with pytest.raises(robustlab.ConfigError, match="face_decay"):
            PRGF(face_decay=bad)
