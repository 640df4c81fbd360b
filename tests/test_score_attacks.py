"""Score-based attacks (NES-PGD, ZO-FW, Square): the contract of every registered score attack, exact query counts
against a counting model, never past the budget (property test), outputs in ball and box, success re-checks,
targeted success on an easy model, and clear errors for bad input."""

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
from robustlab import Access, ConfigError, LabelOracle, ModelError, ScoreOracle, ThreatModel
from robustlab.attacks.registry import AttackInfo
from robustlab.attacks.square import p_schedule
from robustlab.attacks.zo_fw import ZOFrankWolfe
from robustlab.oracles import module_function
from tests.toys import tiny_cnn

SCORE_ATTACKS = [i.name for i in robustlab.list_attacks(access="scores")]
EPS = {"linf": 0.1, "l2": 0.5, "l1": 2.0}
FAST: dict[str, dict[str, Any]] = {"nes": {"q": 4}, "zo-fw": {"q": 4}, "square": {}}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The models here are tiny: intra-op threads only add scheduling overhead on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_three_attacks_are_registered_at_score_access() -> None:
    assert {"nes", "zo-fw", "square"} <= set(SCORE_ATTACKS)
    for name in ("nes", "zo-fw", "square"):
        info = robustlab.get_attack(name)
        assert info.access is Access.SCORES and info.supports_targeted
        assert {n.value for n in info.norms} == ({"linf", "l2", "l1"} if name == "square" else {"linf", "l2"})
        assert info.cls.Config().queries == 10_000  # type: ignore[attr-defined]


CASES = [
    (info, norm) for info in robustlab.list_attacks(access="scores") for norm in sorted(n.value for n in info.norms)
]


