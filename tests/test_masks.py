"""Stacked gradient masks (issue 24): the usefulness check, module probing, votes, and evaluations of models built to
combine masks, each against the truth (the underlying plain model attacked directly)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import robustlab
from robustlab.attacks.registry import get_attack
from robustlab.errors import ModelError
from robustlab.evaluation import Suite, evaluate
from robustlab.evaluation.adapt import _label_preserving_output
from robustlab.evaluation.usefulness import (
    flip_rate,
    gradient_usefulness,
    non_differentiable_modules,
    votes_for,
)
from robustlab.evaluation.wrappers import (
    ExpectationOverTransformation,
    MajorityVote,
    NoiseSmoothedGradient,
    draws_per_query,
)
from robustlab.oracles import Access
from tests.test_evaluation import Misleading, data, linear_net

THREAT = robustlab.ThreatModel("linf", 0.1)
CHEAP = Suite.custom([("apgd", {"steps": 20})])


class Noise(nn.Module):
    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x)


class Round(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 3) / 3


class OneHot(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(z.argmax(1), z.shape[1]).to(z.dtype)


class Oscillating(nn.Module):
    """Randomness plus a small, fast oscillation added to the logits: large gradients that predict nothing."""

    u: torch.Tensor

    def __init__(self, sigma: float = 0.01) -> None:
        super().__init__()
        self.net = linear_net()
        self.noise = Noise(sigma)
        self.register_buffer("u", torch.randn(10, 36, generator=torch.Generator().manual_seed(5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.noise(x)) + 0.05 * torch.sin(300 * x.flatten(1) @ self.u.T)


class Rippled(nn.Module):
    """A deterministic model whose gradient still predicts the loss, but less well than it should: a ripple of
    amplitude 0.01 on the logits steers every sign step while the loss barely feels it."""

    u: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.net = linear_net()
        self.register_buffer("u", torch.randn(10, 36, generator=torch.Generator().manual_seed(5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + 0.01 * torch.sin(300 * x.flatten(1) @ self.u.T)


class QuantizedNoisy(nn.Module):
    """An input quantizer (zero gradients) followed by noise."""

    def __init__(self, sigma: float = 0.01) -> None:
        super().__init__()
        self.quantize = Round()
        self.noise = Noise(sigma)
        self.net = linear_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.noise(self.quantize(x)))


class Quantized(nn.Module):
    """QuantizedNoisy without the noise: the plain model whose robust accuracy is the truth."""

    def __init__(self) -> None:
        super().__init__()
        self.quantize = Round()
        self.net = linear_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.quantize(x))


class OneHotNoisy(nn.Module):
    """A one-hot output (no gradient at all) of a model behind input noise."""

    def __init__(self, sigma: float = 0.01) -> None:
        super().__init__()
        self.noise = Noise(sigma)
        self.net = linear_net()
        self.onehot = OneHot()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.onehot(self.net(self.noise(x)))


def labels_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def test_usefulness_tells_useful_from_misleading_gradients() -> None:
    x, _ = data(40)
    plain = gradient_usefulness(linear_net(), x, labels_of(linear_net(), x), THREAT)
    assert plain.useful and plain.correlation > 0.9 and plain.worse_than_random == 0.0
    # A reversed gradient: the step along it loses to random steps everywhere.
    reversed_ = gradient_usefulness(Misleading().eval(), x, labels_of(linear_net(), x), THREAT)
    assert not reversed_.useful and reversed_.worse_than_random > 0.9 and reversed_.correlation < 0
    # A fast oscillation: large gradients, no better than random (deterministic here: sigma 0).
    oscillating = Oscillating(sigma=0.0).eval()
    verdict = gradient_usefulness(oscillating, x, labels_of(oscillating, x), THREAT)
    assert not verdict.useful
    # Noise smoothing at the eps scale averages the oscillation away and makes them useful again.
    smoothed = NoiseSmoothedGradient(oscillating, 0.025, 8)
    assert gradient_usefulness(smoothed, x, labels_of(oscillating, x), THREAT).useful
    # A confident model: cross-entropy gradients are exactly zero, the margin's are fine.
    confident = nn.Sequential(linear_net(), Scale(1e4)).eval()
    labels = labels_of(confident, x)
    assert gradient_usefulness(confident, x, labels, THREAT, loss="ce").zero > 0.5
    assert gradient_usefulness(confident, x, labels, THREAT).useful


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.factor


def test_probing_finds_the_non_differentiable_modules_only() -> None:
    x, _ = data(16)
    assert [p.name for p in non_differentiable_modules(QuantizedNoisy().eval(), x)] == ["quantize"]
    assert [p.name for p in non_differentiable_modules(OneHotNoisy().eval(), x)] == ["onehot"]
    smooth = nn.Sequential(nn.Flatten(), nn.Linear(36, 36), nn.ReLU(), nn.Tanh(), Noise(0.1), nn.Linear(36, 10))
    assert non_differentiable_modules(smooth.eval(), x) == []


def test_votes_and_draw_counts() -> None:
    assert votes_for(0.0) == 1
    rate = 0.1
    n = votes_for(rate)
    assert n % 2 == 1 and n >= math.log(100) / (2 * 0.4**2)
    assert votes_for(rate, minimum=31) == 31 and votes_for(0.49) == 101
    x, _ = data(8)
    noisy = OneHotNoisy(sigma=0.0).eval()
    vote = MajorityVote(noisy, 5)
    assert torch.equal(vote(x).argmax(1), labels_of(linear_net(), x))
    assert torch.allclose(vote(x).sum(1), torch.full((8,), 5.0), atol=0.01)  # vote counts (+ a tie-breaker)
    assert flip_rate(linear_net(), x) == 0.0 and flip_rate(OneHotNoisy(sigma=0.5).eval(), x) > 0
    assert draws_per_query(ExpectationOverTransformation(MajorityVote(noisy, 3), 4)) == 12
    assert draws_per_query(NoiseSmoothedGradient(linear_net(), 0.1, 8)) == 9


def fired(result: robustlab.evaluation.EvaluationResult) -> set[str]:
    return {d.name for d in result.diagnostics if d.fired}


def test_plain_confident_model_triggers_no_gradient_free_escalation() -> None:
    x, y = data(40)
    confident = nn.Sequential(linear_net(), Scale(1e4)).eval()
    result = evaluate(confident, (x, y), THREAT, CHEAP, progress=False, extra_queries=300)
    truth = evaluate(linear_net(), (x, y), THREAT, CHEAP, progress=False)
    assert "gradients" in fired(result) and "gradient_usefulness" not in fired(result)
    methods = {s.method for s in result.steps}
    assert methods == {"apgd"}  # APGD-CE and the margin tier; no Square, no RayS
    assert result.robust_accuracy <= truth.robust_accuracy + 1e-9
    assert result.tried_hard["scores"] == 0.0 and result.tried_hard["labels"] == 0.0
    assert "no gradient-free escalation" in next(d for d in result.diagnostics if d.name == "gradients").action


def truth_of(plain: nn.Module, x: torch.Tensor, y: torch.Tensor, bpda: tuple[str, ...] = ()) -> float:
    strong = Suite.custom([("apgd", {"steps": 50}), ("apgd-t", {"steps": 50, "n_target_classes": 9})])
    return evaluate(plain, (x, y), THREAT, strong, progress=False, diagnostics=False, bpda=bpda).robust_accuracy


def masked_evaluation(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> robustlab.evaluation.EvaluationResult:
    torch.manual_seed(0)  # the models' noise
    return evaluate(model.eval(), (x, y), THREAT, CHEAP, progress=False, extra_queries=300, eot_samples=4)


def test_randomness_plus_oscillating_logits_is_evaluated_near_the_truth() -> None:
    x, y = data(100)
    result = masked_evaluation(Oscillating(), x, y)
    assert {"randomized", "gradient_usefulness"} <= fired(result)
    truth = truth_of(linear_net(), x, y)
    assert abs(result.robust_accuracy - truth) <= 0.05, (result.robust_accuracy, truth)
    naive = evaluate(Oscillating().eval(), (x, y), THREAT, CHEAP, progress=False, diagnostics=False)
    assert naive.robust_accuracy > truth + 0.1  # the masks do fool a plain gradient attack


def test_a_gradient_useful_only_once_smoothed_is_smoothed_and_evaluated_near_the_truth() -> None:
    x, y = data(100)
    rippled = Rippled().eval()
    raw = gradient_usefulness(rippled, x[:64], labels_of(rippled, x[:64]), THREAT)
    assert raw.useful  # the plain check alone would pass it
    result = evaluate(rippled, (x, y), THREAT, CHEAP, progress=False, extra_queries=300)
    verdict = next(d for d in result.diagnostics if d.name == "gradient_usefulness")
    assert verdict.fired and "smoothed over Gaussian input noise" in verdict.action
    truth = truth_of(linear_net(), x, y)
    assert abs(result.robust_accuracy - truth) <= 0.05, (result.robust_accuracy, truth)
    naive = evaluate(rippled, (x, y), THREAT, CHEAP, progress=False, diagnostics=False)
    assert naive.robust_accuracy > truth + 0.1  # the ripple does fool a plain gradient attack
    # An ordinary model's gradient gains a few hundredths from smoothing at most: it is attacked as it is.
    plain = evaluate(linear_net(), (x, y), THREAT, CHEAP, progress=False)
    assert "gradient_usefulness" not in fired(plain)


def test_quantizer_plus_noise_is_evaluated_near_the_truth() -> None:
    x, y = data(100)
    result = masked_evaluation(QuantizedNoisy(), x, y)
    assert {"randomized", "gradient_usefulness"} <= fired(result)
    action = next(d for d in result.diagnostics if d.name == "gradient_usefulness").action
    assert "'model.quantize' found by probing" in action
    truth = truth_of(Quantized().eval(), x, y, bpda=("quantize",))
    assert abs(result.robust_accuracy - truth) <= 0.05, (result.robust_accuracy, truth)


def test_one_hot_output_behind_noise_is_evaluated_near_the_truth() -> None:
    x, y = data(100)
    result = masked_evaluation(OneHotNoisy(), x, y)
    # The noise seldom shows through a one-hot output; it shows in the logits the output layer hid.
    assert {"randomized", "gradient_usefulness"} <= fired(result)
    randomized = next(d for d in result.diagnostics if d.name == "randomized")
    assert "under the removed output layer" in randomized.evidence and "majority" in randomized.action
    truth = truth_of(linear_net(), x, y)
    assert abs(result.robust_accuracy - truth) <= 0.05, (result.robust_accuracy, truth)
    action = next(d for d in result.diagnostics if d.name == "gradient_usefulness").action
    assert "onehot' removed" in action  # attacks saw the logits; the real model judged


class ShiftedOneHot(nn.Module):
    """A one-hot output that is not the argmax of what comes before it: removing it would change every label."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot((z.argmax(1) + 1) % z.shape[1], z.shape[1]).to(z.dtype)


