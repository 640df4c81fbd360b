"""The evaluation cascade, its diagnostics and its resumable state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import robustlab
import robustlab.evaluation.cascade as evaluate_module
from robustlab.evaluation import Suite, SuiteStep, evaluate
from robustlab.evaluation.cascade import SQUARE_RESTARTS
from robustlab.evaluation.suites import FOCUS_MINIMUM

THREAT = robustlab.ThreatModel("linf", 0.1)


def linear_net(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(36, 10)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(10, 36, generator=g))
        layer.bias.zero_()
    return nn.Sequential(nn.Flatten(), layer).eval()


def data(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g)
    y = linear_net()(x).argmax(1)
    y[::7] = (y[::7] + 1) % 10  # some misclassified examples
    return x, y


DETERMINISTIC = Suite.custom(
    [("fgsm", {}), ("pgd", {"steps": 5, "random_start": False}), ("mi-fgsm", {"steps": 5})], name="deterministic"
)


def test_cascade_is_at_least_as_strong_as_each_member() -> None:
    model = linear_net()
    x, y = data()
    threat = robustlab.ThreatModel("linf", 0.02)
    result = evaluate(model, (x, y), threat, DETERMINISTIC, diagnostics=False, progress=False)
    clean_pred = model(x).argmax(1)
    for step in DETERMINISTIC.steps:
        alone = robustlab.attack(model, x, clean_pred, threat, step.method, **dict(step.options))
        robust_alone = float(((clean_pred == y) & ~alone.success).float().mean())
        assert result.robust_accuracy <= robust_alone + 1e-9
    members = [
        robustlab.attack(model, x, clean_pred, threat, s.method, **dict(s.options)).success for s in DETERMINISTIC.steps
    ]
    union = torch.stack(members).any(dim=0)
    assert torch.equal(result.broken, union)  # the cascade keeps exactly the per-example worst case
    assert 0 < result.robust_accuracy < result.clean_accuracy  # the test can fail both ways
    assert result.steps[0].attacked == 40 and result.steps[1].attacked == 40 - result.steps[0].broken
    # Reported adversarial examples are valid and re-verified.
    assert bool(threat.contains(result.x_adv, x).all())
    assert torch.equal(model(result.x_adv).argmax(1) != clean_pred, result.broken)
    assert result.stability == pytest.approx(1 - float(result.broken.float().mean()))


class Interrupt(Exception):
    pass


def test_resume_after_a_kill_gives_the_same_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = linear_net()
    x, y = data(60)
    threat = robustlab.ThreatModel("linf", 0.03)
    # The focused last step picks its examples by the margins the first two left: they must survive the kill too.
    focused = SuiteStep("focused PGD", "pgd", {"steps": 8}, focus=0.3)
    suite = Suite.custom([("pgd", {"steps": 4}), ("apgd", {"steps": 6}), focused])
    reference = evaluate(model, (x, y), threat, suite, batch_size=16, diagnostics=False, progress=False)
    assert reference.steps[2].attacked < reference.steps[2].candidates

    real_attack = evaluate_module.run_attack
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # dies in the second attack, after some batches were saved
            raise Interrupt
        return real_attack(*args, **kwargs)

    state = tmp_path / "eval.pt"
    monkeypatch.setattr(evaluate_module, "run_attack", flaky)
    with pytest.raises(Interrupt):
        evaluate(model, (x, y), threat, suite, batch_size=16, diagnostics=False, progress=False, checkpoint=state)
    assert state.exists()
    monkeypatch.setattr(evaluate_module, "run_attack", real_attack)
    resumed = evaluate(model, (x, y), threat, suite, batch_size=16, diagnostics=False, progress=False, checkpoint=state)
    assert torch.equal(resumed.broken, reference.broken)
    assert torch.equal(resumed.x_adv, reference.x_adv)
    assert [s.broken for s in resumed.steps] == [s.broken for s in reference.steps]
    assert not state.exists()  # a finished evaluation leaves nothing to resume


def clean_margins(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(x).detach()
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def test_focused_step_attacks_only_the_weakest_examples() -> None:
    model = linear_net()
    x, y = data(60)
    threat = robustlab.ThreatModel("linf", 0.05)
    step = SuiteStep("focused FGSM", "fgsm", {}, focus=0.1)
    focused = evaluate(model, (x, y), threat, Suite("focused", (step,)), diagnostics=False, progress=False)
    everyone = evaluate(model, (x, y), threat, Suite.custom(["fgsm"]), diagnostics=False, progress=False)
    count = max(6, FOCUS_MINIMUM)  # 10% of 60, raised to the minimum
    assert focused.steps[0].candidates == 60 and focused.steps[0].attacked == count
    weakest = set(clean_margins(model, x).argsort()[:count].tolist())
    broken = set(focused.broken.nonzero().flatten().tolist())
    assert broken and broken <= weakest
    assert set(everyone.broken.nonzero().flatten().tolist()) - weakest  # unfocused, FGSM breaks others too
    with pytest.raises(robustlab.ConfigError, match="focus"):
        SuiteStep("bad", "fgsm", {}, focus=0.0)


def test_fresh_examples_skip_what_the_same_method_attacked() -> None:
    margins = torch.tensor([0.5, 0.1, 3.0, 0.2, 2.0, 0.3] * 5)
    steps = [evaluate_module.StepReport("sq", "square", {})]
    state = evaluate_module.CascadeState.start("test", 30, None, margins, steps)
    state.remaining_at_start[0] = torch.arange(16)
    unbroken = torch.arange(30)
    step = SuiteStep("wider", "square", {}, focus=0.5, fresh_examples=True)
    chosen = evaluate_module._select(step, 1, unbroken, state, margins_known=True)
    assert chosen.tolist() == list(range(16, 30))  # 15 wanted, only 14 not attacked yet
    narrow = SuiteStep("wider", "square", {}, focus=0.1, fresh_examples=True)
    picked = evaluate_module._select(narrow, 1, torch.arange(30), state, margins_known=True)
    assert len(picked) == 14  # the minimum (16) capped by what is left
    again = SuiteStep("same", "square", {}, focus=0.1)
    first = evaluate_module._select(again, 1, torch.arange(30), state, margins_known=True)
    assert sorted(margins[first].tolist()) == sorted(margins.sort().values[:16].tolist())
    assert evaluate_module._select(again, 1, unbroken, state, margins_known=False).tolist() == unbroken.tolist()


class _ReversedGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class Misleading(nn.Module):
    """Honest forward pass, input gradient pointing the wrong way: gradient attacks fail, the gradient looks fine."""

    def __init__(self) -> None:
        super().__init__()
        self.net = linear_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_ReversedGradient.apply(x))


def test_focused_square_widens_when_it_beats_the_gradient_attacks() -> None:
    x, y = data(60)
    threat = robustlab.ThreatModel("linf", 0.05)
    square = SuiteStep("Square (focused)", "square", {"queries": 200}, focus=0.1)
    suite = Suite("masked", (SuiteStep("APGD", "apgd", {"steps": 10}), square))
    result = evaluate(Misleading().eval(), (x, y), threat, suite, progress=False)
    assert "gradients" not in fired(result) and "black_box_beats_white_box" in fired(result)
    wider = [s for s in result.steps if s.added_by == "black_box_beats_white_box"]
    assert wider and all(s.method == "square" and "widened" in s.label for s in wider)
    assert all(s.broken > 0 for s in wider[:-1])
    assert wider[-1].broken == 0 or len(wider) == SQUARE_RESTARTS
    assert sum(s.attacked for s in result.steps[1:]) > result.steps[1].attacked  # reached more examples
    honest = evaluate(linear_net(), (x, y), threat, Suite.custom([("apgd", {"steps": 10})]), progress=False)
    assert 3 * result.steps[0].broken < honest.steps[0].broken  # the reversed gradient does mislead APGD


def fired(result: robustlab.evaluation.EvaluationResult) -> set[str]:
    return {d.name for d in result.diagnostics if d.fired}


QUICK = Suite.custom([("apgd", {"steps": 10})])


def test_plain_model_raises_no_flag() -> None:
    x, y = data(30)
    result = evaluate(linear_net(), (x, y), THREAT, QUICK, progress=False)
    assert fired(result) == set()


def test_saturated_logits_fire_the_gradient_check_and_the_suite_strengthens() -> None:
    class Saturated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = linear_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) * 1e4

    x, y = data(30)
    result = evaluate(Saturated().eval(), (x, y), THREAT, QUICK, progress=False, extra_queries=200)
    assert "gradients" in fired(result)
    labels = [s.label for s in result.steps]
    # Issue 24: the margin loss's gradients are fine, so the answer is a margin-loss attack, not Square and RayS.
    assert any("DLR" in label for label in labels) and not any("Square" in label for label in labels)
    plain = evaluate(linear_net(), (x, y), THREAT, QUICK, progress=False)
    assert result.robust_accuracy <= plain.robust_accuracy + 0.05  # the strengthened suite is not fooled


class Quantized(nn.Module):
    """Rounds its input to 4 levels first: zero gradients everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.quantize = Round()
        self.net = linear_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.quantize(x))