@pytest.mark.parametrize(("info", "norm"), CASES, ids=[f"{i.name}-{n}" for i, n in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("targeted", [False, True])
def test_contract(info: AttackInfo, norm: str, dtype: torch.dtype, targeted: bool) -> None:
    """What tests/test_attack_contract.py checks for white-box attacks, for every score-based one."""
    if targeted and not info.supports_targeted:
        pytest.skip("untargeted only")
    model = tiny_cnn().to(dtype)
    model[2].train()  # a module left in train mode must come back in train mode
    modes = [m.training for m in model.modules()]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, 6, 6, generator=g, dtype=dtype)
    x[:, :, 0, 0] = 0.0  # pixels on the box faces
    x[:, :, 0, 1] = 1.0
    y = torch.randint(0, 10, (10,), generator=g)
    targets = (y + 1) % 10 if targeted else None
    x_before = x.clone()
    threat = ThreatModel(norm, EPS[norm])
    options = {"queries": 80, **FAST.get(info.name, {})}

    result = robustlab.attack(model, x, y, threat, method=info.name, targets=targets, seed=3, **options)

    assert torch.equal(x, x_before), "the caller's inputs were modified"
    assert [m.training for m in model.modules()] == modes, "model modes not restored"
    assert result.x_adv.dtype == dtype and result.x_adv.shape == x.shape and result.x_adv.device == x.device
    assert bool(threat.contains(result.x_adv, x).all()), "output outside ball or box"
    with torch.no_grad():
        predicted = model.eval()(result.x_adv).argmax(1)
    expected = predicted == targets if targeted else predicted != y
    assert torch.equal(result.success, expected), "claimed success differs from a fresh forward pass"
    assert torch.allclose(result.distance, threat.distance(result.x_adv, x))
    assert result.gradients is None, "a score-based attack reported gradient evaluations"
    assert bool((result.queries >= 1).all()) and bool((result.queries <= 80).all())
    assert result.audits.tolist() == [2] + [1] * 9  # the class-count probe (example 0) and the final re-check
    assert result.wall_time > 0 and result.num_examples == 10
    again = robustlab.attack(model.train(), x, y, threat, method=info.name, targets=targets, seed=3, **options)
    assert torch.equal(again.x_adv, result.x_adv), "not reproducible with a fixed seed"
    assert torch.equal(again.queries, result.queries)
    summary = result.summary()
    assert summary["method"] == info.name and summary["examples"] == 10
    _, fractions = result.success_curve([0, 40, 80])
    assert fractions[-1] == pytest.approx(result.success_rate) and fractions == sorted(fractions)


@pytest.mark.parametrize("name", SCORE_ATTACKS)
def test_unknown_option_and_bad_budgets_are_config_errors(name: str) -> None:
    cls = robustlab.get_attack(name).cls
    with pytest.raises(ConfigError, match=r"unknown option.*bogus"):
        cls(bogus=1)
    for bad in (0, -5, 2.5, True, None):
        with pytest.raises(ConfigError, match="queries"):
            cls(queries=bad)


@pytest.mark.parametrize("name", ["nes", "zo-fw"])
def test_bad_mu_and_q_are_config_errors(name: str) -> None:
    cls = robustlab.get_attack(name).cls
    for bad in (0.0, -0.01, math.nan, math.inf):
        with pytest.raises(ConfigError, match="mu"):
            cls(mu=bad)
    for bad_q in (0, -1, 1.5):
        with pytest.raises(ConfigError, match="q "):
            cls(q=bad_q)


def test_other_bad_options() -> None:
    with pytest.raises(ConfigError, match="gamma"):
        robustlab.get_attack("zo-fw").cls(gamma=0.0)
    with pytest.raises(ConfigError, match="beta"):
        robustlab.get_attack("zo-fw").cls(beta=1.0)
    with pytest.raises(ConfigError, match="directions"):
        robustlab.get_attack("zo-fw").cls(directions="cube")
    with pytest.raises(ConfigError, match="p_init"):
        robustlab.get_attack("square").cls(p_init=1.5)
    with pytest.raises(ConfigError, match="loss"):
        robustlab.get_attack("square").cls(loss="dlr")
    with pytest.raises(ConfigError, match="momentum"):
        robustlab.get_attack("nes").cls(momentum=1.0)
    with pytest.raises(ConfigError, match="unknown loss"):
        robustlab.get_attack("nes").cls(loss="hinge")
    with pytest.raises(ConfigError, match="does not support the l1 norm"):
        robustlab.attack(tiny_cnn(), torch.rand(2, 1, 6, 6), torch.tensor([0, 1]), ThreatModel("l1", 1.0), "nes")


@pytest.mark.parametrize("name", SCORE_ATTACKS)
def test_a_label_oracle_is_refused_clearly(name: str) -> None:
    oracle = LabelOracle(module_function(tiny_cnn()))
    with pytest.raises(ConfigError, match="needs scores access, but the model handle only gives labels"):
        robustlab.attack(oracle, torch.rand(2, 1, 6, 6), torch.tensor([0, 1]), ThreatModel("linf", 0.1), name)


class _Broken(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.kind == "nan" and n > 1:
            return torch.full((n, 10), math.nan)
        if self.kind == "classes" and n > 1:
            return torch.zeros(n, 3)
        return torch.arange(10.0).expand(n, 10).clone()


@pytest.mark.parametrize("name", SCORE_ATTACKS)
def test_bad_models_raise_model_errors(name: str) -> None:
    x, y = torch.rand(3, 1, 6, 6), torch.tensor([0, 1, 2])
    threat = ThreatModel("linf", 0.1)
    with pytest.raises(ModelError, match="NaN or Inf"):
        robustlab.attack(_Broken("nan"), x, y, threat, name, queries=100)
    with pytest.raises(ModelError, match="returned 3 classes, expected 10"):
        robustlab.attack(_Broken("classes"), x, y, threat, name, queries=100)


class Constant(nn.Module):
    """A model no attack can fool (its scores ignore the input), recording every row it is asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += int(x.shape[0])
        return torch.tensor([3.0, 1.0, 0.0, -1.0]).expand(x.shape[0], 4).clone()


@pytest.mark.parametrize("budget", [1, 2, 8, 9, 10, 27, 100])
@pytest.mark.parametrize("name", SCORE_ATTACKS)
def test_exact_query_counts_against_a_counting_model(name: str, budget: int) -> None:
    model = Constant()
    oracle = ScoreOracle(model)
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 0, 0])
    options: dict[str, Any] = {} if name == "square" else {"q": 4}
    result = robustlab.attack(oracle, x, y, ThreatModel("linf", 0.2), name, queries=budget, seed=0, **options)
    if name == "square":
        expected = budget  # one query at the start, then one per iteration until the budget is spent
    else:
        per_step = 2 * 4 + 1  # the probes and the check at the new iterate
        expected = 1 + (budget - 1) // per_step * per_step
    assert result.queries.tolist() == [expected] * 3
    assert not bool(result.success.any())
    # The model's own count: the attack's queries, the class-count probe and the final re-check, nothing else.
    assert model.rows == int(result.queries.sum()) + int(result.audits.sum()) == 3 * expected + 1 + 3
    assert oracle.total_queries == model.rows


@pytest.mark.parametrize("budget", [1, 5, 6, 11, 27])
def test_forward_zo_fw_reuses_the_check_query(budget: int) -> None:
    """With forward differences the value at the iterate comes from its success check: q + 1 queries a step."""
    model = Constant()
    oracle = ScoreOracle(model)
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 0, 0])
    threat = ThreatModel("linf", 0.2)
    result = robustlab.attack(oracle, x, y, threat, "zo-fw", queries=budget, seed=0, q=4, difference="forward")
    per_step = 4 + 1  # four probes x + mu u_i, and the check at the new iterate; f(x_t) is never asked twice
    expected = 1 + (budget - 1) // per_step * per_step
    assert result.queries.tolist() == [expected] * 3
    assert model.rows == 3 * expected + 1 + 3


def test_an_oracle_budget_smaller_than_the_attacks_is_respected() -> None:
    model = Constant()
    oracle = ScoreOracle(model, budget=20)
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 0])
    cases: list[tuple[str, dict[str, Any]]] = [("zo-fw", {"q": 4}), ("nes", {"q": 4}), ("square", {})]
    for name, options in cases:
        result = robustlab.attack(oracle, x, y, ThreatModel("linf", 0.2), name, queries=1000, **options)
        assert bool((result.queries <= 20).all())
        assert result.queries.tolist() == ([20, 20] if name == "square" else [19, 19])


class FlatLinear(nn.Module):
    def __init__(self, features: int, classes: int, dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, features, generator=g, dtype=dtype) * 3)
        self.bias = nn.Parameter(torch.zeros(classes, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.flatten(1)) @ self.weight.T + self.bias


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(SCORE_ATTACKS),
    norm=st.sampled_from(["linf", "l2"]),
    shape=st.sampled_from([(5,), (1, 3, 3), (2, 4, 5), (3, 2), (1, 1, 7)]),
    batch=st.integers(1, 4),
    budget=st.integers(1, 120),
    eps=st.floats(1e-3, 1.5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    targeted=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_never_past_the_budget_and_always_feasible(
    method, norm, shape, batch, budget, eps, dtype, targeted, seed
) -> None:
    features = math.prod(shape)
    model = FlatLinear(features, 4, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *shape), generator=g, dtype=dtype)
    y = torch.randint(0, 4, (batch,), generator=g)
    targets = (y + 1 + torch.randint(0, 3, (batch,), generator=g)) % 4 if targeted else None
    threat = ThreatModel(norm, eps)
    options: dict[str, Any] = {"queries": budget}
    if method in ("nes", "zo-fw"):
        options["q"] = int(torch.randint(1, 6, (1,), generator=g))
    if method == "zo-fw" and seed % 2:
        options["difference"] = "forward"
    result = robustlab.attack(model, x, y, threat, method=method, targets=targets, seed=seed, **options)
    assert bool((result.queries <= budget).all()) and bool((result.queries >= 1).all())
    assert result.x_adv.dtype == dtype and result.x_adv.shape == x.shape
    assert bool(threat.contains(result.x_adv, x).all())
    with torch.no_grad():
        predicted = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, predicted == targets if targeted else predicted != y)


def _easy_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three classes of a linear model on 4 x 4 inputs; each target is reachable well inside eps = 0.3."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 16, generator=g)
    linear = nn.Linear(16, 3)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.zero_()
    model = nn.Sequential(nn.Flatten(), linear)
    x = torch.full((6, 1, 4, 4), 0.5) + 0.05 * torch.randn(6, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y, (y + 1) % 3


@pytest.mark.parametrize("name", SCORE_ATTACKS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_targeted_attacks_reach_their_targets_on_an_easy_model(name: str, norm: str) -> None:
    model, x, y, targets = _easy_problem()
    threat = ThreatModel(norm, 0.3 if norm == "linf" else 1.2)
    result = robustlab.attack(model, x, y, threat, name, targets=targets, seed=0, queries=3000)
    assert bool(result.success.all()), f"{name} missed targets: {result.success.tolist()}"
    with torch.no_grad():
        assert torch.equal(model(result.x_adv).argmax(1), targets)
    assert bool((result.queries < 3000).all())  # each example stopped at its first success


def test_probabilities_give_the_same_attack_as_logits() -> None:
    model, x, y, targets = _easy_problem()
    model, x = model.double(), x.double()
    soft = nn.Sequential(model, nn.Softmax(dim=1))
    threat = ThreatModel("linf", 0.3)
    for name in SCORE_ATTACKS:
        a = robustlab.attack(model, x, y, threat, name, targets=targets, seed=1, queries=500)
        with pytest.warns(UserWarning, match="probabilities"):
            b = robustlab.attack(soft, x, y, threat, name, targets=targets, seed=1, queries=500)
        assert torch.equal(a.success, b.success) and torch.equal(a.queries, b.queries)
        assert torch.allclose(a.x_adv, b.x_adv, atol=1e-6)


def test_square_linf_proposals_sit_at_the_vertices() -> None:
    model = tiny_cnn()
    x, y = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(2)), torch.arange(5)
    threat = ThreatModel("linf", 0.1)
    result = robustlab.attack(model, x, y, threat, "square", seed=0, queries=50)
    delta = result.x_adv - x
    at_vertex = (delta.abs() - 0.1).abs() < 1e-6
    at_box = (result.x_adv == 0) | (result.x_adv == 1)
    assert bool((at_vertex | at_box).all())


def test_square_p_schedule_matches_the_reference() -> None:
    expected = {0: 0.8, 10: 0.8, 11: 0.4, 50: 0.4, 51: 0.2, 200: 0.2, 201: 0.1, 501: 0.05, 1001: 0.025}
    for iteration, p in expected.items():
        assert p_schedule(0.8, iteration, 10_000) == pytest.approx(p)
    assert p_schedule(0.8, 9999, 10_000) == pytest.approx(0.8 / 512)
    assert p_schedule(0.8, 55, 50_000) == pytest.approx(0.4)  # rescaled to a 50,000-query budget


def test_zo_fw_gamma_schedule() -> None:
    """gamma stays constant until the objective stops falling by 0.1% over 5 iterations, then gamma/sqrt(t-t0+1)."""
    attack = ZOFrankWolfe(gamma=0.5)
    state = attack._init_state(torch.zeros(2, 3))
    rows = torch.arange(2)
    # Example 0 keeps improving by 10% per step; example 1 stalls (its maximized loss is flat).
    for step in range(8):
        loss = torch.tensor([-(0.9**step), -1.0])
        attack._observe(state, rows, loss, step)
    assert state["t0"].tolist() == [-1, 3]  # stall seen at step 4 (the fifth loss): t0 = 4 - 1
    gamma = attack.gamma_at(5, state["t0"])
    assert gamma.tolist() == pytest.approx([0.5, 0.5 / math.sqrt(5 - 3 + 1)])


def test_blackbox_report_section() -> None:
    from robustlab.demo.blackbox import blackbox_section
    from robustlab.report import Report

    model = tiny_cnn()
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(12, 1, 6, 6, generator=g), torch.randint(0, 10, (12,), generator=g)
    with torch.no_grad():
        y[:6] = model(x[:6]).argmax(1)  # some correctly classified images
    report = Report("test")
    data = blackbox_section(report, model, x, y, eps=0.1, queries=60, examples=4)
    assert data["examples"] == 4 and set(data["attacks"]) == {"Square", "ZO-FW (Gaussian)", "NES-PGD"}
    for figures in data["attacks"].values():
        budgets, fractions = figures["curve"]["queries"], figures["curve"]["success"]
        assert budgets[0] == 1 and budgets[-1] == 60 and fractions == sorted(fractions)
        assert fractions[-1] == pytest.approx(figures["success_rate"])
    assert len(report.sections) == 1 and "success against queries" in report.sections[0].title
    assert "<img" in report.sections[0].render()
