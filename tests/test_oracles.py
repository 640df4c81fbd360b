"""Oracles: exact per-example query counting, budgets, access levels, model modes."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from torch import nn

from robustlab import GradientOracle, InvalidInputError, LabelOracle, QueryBudgetExceeded, ScoreOracle
from robustlab.goals import Goal
from robustlab.losses import attack_loss
from robustlab.oracles import Access, ModelError, module_function
from tests.toys import tiny_cnn


class CountingModel(nn.Module):
    """Records every row it is asked about, to check the oracle's books against the truth."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.rows_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows_seen += x.shape[0]
        return self.linear(x)


def test_counts_per_example_exactly() -> None:
    model = CountingModel()
    oracle = ScoreOracle(module_function(model)).bind(3, torch.device("cpu"))
    x = torch.rand(5, 4)
    oracle.scores(x, torch.tensor([0, 0, 2, 2, 2]))
    oracle.labels(x[:3])
    assert oracle.queries.tolist() == [3, 1, 4]
    assert model.rows_seen == 8 == oracle.total_queries


def test_budget_refused_before_evaluating() -> None:
    model = CountingModel()
    oracle = ScoreOracle(module_function(model), budget=2).bind(2, torch.device("cpu"))
    oracle.scores(torch.rand(2, 4), torch.tensor([0, 0]))
    with pytest.raises(QueryBudgetExceeded, match="budget of 2"):
        oracle.scores(torch.rand(1, 4), torch.tensor([0]))
    assert oracle.queries.tolist() == [2, 0]
    assert model.rows_seen == 2  # the refused query never reached the model
    assert oracle.remaining().tolist() == [0, 2]


def test_audits_are_outside_the_budget() -> None:
    oracle = LabelOracle(module_function(CountingModel()), budget=1).bind(2, torch.device("cpu"))
    oracle.labels(torch.rand(2, 4))
    oracle.audit_labels(torch.rand(2, 4))
    assert oracle.queries.tolist() == [1, 1]
    assert oracle.ledger.audits.tolist() == [1, 1]


@pytest.mark.parametrize("budget", [0, -3, 1.5, True])
def test_bad_budget(budget) -> None:
    with pytest.raises(InvalidInputError, match="budget must be a positive integer"):
        ScoreOracle(lambda x: x, budget=budget)


def test_label_oracle_hides_scores() -> None:
    oracle = LabelOracle(module_function(CountingModel())).bind(2, torch.device("cpu"))
    labels = oracle.labels(torch.rand(2, 4))
    assert labels.dtype == torch.long and labels.shape == (2,)
    assert not hasattr(oracle, "scores")
    assert oracle.access is Access.LABELS


def test_gradient_oracle_restores_modes_and_counts() -> None:
    model = tiny_cnn().train()
    model[2].eval()  # a mixed state must come back exactly as it was
    before = [m.training for m in model.modules()]
    oracle = GradientOracle(model).bind(4, torch.device("cpu"))
    seen_modes: list[bool] = []
    model.register_forward_hook(lambda m, i, o: seen_modes.append(m.training))
    x = torch.rand(4, 1, 6, 6)
    goal = Goal(torch.tensor([0, 1, 2, 3]))
    loss, logits, grad = oracle.loss_and_grad(x, goal, attack_loss("ce"))
    assert grad.shape == x.shape and loss.shape == (4,) and logits.shape == (4, 10)
    assert seen_modes == [False]
    assert [m.training for m in model.modules()] == before
    oracle.logits(x[:2], torch.tensor([1, 3]))
    assert oracle.gradients.tolist() == [1, 1, 1, 1]
    assert oracle.queries.tolist() == [1, 2, 1, 2]


