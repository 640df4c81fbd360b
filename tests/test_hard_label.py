"""Contract of every label-only attack: budgets, query accounting, valid outputs, no access to scores."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import robustlab
from robustlab import GradientOracle, LabelOracle, ScoreOracle, ThreatModel
from robustlab.attacks.registry import AttackInfo
from robustlab.oracles import module_function
from tests.toys import binary_linear, tiny_cnn

LABEL_ATTACKS = robustlab.list_attacks(access="labels")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Label-only attacks make many tiny sequential model calls; on a loaded machine two intra-op threads make
    each of them wait for the other core (about 40 ms instead of 0.15 ms here), so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


EPS = {"linf": 0.1, "l2": 0.5}
CASES = [(info, norm) for info in LABEL_ATTACKS for norm in sorted(n.value for n in info.norms)]


def fast_options(info: AttackInfo, queries: int = 150) -> dict[str, Any]:
    options: dict[str, Any] = {"queries": queries}
    if info.name == "hsja":
        options.update(init_evals=10, max_evals=40)
    if info.name == "sign-opt":
        options.update(k=10, init_directions=5)
    return options


class Counting(nn.Module):
    """Counts the rows it is asked about."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += int(x.shape[0])
        return self.model(x)


def test_the_three_hard_label_attacks_are_registered() -> None:
    names = {i.name for i in LABEL_ATTACKS}
    assert {"rays", "hsja", "sign-opt"} <= names
    assert {i.name for i in robustlab.list_attacks(access="labels", norm="l2")} >= {"hsja", "sign-opt"}
    assert not robustlab.get_attack("rays").supports_targeted


