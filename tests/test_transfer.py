"""Transfer attacks: one target query per example, ensembles, DI and TI, and the attacks started from a transfer
example (rays-transfer, hsja-transfer, square-transfer, p-rgf-transfer)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import robustlab
from robustlab import ConfigError, LabelOracle, ThreatModel
from robustlab.attacks._surrogate import Ensemble, SurrogateOptions, _SmoothGradient, gaussian_kernel
from robustlab.goals import Goal
from robustlab.losses import attack_loss
from robustlab.oracles import module_function
from tests.test_prgf import Counting, _one_thread  # noqa: F401  (_one_thread: the autouse fixture, applied here too)
from tests.toys import binary_linear, tiny_cnn


def _batch(n: int = 10, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    target = tiny_cnn(seed=0)
    x = torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    return target, x, target(x).argmax(1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_one_query_per_example_and_failures_return_the_clean_input(norm: str) -> None:
    target, x, y = _batch()
    counting = Counting(target)
    threat = ThreatModel(norm, 0.1 if norm == "linf" else 0.5)
    result = robustlab.attack(counting, x, y, threat, method="transfer", surrogate=[tiny_cnn(seed=1)], seed=0)
    assert result.queries.tolist() == [1] * 10 and counting.rows == 10 + 10  # one query, one audit each
    assert bool(threat.contains(result.x_adv, x).all())
    assert torch.equal(result.success, target(result.x_adv).argmax(1) != y)
    assert bool((result.distance[~result.success] == 0).all())
    candidate = result.extras["transfer_candidate"]
    assert torch.equal(result.success, target(candidate).argmax(1) != y)  # exactly the candidates that fool it


def test_the_target_as_its_own_surrogate_transfers_like_a_white_box_attack() -> None:
    model = binary_linear(12, dtype=torch.float64, seed=0).eval()
    x = torch.rand(40, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = model(x).argmax(1)
    threat = ThreatModel("linf", 0.15)
    white = robustlab.attack(model, x, y, threat, method="mi-fgsm", steps=10, early_stop=False)
    transfer = robustlab.attack(model, x, y, threat, method="transfer", surrogate=model, di_prob=0.0, seed=0)
    assert torch.equal(transfer.success, white.success) and 0 < transfer.success_rate < 1


def test_ensembles_average_logits_or_losses() -> None:
    a, b = tiny_cnn(seed=1), tiny_cnn(seed=2)
    x = torch.rand(5, 1, 6, 6)
    goal = Goal(torch.zeros(5, dtype=torch.long))
    ce = attack_loss("ce")
    logits = Ensemble([a, b], SurrogateOptions("logits"))
    assert torch.allclose(logits(x), (a(x) + b(x)) / 2)
    assert torch.allclose(logits.loss(x, goal, ce), ce((a(x) + b(x)) / 2, goal))
    losses = Ensemble([a, b], SurrogateOptions("loss"))
    assert torch.allclose(losses.loss(x, goal, ce), (ce(a(x), goal) + ce(b(x), goal)) / 2)


def test_ti_smooths_the_gradient_with_a_normalized_gaussian_kernel() -> None:
    kernel = gaussian_kernel(5, torch.float64, torch.device("cpu"))
    assert float(kernel.sum()) == pytest.approx(1.0) and torch.allclose(kernel, kernel.T)
    assert torch.allclose(kernel, kernel.flip(0)) and int(kernel.argmax()) == 12  # centred
    x = torch.zeros(1, 1, 9, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    weight[0, 0, 4, 4] = 1.0  # the loss's gradient is a single spike at the centre
    (grad,) = torch.autograd.grad((_SmoothGradient.apply(x, kernel) * weight).sum(), x)
    assert torch.allclose(grad[0, 0, 2:7, 2:7], kernel) and float(grad.sum()) == pytest.approx(1.0)


def test_input_diversity_keeps_the_shape_and_is_off_at_probability_zero() -> None:
    x = torch.rand(3, 2, 8, 8)
    off = Ensemble([nn.Identity()], SurrogateOptions(di_prob=0.0))
    assert torch.equal(off.transform(x), x)
    full = Ensemble([nn.Identity()], SurrogateOptions(di_prob=1.0, di_scale=1.0))
    assert torch.equal(full.transform(x), x)  # a resize to the same side with no padding
    shrink = Ensemble([nn.Identity()], SurrogateOptions(di_prob=1.0, di_scale=0.5))
    shrink.generator = torch.Generator().manual_seed(0)
    outs = [shrink.transform(x) for _ in range(6)]
    assert all(o.shape == x.shape for o in outs) and any(not torch.equal(o, x) for o in outs)
    assert any(bool((o == 0).any()) for o in outs)  # zero padding where the shrunk image does not reach


def test_craft_with_any_registered_white_box_attack() -> None:
    target, x, y = _batch()
    threat = ThreatModel("linf", 0.2)
    result = robustlab.attack(
        target, x, y, threat, method="transfer", surrogate=target, craft="pgd", craft_options={"steps": 5}, seed=0
    )
    assert result.queries.tolist() == [1] * 10 and bool(threat.contains(result.x_adv, x).all())
    assert result.success_rate > 0.5
    with pytest.raises(ConfigError, match="craft must be a white-box attack"):
        robustlab.get_attack("transfer").cls(craft="square")
    with pytest.raises(ConfigError, match="loss averaging"):
        robustlab.get_attack("transfer").cls(craft="pgd", ensemble="loss")
    with pytest.raises(ConfigError, match="ti_kernel must be odd"):
        robustlab.get_attack("transfer").cls(ti_kernel=4)
    with pytest.raises(ConfigError, match="needs a surrogate"):
        robustlab.attack(target, x, y, threat, method="transfer")


def test_surrogate_attacks_are_listed_apart() -> None:
    alone = {i.name for i in robustlab.list_attacks()}
    with_surrogate = {i.name for i in robustlab.list_attacks(surrogate=True)}
    assert {
        "transfer",
        "p-rgf",
        "rays-transfer",
        "hsja-transfer",
        "square-transfer",
        "p-rgf-transfer",
    } <= with_surrogate
    assert not (with_surrogate & alone) and "rays" in alone
    assert {i.name for i in robustlab.list_attacks(surrogate=None)} == alone | with_surrogate


@pytest.mark.parametrize("method", ["rays-transfer", "hsja-transfer"])
def test_hard_label_attacks_start_from_a_fooling_transfer_example(method: str) -> None:
    target, x, y = _batch(8, seed=4)
    y[0] = (y[0] + 1) % 10  # misclassified: done at the clean check
    threat = ThreatModel("linf", 0.3)
    counting = Counting(target)
    result = robustlab.attack(counting, x, y, threat, method=method, surrogate=target, queries=300, seed=0)
    plain = robustlab.attack(target, x, y, threat, method=method.split("-")[0], queries=300, seed=0)
    assert bool(result.success.all()) and int(result.queries[0]) == 1
    assert counting.rows == int(result.queries.sum()) + 8
    # clean check + the transfer query (+ for HSJA one blend step when rounding puts it a hair past eps)
    assert bool((result.queries[1:] <= 3).all()) and result.queries.sum() < plain.queries.sum()
    assert bool(threat.contains(result.x_adv, x).all())


@pytest.mark.parametrize("method", ["rays-transfer", "hsja-transfer"])
def test_hard_label_budget_with_a_useless_surrogate(method: str) -> None:
    target, x, y = _batch(4, seed=5)
    handle = LabelOracle(module_function(target), budget=25)
    threat = ThreatModel("linf", 0.02)
    result = robustlab.attack(handle, x, y, threat, method=method, surrogate=tiny_cnn(seed=3), queries=25, seed=0)
    assert bool((result.queries <= 25).all()) and bool(threat.contains(result.x_adv, x).all())


def test_rays_transfer_in_adbd_mode_searches_from_the_transfer_direction() -> None:
    target, x, y = _batch(6, seed=6)
    threat = ThreatModel("linf", 0.3)
    result = robustlab.attack(target, x, y, threat, method="rays-transfer", surrogate=target, queries=200,
                              mode="adbd", seed=0)  # fmt: skip
    assert result.queries.tolist() == [200] * 6
    assert bool((result.extras["boundary_distance"] <= 0.3 + 1e-6).all())


def test_square_transfer_starts_at_the_transfer_vertex() -> None:
    target, x, y = _batch(8, seed=7)
    threat = ThreatModel("linf", 0.3)
    result = robustlab.attack(target, x, y, threat, method="square-transfer", surrogate=target, queries=100, seed=0)
    assert bool(result.success.all()) and result.queries.tolist() == [1] * 8  # the start already fools it
    assert bool(threat.contains(result.x_adv, x).all())
    far = robustlab.attack(target, x, y, ThreatModel("l2", 0.3), method="square-transfer", surrogate=tiny_cnn(seed=9),
                           queries=30, seed=0)  # fmt: skip
    assert bool((far.queries <= 30).all()) and bool(ThreatModel("l2", 0.3).contains(far.x_adv, x).all())


def test_p_rgf_transfer_starts_at_the_transfer_example() -> None:
    target, x, y = _batch(8, seed=7)
    threat = ThreatModel("linf", 0.3)
    counting = Counting(target)
    result = robustlab.attack(counting, x, y, threat, method="p-rgf-transfer", surrogate=target, q=5, queries=100,
                              seed=0)  # fmt: skip
    assert bool(result.success.all()) and result.queries.tolist() == [1] * 8  # the start already fools it
    assert counting.rows == 8 + 8 + 1  # one query, one audit each, the class-count probe
    assert bool(threat.contains(result.x_adv, x).all())
    crafted = robustlab.attack(target, x, y, threat, method="transfer", surrogate=target, seed=0)
    assert torch.equal(result.x_adv, crafted.x_adv)  # the same crafting, same seed: the same start
    far_threat = ThreatModel("l2", 0.3)
    far = robustlab.attack(target, x, y, far_threat, method="p-rgf-transfer", surrogate=tiny_cnn(seed=9), q=4,
                           queries=40, seed=0)  # fmt: skip
    assert bool((far.queries <= 40).all()) and bool(far_threat.contains(far.x_adv, x).all())
    assert torch.equal(far.success, target(far.x_adv).argmax(1) != y)
    with pytest.raises(ConfigError, match="needs a surrogate"):
        robustlab.attack(target, x, y, threat, method="p-rgf-transfer")


def test_evaluate_with_surrogates_opens_a_black_box_cascade_with_transfer_and_p_rgf() -> None:
    from robustlab import ScoreOracle, evaluate
    from robustlab.evaluation import Suite

    target, x, y = _batch(12, seed=8)
    threat = ThreatModel("linf", 0.3)
    scores = ScoreOracle(module_function(target))
    result = evaluate(scores, (x, y), threat, "quick", surrogates=[target], progress=False, batch_size=6)
    methods = [step.method for step in result.steps]
    assert methods[:2] == ["transfer", "p-rgf"]
    assert result.steps[0].broken > 0  # the target is its own surrogate: transfer breaks most of them at once
    broken = result.broken
    assert torch.equal(broken, (target(result.adversarial).argmax(1) != result.clean_pred) & broken)
    rays = Suite.custom([("rays", {"queries": 30})])
    labels_only = evaluate(LabelOracle(module_function(target)), (x, y), threat, rays, surrogates=[target],
                           progress=False)  # fmt: skip
    assert [s.method for s in labels_only.steps] == ["transfer", "rays"]
    with pytest.raises(ConfigError, match="black-box evaluations"):
        evaluate(target, (x, y), threat, "quick", surrogates=[target], progress=False)


def test_candidates_are_asked_in_turn_until_one_fools_the_target() -> None:
    target, x, y = _batch(12, seed=11)
    threat = ThreatModel("linf", 0.1)
    surrogate = [tiny_cnn(seed=1)]
    one = robustlab.attack(target, x, y, threat, method="transfer", surrogate=surrogate, seed=0)
    counting = Counting(target)
    three = robustlab.attack(counting, x, y, threat, method="transfer", surrogate=surrogate, candidates=3, seed=0)
    queries = three.queries
    assert counting.rows == int(queries.sum()) + 12  # one query per candidate asked, one audit each
    assert bool((queries >= 1).all()) and bool((queries <= 3).all())
    assert torch.equal(queries, three.extras["candidates_asked"])
    assert bool(three.success[queries < 3].all())  # an example stops asking once a candidate fools the target
    # The first candidate is the single-candidate attack's: what it fooled is fooled after one query.
    assert bool(three.success[one.success].all()) and bool((queries[one.success] == 1).all())
    assert int(three.success.sum()) >= int(one.success.sum())
    assert torch.equal(three.success, target(three.x_adv).argmax(1) != y)
    assert bool(threat.contains(three.x_adv, x).all())
    with pytest.raises(ConfigError, match="input diversity"):
        robustlab.attack(target, x, y, threat, method="transfer", surrogate=surrogate, candidates=2, di_prob=0.0)


@pytest.mark.parametrize("method", ["rays-transfer", "hsja-transfer", "square-transfer", "p-rgf-transfer"])
def test_attacks_from_several_candidates_count_every_query(method: str) -> None:
    target, x, y = _batch(6, seed=12)
    counting = Counting(target)
    threat = ThreatModel("linf", 0.05)
    options: dict[str, Any] = {"q": 4} if method == "p-rgf-transfer" else {}
    result = robustlab.attack(counting, x, y, threat, method=method, surrogate=tiny_cnn(seed=3), candidates=3,
                              queries=30, seed=0, **options)  # fmt: skip
    assert bool((result.queries <= 30).all()) and bool(threat.contains(result.x_adv, x).all())
    assert bool((result.queries >= 3).all())  # this surrogate fools nothing: three candidates asked each
    probe = 1 if method in ("square-transfer", "p-rgf-transfer") else 0  # the score attacks' class-count probe
    assert counting.rows == int(result.queries.sum()) + 6 + probe  # every query counted, one audit each
    assert torch.equal(result.success, target(result.x_adv).argmax(1) != y)


def test_square_transfer_start_keeps_the_pixels_the_transfer_left_unchanged() -> None:
    target, x, y = _batch(6, seed=13)
    x[:, :, :2] = 0.0  # a dark band: a step that darkens it is clipped by the box
    threat = ThreatModel("linf", 0.05)
    surrogate = tiny_cnn(seed=5)
    crafted = robustlab.attack(target, x, y, threat, method="transfer", surrogate=surrogate, seed=0)
    candidate = crafted.extras["transfer_candidate"]
    start = robustlab.attack(target, x, y, threat, method="square-transfer", surrogate=surrogate, queries=1, seed=0)
    vertex = (x + threat.eps * torch.sign(candidate - x)).clamp(0, 1)
    assert torch.equal(start.x_adv, vertex)
    unchanged = candidate == x
    assert bool(unchanged.any()) and torch.equal(start.x_adv[unchanged], x[unchanged])


def test_p_rgf_transfer_restarts_in_place_then_at_the_clean_input_then_at_random() -> None:
    from robustlab.attacks.transfer_start import PRGFTransfer

    attack = PRGFTransfer(surrogate=tiny_cnn(seed=1))
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    threat = ThreatModel("linf", 0.1)
    stalled = threat.project(x + 0.1 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(1))), x)
    done = torch.tensor([1, 0, 1, 2])
    restart = attack._restart(x, stalled, done, threat, torch.Generator().manual_seed(0))
    assert torch.equal(restart[1], stalled[1])  # first: in place, its faces judged afresh
    assert torch.equal(restart[done == 1], x[done == 1])  # second: the clean input
    assert bool(threat.contains(restart, x).all()) and not torch.equal(restart[3], x[3])
    assert not torch.equal(restart[3], stalled[3])  # later: a random point of the ball


@pytest.mark.parametrize("budget", [1, 2])
@pytest.mark.parametrize("method", ["square-transfer", "p-rgf-transfer"])
def test_candidates_stop_at_the_budget(method: str, budget: int) -> None:
    from robustlab import ScoreOracle

    target, x, y = _batch(4, seed=14)
    handle = ScoreOracle(module_function(target), budget=budget)  # any query past it raises
    result = robustlab.attack(handle, x, y, ThreatModel("linf", 0.02), method=method, surrogate=tiny_cnn(seed=3),
                              candidates=3, queries=budget, seed=0)  # fmt: skip
    assert result.queries.tolist() == [budget] * 4  # the candidates asked, no more


class _Unfoolable(nn.Module):
    """The same scores for every input (class 0 first, then 3, 1, 2); keeps every input it is asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return torch.tensor([5.0, 1.0, 0.0, 3.0]).expand(x.shape[0], 4).clone()