@pytest.mark.parametrize("mode", ["eval", "keep"])
def test_weights_are_untracked_during_a_call_and_their_flags_come_back(mode: Literal["eval", "keep"]) -> None:
    model = tiny_cnn()
    frozen_by_user = next(model.parameters())
    frozen_by_user.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    assert before.count(True) >= 2
    tracked_during: list[bool] = []
    model.register_forward_hook(lambda m, i, o: tracked_during.append(any(p.requires_grad for p in m.parameters())))
    oracle = GradientOracle(model, mode=mode).bind(2, torch.device("cpu"))
    x = torch.rand(2, 1, 6, 6)
    _, _, grad = oracle.loss_and_grad(x, Goal(torch.tensor([0, 1])), attack_loss("ce"))
    assert tracked_during == [False] and bool(grad.abs().sum() > 0)
    assert [p.requires_grad for p in model.parameters()] == before
    # an exception inside a session restores them too
    with pytest.raises(RuntimeError, match="inside"), oracle.session():
        assert not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("inside")
    assert [p.requires_grad for p in model.parameters()] == before


def test_gradient_matches_autograd_per_example() -> None:
    model = tiny_cnn()
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    model = model.double()
    goal = Goal(torch.tensor([1, 2, 3]))
    oracle = GradientOracle(model).bind(3, torch.device("cpu"))
    _, _, grad = oracle.loss_and_grad(x, goal, attack_loss("ce"))
    for i in range(3):
        xi = x[i : i + 1].clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(model(xi), goal.labels[i : i + 1]).backward()
        assert xi.grad is not None
        assert torch.allclose(grad[i], xi.grad[0])


def test_model_errors() -> None:
    with pytest.raises(ModelError, match=r"nn\.Module"):
        GradientOracle(lambda x: x)  # type: ignore[arg-type]
    bad = ScoreOracle(lambda x: torch.full((x.shape[0], 3), float("nan"))).bind(1, torch.device("cpu"))
    with pytest.raises(ModelError, match="NaN"):
        bad.scores(torch.rand(1, 4))
    wrong = ScoreOracle(lambda x: torch.zeros(x.shape[0], 3), num_classes=10).bind(1, torch.device("cpu"))
    with pytest.raises(ModelError, match="returned 3 classes, expected 10"):
        wrong.scores(torch.rand(1, 4))
    flat = ScoreOracle(lambda x: torch.zeros(7)).bind(1, torch.device("cpu"))
    with pytest.raises(ModelError, match="shape"):
        flat.scores(torch.rand(1, 4))


def test_model_data_mismatch_is_named_in_evaluate_smoothing_and_black_box_use() -> None:
    """A model fed images of the wrong shape fails with one error naming the per-example shape, from every entry
    point that runs a local module (was torch's own "mat1 and mat2 shapes cannot be multiplied")."""
    import robustlab
    from robustlab.certification import RandomizedSmoothing

    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()  # made for 1x28x28 inputs
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    threat = robustlab.ThreatModel("linf", 0.1)
    expected = r"cannot take its inputs \(each of shape \(1, 8, 8\)\): its forward pass failed with: "
    with pytest.raises(InvalidInputError, match=expected):
        robustlab.evaluate(model, (x, y), threat, suite="quick", progress=False)
    with pytest.raises(InvalidInputError, match=expected):
        RandomizedSmoothing(model, num_classes=10, sigma=0.25).certify(x, n0=10, n=20, alpha=0.01)
    with pytest.raises(InvalidInputError, match=expected):
        robustlab.attack(model, x, y, threat, method="square", queries=10)
    with pytest.raises(InvalidInputError, match=expected):
        ScoreOracle(module_function(model)).bind(3, x.device).scores(x)


def test_out_of_memory_is_not_renamed_a_data_mismatch() -> None:
    """A caller may catch torch.OutOfMemoryError to retry with a smaller batch: it must pass through unchanged."""

    class OutOfMemory(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError):
        ScoreOracle(module_function(OutOfMemory())).bind(2, torch.device("cpu")).scores(torch.rand(2, 3))


def test_a_plain_score_function_failing_on_the_inputs_is_named_the_same_way() -> None:
    import robustlab

    def scores(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ torch.ones(784, 10)  # made for 1x28x28 inputs

    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(InvalidInputError, match=r"cannot take its inputs \(each of shape \(1, 8, 8\)\)"):
        robustlab.attack(ScoreOracle(scores), x, y, robustlab.ThreatModel("linf", 0.1), method="square", queries=10)
