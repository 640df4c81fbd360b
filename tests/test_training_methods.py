"""Training methods inside the loop: exact resume of per-example and adaptive state, catastrophic overfitting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import robustlab
from robustlab.training import TrainConfig, train


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(256, 10)
    )


@pytest.fixture(scope="module")
def digits() -> robustlab.ArrayDataset:
    return robustlab.load_dataset("digits", split="train").head(400)


class Interrupt(Exception):
    pass


def stop_at(step: int):
    def callback(info: dict) -> None:
        if info["step"] == step:
            raise Interrupt

    return callback


@pytest.mark.parametrize(
    ("method", "options"),
    [
        # Warm-up in epoch 0, adaptive steps after, and a restart of every perturbation at epoch 1 (reset_every=2).
        ("atas", {"warmup_epochs": 1, "reset_every": 2}),
        ("war", {"zeta": 0.2, "steps": 2}),
    ],
)
def test_resume_reproduces_per_example_buffers_and_lambda(digits, tmp_path: Path, method: str, options: dict) -> None:
    threat = robustlab.ThreatModel("linf", 0.1)
    config = TrainConfig(
        epochs=3, batch_size=32, lr=0.05, val_examples=40, val_attack_steps=2, schedule="cyclic", checkpoint_every=4
    )
    reference = train(tiny_model(), digits, method, threat, config, progress=False, **options)
    # 12 steps per epoch: killed mid-epoch in each of the three epochs, after a checkpoint and before the next.
    for step in (9, 15, 30):
        with pytest.raises(Interrupt):
            train(tiny_model(), digits, method, threat, config, checkpoint_dir=tmp_path, callbacks=[stop_at(step)],
                  progress=False, **options)  # fmt: skip
    resumed = train(tiny_model(), digits, method, threat, config, checkpoint_dir=tmp_path, progress=False, **options)
    for (name, a), (_, b) in zip(reference.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert reference.history["val_robust_accuracy"] == resumed.history["val_robust_accuracy"]
    key = "mean_step_over_eps" if method == "atas" else "lambda"
    assert reference.history[key] == resumed.history[key]
    if method == "atas":  # warm-up at the constant step eps, then adaptive steps
        assert reference.history[key][0] == pytest.approx(1.0)
        assert reference.history[key][1] != pytest.approx(1.0)
    else:
        assert reference.history[key][-1] != 1.0  # lambda moved from its initial value


def test_resume_refuses_an_objective_state_of_another_size(digits, tmp_path: Path) -> None:
    threat = robustlab.ThreatModel("linf", 0.1)
    config = TrainConfig(epochs=1, batch_size=32, val_examples=20, val_attack_steps=1, checkpoint_every=4)
    with pytest.raises(Interrupt):
        train(tiny_model(), digits, "atas", threat, config, checkpoint_dir=tmp_path, callbacks=[stop_at(5)],
              progress=False)  # fmt: skip
    state = torch.load(tmp_path / "train_state.pt", weights_only=False)
    state["objective"]["delta"] = state["objective"]["delta"][:10]
    torch.save(state, tmp_path / "train_state.pt")
    with pytest.raises(robustlab.ConfigError, match="ATAS state holds perturbations shaped"):
        train(tiny_model(), digits, "atas", threat, config, checkpoint_dir=tmp_path, progress=False)


def test_training_section_plots_curves_and_lists_co_events(digits, tmp_path: Path) -> None:
    from robustlab.report import Report
    from robustlab.training.report import training_section

    threat = robustlab.ThreatModel("linf", 0.1)
    config = TrainConfig(epochs=2, batch_size=64, val_examples=30, val_attack_steps=1)
    first = train(tiny_model(), digits, "standard", threat, config, progress=False)
    second = train(tiny_model(), digits, "fast-at", threat, config, progress=False)
    second.events.append(
        {"epoch": 1, "method": "fast-at", "val_robust_accuracy": 0.01, "best_val_robust_accuracy": 0.6,
         "val_fgsm_accuracy": 0.7, "action": "warn"}
    )  # fmt: skip
    report = Report("training")
    training_section(report, {"standard": first, "Fast-AT": second})
    _, html_path = report.write(tmp_path)
    page = html_path.read_text()
    assert page.count("<img") == 4 and "Catastrophic overfitting detected" in page and "Fast-AT, epoch 2" in page
    assert set(report.data["training"]) == {"standard", "Fast-AT"}
    with pytest.raises(ValueError, match="at least one"):
        training_section(report, {})
