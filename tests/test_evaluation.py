"""The evaluation cascade, its diagnostics and its resumable state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import robustlab
import robustlab.evaluation.cascade as evaluate_module
from robustlab.evaluation import Suite, evaluate
from robustlab.evaluation.cascade import SQUARE_RESTARTS

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
    suite = Suite.custom([("pgd", {"steps": 4}), ("apgd", {"steps": 6})])
    reference = evaluate(model, (x, y), threat, suite, batch_size=16, diagnostics=False, progress=False)

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
    assert any("DLR" in label for label in labels) and any("Square" in label for label in labels)
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
    assert "gradients" in fired(masked)
    assert "black_box_beats_white_box" in fired(masked)  # Square/RayS broke what APGD could not
    # Its response: Square restarts while the last one still broke something, at most SQUARE_RESTARTS of them
    # (RayS is in the suite already, added by the gradients check).
    restarts = [s for s in masked.steps if s.added_by == "black_box_beats_white_box"]
    assert 1 <= len(restarts) <= SQUARE_RESTARTS and all(s.method == "square" for s in restarts)
    assert all(s.broken > 0 for s in restarts[:-1])
    assert restarts[-1].broken == 0 or len(restarts) == SQUARE_RESTARTS
    bpda = evaluate(Quantized().eval(), (x, y), threat, QUICK, progress=False, bpda=["quantize"])
    assert "gradients" not in fired(bpda)
    assert bpda.steps[0].broken > 0  # APGD through the straight-through backward pass breaks examples
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