def test_an_output_layer_is_removed_only_when_the_labels_survive_its_removal() -> None:
    x, _ = data(64)
    hiding = nn.Sequential(linear_net(), OneHot()).eval()
    remapping = nn.Sequential(linear_net(), ShiftedOneHot()).eval()
    labels = labels_of(hiding, x)
    removed = _label_preserving_output(hiding, x, labels, ["1"])
    assert removed is not None and torch.equal(labels_of(removed[0], x), labels)
    assert _label_preserving_output(remapping, x, labels_of(remapping, x), ["1"]) is None
    assert _label_preserving_output(hiding, x, labels, ["0"]) is None  # not the output layer: BPDA's business
    # Evaluated, the remapping model keeps its one-hot (BPDA), and every success is judged by its own labels.
    y = labels_of(remapping, x)
    result = masked_evaluation(remapping, x, y)
    action = next(d for d in result.diagnostics if d.name == "gradient_usefulness").action
    assert "removed" not in action
    assert result.robust_accuracy >= truth_of(linear_net(), x, labels_of(linear_net(), x)) - 0.05


class InlineArgmax(nn.Module):
    """A one-hot output computed inline in forward: no module for BPDA to route around, no gradient anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.net = linear_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)


def test_a_model_no_gradient_reaches_is_attacked_by_queries_only() -> None:
    x, y = data(30)
    with pytest.raises(ModelError, match="no gradient with respect to its input"):
        robustlab.attack(InlineArgmax().eval(), x, y, THREAT, "pgd")  # one line naming the cause, not autograd's
    standard = Suite.custom([("apgd", {"steps": 20}), ("square", {"queries": 300})])
    result = evaluate(InlineArgmax().eval(), (x, y), THREAT, standard, progress=False, extra_queries=300)
    assert "no_gradient" in fired(result)
    assert all(get_attack(s.method).access is not Access.GRADIENT for s in result.steps)
    truth = truth_of(linear_net(), x, y)
    assert truth <= result.robust_accuracy <= truth + 0.1, (result.robust_accuracy, truth)
    with pytest.raises(ModelError, match="no gradient with respect to its input"):  # no checks: nothing adapts
        evaluate(InlineArgmax().eval(), (x, y), THREAT, CHEAP, progress=False, diagnostics=False)