@pytest.mark.parametrize(("info", "norm"), CASES, ids=[f"{i.name}-{n}" for i, n in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract(info: AttackInfo, norm: str, dtype: torch.dtype) -> None:
    cnn = tiny_cnn().to(dtype)
    model = Counting(cnn)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 6, 6, generator=g, dtype=dtype)
    x[:, :, 0, 0] = 0.0  # pixels on the box faces
    x[:, :, 0, 1] = 1.0
    with torch.no_grad():
        y = cnn(x).argmax(1)
    cnn[2].train()  # a module left in train mode must come back in train mode
    modes = [m.training for m in model.modules()]
    y[:2] = (y[:2] + 1) % 10  # two misclassified examples
    x_before = x.clone()
    threat = ThreatModel(norm, EPS[norm])

    result = robustlab.attack(model, x, y, threat, method=info.name, seed=3, **fast_options(info))

    assert torch.equal(x, x_before), "the caller's inputs were modified"
    assert [m.training for m in model.modules()] == modes, "model modes not restored"
    assert result.x_adv.dtype == dtype and result.x_adv.shape == x.shape and result.x_adv.device == x.device
    assert bool(threat.contains(result.x_adv, x).all()), "output outside ball or box"
    with torch.no_grad():
        predicted = cnn.eval()(result.x_adv).argmax(1)
    assert torch.equal(result.success, predicted != y), "claimed success differs from a fresh forward pass"
    assert torch.allclose(result.distance, threat.distance(result.x_adv, x))
    assert result.gradients is None
    assert bool((result.queries <= 150).all()) and bool((result.queries >= 1).all())
    assert model.rows == int(result.queries.sum()) + 6, "every evaluation is counted (plus one audit each)"
    assert result.extras["clean_correct"].tolist() == [False, False, True, True, True, True]
    assert bool(result.success[:2].all()) and bool((result.queries[:2] == 1).all())
    assert bool((result.audits == 1).all())
    # Failures return the clean input; successes a point the attack itself saw misclassified.
    assert bool((result.distance[~result.success] == 0).all())
    stopped = result.extras["success_queries"]
    assert torch.equal(stopped >= 0, result.success)
    assert bool((stopped[result.success] == result.queries[result.success]).all()), "eps mode stops at success"
    again = robustlab.attack(model.train(), x, y, threat, method=info.name, seed=3, **fast_options(info))
    assert torch.equal(again.x_adv, result.x_adv) and torch.equal(again.queries, result.queries)
    summary = result.summary()
    assert summary["method"] == info.name and summary["examples"] == 6


class ScoresForbidden(ScoreOracle):
    def scores(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        raise AssertionError("a label-only attack asked for scores")


class GradientsForbidden(GradientOracle):
    def scores(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        raise AssertionError("a label-only attack asked for scores")

    def loss_and_grad(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a label-only attack asked for gradients")


@pytest.mark.parametrize("info", LABEL_ATTACKS, ids=[i.name for i in LABEL_ATTACKS])
def test_stronger_handles_are_accepted_but_only_labels_are_used(info: AttackInfo) -> None:
    model = tiny_cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 6, 6, generator=g)
    y = model(x).argmax(1)
    threat = ThreatModel("linf", 0.1)
    plain = robustlab.attack(model, x, y, threat, method=info.name, seed=0, **fast_options(info, 60))
    score_handle = ScoresForbidden(module_function(model))
    via_scores = robustlab.attack(score_handle, x, y, threat, method=info.name, seed=0, **fast_options(info, 60))
    via_gradients = robustlab.attack(
        GradientsForbidden(model), x, y, threat, method=info.name, seed=0, **fast_options(info, 60)
    )
    for other in (via_scores, via_gradients):
        # a handle without a budget still gets the attack's own; the answers are the same
        assert torch.equal(other.queries, plain.queries) and torch.equal(other.x_adv, plain.x_adv)
    assert score_handle.total_queries == int(plain.queries.sum()) + 4 + 1  # + audit + the class-count probe


@pytest.mark.parametrize("info", LABEL_ATTACKS, ids=[i.name for i in LABEL_ATTACKS])
def test_a_handle_budget_below_the_attacks_own_is_respected(info: AttackInfo) -> None:
    model = tiny_cnn()
    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(1)
    handle = LabelOracle(module_function(model), budget=25)
    result = robustlab.attack(handle, x, y, ThreatModel("linf", 0.01), method=info.name, **fast_options(info, 1000))
    assert bool((result.queries <= 25).all())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from([i.name for i in LABEL_ATTACKS]),
    norm=st.sampled_from(["linf", "l2"]),
    budget=st.integers(1, 80),
    mode=st.sampled_from(["eps", "adbd"]),
    batch=st.integers(1, 4),
    features=st.integers(1, 12),
    eps=st.floats(1e-3, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 1000),
)
def test_budget_is_never_exceeded_and_outputs_are_valid(
    method, norm, budget, mode, batch, features, eps, dtype, seed
) -> None:
    info = robustlab.get_attack(method)
    if norm not in {n.value for n in info.norms}:
        return
    model = binary_linear(features, dtype=dtype, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, features), generator=g, dtype=dtype)
    y = torch.randint(0, 2, (batch,), generator=g)
    threat = ThreatModel(norm, eps)
    options = fast_options(info, budget)
    options["mode"] = mode
    # The handle's budget equals the attack's: any query past it would raise QueryBudgetExceeded.
    handle = LabelOracle(module_function(model), budget=budget)
    result = robustlab.attack(handle, x, y, threat, method=method, seed=seed, **options)
    assert bool((result.queries <= budget).all()) and bool((result.queries >= 1).all())
    assert bool(threat.contains(result.x_adv, x).all())
    with torch.no_grad():
        predicted = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, predicted != y)
    if mode == "adbd":
        # the whole budget is spent unless the example was misclassified (or the search gave up)
        misclassified = ~result.extras["clean_correct"]
        assert bool((result.queries[misclassified] == 1).all())
    distance = result.extras["boundary_distance"]
    assert bool((distance[~result.extras["clean_correct"]] == 0).all())
    assert bool((result.success <= (distance <= eps * (1 + 1e-6))).all())


