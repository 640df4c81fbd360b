"""The training loop: schedules, exact resume after an interruption, validation bookkeeping, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import robustlab
from robustlab.training import TrainConfig, lr_multiplier, train
from robustlab.training.objectives.base import Objective, ObjectiveConfig, StepContext, StepOutput


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(256, 10)
    )


@pytest.fixture(scope="module")
def digits() -> robustlab.ArrayDataset:
    return robustlab.load_dataset("digits", split="train").head(400)


CONFIG = TrainConfig(epochs=2, batch_size=32, lr=0.05, val_examples=40, val_attack_steps=3, schedule="cyclic")


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["pgd-at", "fast-at"])
def test_resume_after_interruption_reproduces_weights_exactly(digits, tmp_path: Path, method: str) -> None:
    threat = robustlab.ThreatModel("linf", 0.1)
    config = TrainConfig(**{**CONFIG.__dict__, "checkpoint_every": 4})
    options: dict[str, Any] = {"steps": 2} if method == "pgd-at" else {}
    reference = train(tiny_model(), digits, method, threat, config, progress=False, **options)

    def stop_at(step: int):
        def callback(info: dict) -> None:
            if info["step"] == step:
                raise Interrupt

        return callback

    # Killed mid-epoch (after the checkpoint at step 8, before the next), and again in the second epoch.
    for step in (9, 15):
        with pytest.raises(Interrupt):
            train(tiny_model(), digits, method, threat, config, checkpoint_dir=tmp_path, callbacks=[stop_at(step)],
                  progress=False, **options)  # fmt: skip
    resumed = train(tiny_model(), digits, method, threat, config, checkpoint_dir=tmp_path, progress=False, **options)
    for (name, a), (_, b) in zip(reference.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert reference.history["val_robust_accuracy"] == resumed.history["val_robust_accuracy"]


def test_history_and_selection(digits) -> None:
    result = train(tiny_model(), digits, "standard", robustlab.ThreatModel("linf", 0.1), CONFIG, progress=False)
    for key in ("train_loss", "val_clean_accuracy", "val_robust_accuracy", "val_fgsm_accuracy", "val_stability"):
        assert len(result.history[key]) == 2
    accuracies = result.history["val_robust_accuracy"]
    assert result.best_epoch == max(range(2), key=lambda e: (accuracies[e], -e))
    assert not result.model.training
    assert result.history["lr"][-1] == pytest.approx(0.0, abs=1e-9)  # the cyclic schedule ends at zero
    assert all(0 <= v <= 1 for v in result.history["val_stability"])


def test_schedules() -> None:
    piecewise = lr_multiplier("piecewise", milestones=(0.5, 0.75), decay=0.1)
    assert [piecewise(t) for t in (0.0, 0.49, 0.5, 0.8)] == pytest.approx([1, 1, 0.1, 0.01])
    cyclic = lr_multiplier("cyclic", peak=0.4)
    assert [cyclic(t) for t in (0.0, 0.2, 0.4, 0.7, 1.0)] == pytest.approx([0, 0.5, 1, 0.5, 0])
    cosine = lr_multiplier("cosine")
    assert [cosine(t) for t in (0.0, 0.5, 1.0)] == pytest.approx([1, 0.5, 0])
    warm = lr_multiplier("constant", warmup=0.2)
    assert [warm(t) for t in (0.0, 0.1, 0.2, 0.9)] == pytest.approx([0, 0.5, 1, 1])


class Recorder(Objective):
    """Records what the loop hands to an objective."""

    name = "recorder"
    Config = ObjectiveConfig
    adversarial = False

    def __init__(self, threat: robustlab.ThreatModel) -> None:
        super().__init__(threat)
        self.indices: list[torch.Tensor] = []

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: StepContext) -> StepOutput:
        self.indices.append(context.index.clone())
        assert model.training
        logits = model(x)
        return StepOutput(loss=nn.functional.cross_entropy(logits, y), logits_clean=logits.detach())


def test_custom_objective_sees_every_example_once_per_epoch(digits) -> None:
    recorder = Recorder(robustlab.ThreatModel("linf", 0.1))
    train(tiny_model(), digits, recorder, recorder.threat, CONFIG, progress=False)
    per_epoch = len(recorder.indices) // 2
    for epoch in range(2):
        seen = torch.cat(recorder.indices[epoch * per_epoch : (epoch + 1) * per_epoch])
        assert sorted(seen.tolist()) == list(range(360))  # 400 minus the 10% validation split


def test_bad_configuration_is_named(digits, tmp_path: Path) -> None:
    threat = robustlab.ThreatModel("linf", 0.1)
    with pytest.raises(robustlab.ConfigError, match="unknown training method 'pgdat'"):
        train(tiny_model(), digits, "pgdat", threat, CONFIG, progress=False)
    with pytest.raises(robustlab.ConfigError, match="unknown schedule 'linear'"):
        train(tiny_model(), digits, "standard", threat, TrainConfig(schedule="linear"), progress=False)
    with pytest.raises(robustlab.ConfigError, match="epochs must be a positive integer"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(robustlab.ConfigError, match=r"unknown option.*colour"):
        train(tiny_model(), digits, "pgd-at", threat, CONFIG, progress=False, colour=1)
    train(tiny_model(), digits, "standard", threat, CONFIG, checkpoint_dir=tmp_path, progress=False)
    other = TrainConfig(**{**CONFIG.__dict__, "epochs": 3})
    with pytest.raises(robustlab.ConfigError, match=r"cannot resume .* epochs"):
        train(tiny_model(), digits, "standard", threat, other, checkpoint_dir=tmp_path, progress=False)


def test_diverging_loss_is_reported(digits) -> None:
    threat = robustlab.ThreatModel("linf", 0.1)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train(tiny_model(), digits, "standard", threat, TrainConfig(epochs=1, lr=1e30, optimizer="sgd"), progress=False)