class Round(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 3) / 3


def test_quantizing_input_layer_is_caught_and_bpda_attacks_through_it() -> None:
    x, y = data(30)
    threat = robustlab.ThreatModel("linf", 0.2)
    masked = evaluate(Quantized().eval(), (x, y), threat, QUICK, progress=False, extra_queries=300)
    assert {"gradients", "gradient_usefulness"} <= fired(masked)
    # Issue 24: probing module by module finds the quantizer, and BPDA goes through it without being asked.
    usefulness = next(d for d in masked.diagnostics if d.name == "gradient_usefulness")
    assert "'quantize' found by probing" in usefulness.action
    assert masked.steps[0].broken > 0
    bpda = evaluate(Quantized().eval(), (x, y), threat, QUICK, progress=False, bpda=["quantize"])
    assert "gradients" not in fired(bpda)
    assert bpda.steps[0].broken > 0  # APGD through the straight-through backward pass breaks examples
    assert masked.robust_accuracy <= bpda.robust_accuracy + 0.05
    with pytest.raises(robustlab.ConfigError, match="no submodule named 'nope'"):
        evaluate(Quantized().eval(), (x, y), threat, QUICK, progress=False, bpda=["nope"])


def test_randomized_model_gets_eot() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = linear_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x + 0.05 * torch.randn_like(x))

    x, y = data(20)
    result = evaluate(Noisy().eval(), (x, y), THREAT, QUICK, progress=False, eot_samples=4)
    diagnostic = next(d for d in result.diagnostics if d.name == "randomized")
    assert diagnostic.fired and "EOT" in diagnostic.action


def test_train_mode_is_flagged_and_restored() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 10), nn.Dropout(0.5)).train()
    x, y = data(20)
    result = evaluate(model, (x, y), THREAT, QUICK, progress=False)
    assert "train_mode" in fired(result)
    assert "randomized" not in fired(result)  # evaluated in eval mode: dropout off
    assert model.training


def test_probabilities_are_detected_and_log_outputs_used() -> None:
    model = nn.Sequential(linear_net(), nn.Softmax(dim=1)).eval()
    x, y = data(20)
    result = evaluate(model, (x, y), THREAT, QUICK, progress=False)
    assert "probabilities" in fired(result)


def test_errors_are_named() -> None:
    x, y = data(5)
    with pytest.raises(robustlab.ConfigError, match="unknown suite 'strong'"):
        evaluate(linear_net(), (x, y), THREAT, "strong", progress=False)
    with pytest.raises(robustlab.ConfigError, match="unknown attack method"):
        Suite.custom(["pgd", "magic"])
    with pytest.raises(robustlab.InvalidInputError, match="outside the threat model's input bounds"):
        evaluate(linear_net(), (x * 10, y), THREAT, QUICK, progress=False)