@pytest.mark.parametrize("method", ["hsja", "sign-opt"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_baselines_break_a_linear_model_within_reach_and_never_beyond(method: str, norm: str) -> None:
    dim = 10
    model = binary_linear(dim, seed=7).eval()
    g = torch.Generator().manual_seed(3)
    x = 0.5 + 0.3 * (torch.rand(12, dim, generator=g, dtype=torch.float64) - 0.5)
    y = model(x).argmax(1)
    w = (model.weight[1] - model.weight[0]).detach()
    margin = (x @ w + (model.bias[1] - model.bias[0]).detach()).abs()
    true = margin / w.norm(p=1 if norm == "linf" else 2)
    eps = float(true.median())
    threat = ThreatModel(norm, eps)
    result = robustlab.attack(model, x, y, threat, method=method, queries=1500, seed=0)
    assert not bool(result.success[true > eps].any()), "an adversarial point nearer than the minimum"
    easy = true < eps / 2
    assert bool(easy.any()) and float(result.success[easy].float().mean()) >= 0.8
    found = result.extras["boundary_distance"]
    assert bool((found >= true * (1 - 1e-9)).all())


def test_config_errors() -> None:
    model = tiny_cnn()
    x, y = torch.rand(2, 1, 6, 6), torch.tensor([0, 1])
    threat = ThreatModel("linf", 0.1)
    for method in ("hsja", "sign-opt"):
        with pytest.raises(robustlab.ConfigError, match="queries must be a positive integer"):
            robustlab.attack(model, x, y, threat, method=method, queries=0)
        with pytest.raises(robustlab.ConfigError, match="mode 'fast'"):
            robustlab.attack(model, x, y, threat, method=method, mode="fast")
        with pytest.raises(robustlab.ConfigError, match="does not support the l1 norm"):
            robustlab.attack(model, x, y, ThreatModel("l1", 1.0), method=method)
    with pytest.raises(robustlab.ConfigError, match="init_evals"):
        robustlab.attack(model, x, y, threat, method="hsja", init_evals=200, max_evals=100)
    with pytest.raises(robustlab.ConfigError, match="needs a bounded box"):
        robustlab.attack(model, x, y, ThreatModel("linf", 0.1, -math.inf, math.inf), method="hsja")
    with pytest.raises(robustlab.ConfigError, match="untargeted only"):
        robustlab.attack(model, x, y, threat, method="sign-opt", targets=(y + 1) % 10)
    with pytest.raises(robustlab.ConfigError, match="unknown option"):
        robustlab.attack(model, x, y, threat, method="hsja", bogus=1)


def test_hsja_targeted_reaches_the_target_or_fails_cleanly() -> None:
    model = tiny_cnn()
    g = torch.Generator().manual_seed(6)
    x = torch.rand(4, 1, 6, 6, generator=g)
    y = model(x).argmax(1)
    targets = (y + 1) % 10
    result = robustlab.attack(
        model, x, y, ThreatModel("l2", 1.0), method="hsja", targets=targets, queries=200, init_evals=10, seed=0
    )
    with torch.no_grad():
        predicted = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, predicted == targets)
    assert bool((result.queries <= 200).all())


def test_cli_runs_rays_with_a_query_budget(tmp_path) -> None:
    import json

    import numpy as np

    from robustlab.cli import main

    model = tiny_cnn()
    model_path = tmp_path / "model.pt"
    torch.jit.script(model).save(str(model_path))
    x = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    data_path = tmp_path / "data.npz"
    np.savez(data_path, x=x.numpy(), y=model(x).argmax(1).numpy())
    out = tmp_path / "rays.json"
    code = main(
        ["attack", "--model", str(model_path), "--data", str(data_path), "--method", "rays", "--eps", "0.1",
         "--queries", "50", "-O", "mode=adbd", "--out", str(out), "--quiet", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["method"] == "rays" and summary["config"]["queries"] == 50 and summary["config"]["mode"] == "adbd"
    assert summary["mean_queries"] <= 50