@pytest.mark.parametrize("method", ["square-transfer", "p-rgf-transfer"])
def test_class_candidates_aim_at_the_targets_strongest_other_classes_in_turn(method: str) -> None:
    from robustlab import ScoreOracle

    linear = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(10 * torch.eye(4))  # class k wherever pixel k is the brightest
    surrogate = nn.Sequential(nn.Flatten(), linear)
    x = torch.tensor([[0.9, 0.3, 0.3, 0.3], [0.7, 0.2, 0.4, 0.5]]).reshape(2, 1, 2, 2)
    y = torch.tensor([0, 0])
    threat = ThreatModel("linf", 0.5)
    target = _Unfoolable()
    result = robustlab.attack(ScoreOracle(module_function(target)), x, y, threat, method=method, surrogate=surrogate,
                              class_candidates=3, queries=4, seed=0)  # fmt: skip
    assert result.queries.tolist() == [4, 4]  # one untargeted candidate, then three aimed ones: the whole budget
    asked = target.seen[1:-1]  # after the class-count probe, before the audit
    assert len(asked) == 4 and all(len(points) == 2 for points in asked)
    assert bool(all(threat.contains(points, x).all() for points in asked))
    aimed = [surrogate(points).argmax(1).tolist() for points in asked[1:]]
    assert aimed == [[3, 3], [1, 1], [2, 2]]  # the target's order at the start (3, 1, 2), not the surrogate's
    targeted = _Unfoolable()
    robustlab.attack(ScoreOracle(module_function(targeted)), x, y, threat, method=method, surrogate=surrogate,
                     class_candidates=3, queries=4, seed=0, targets=torch.tensor([2, 2]))  # fmt: skip
    assert all(surrogate(points).argmax(1).tolist() != [3, 3] for points in targeted.seen)  # no aimed candidates
    with pytest.raises(ConfigError, match="class_candidates"):
        robustlab.attack(target, x, y, threat, method=method, surrogate=surrogate, class_candidates=-1)
