"""Training methods inside the loop: exact resume of per-example and adaptive state, catastrophic overfitting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import robustlab
from robustlab.training import TrainConfig, train


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Many small forward/backward passes: on two busy cores a second intra-op thread mostly waits for the other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        {"epoch": 1, "method": "fast-at", "val_pgd_accuracy": 0.01, "best_val_pgd_accuracy": 0.6,
         "val_fgsm_accuracy": 0.7, "action": "warn"}
    )  # fmt: skip
    report = Report("training")
    training_section(report, {"standard": first, "Fast-AT": second})
    _, html_path = report.write(tmp_path)
    page = html_path.read_text()
    assert page.count("<img") == 5 + 1 and "Catastrophic overfitting detected" in page and "Fast-AT, epoch 2" in page
    # The +1: the robust-overfitting gap plot (issue 27). The appended event has no kept weights: no landscape.
    assert "Robust overfitting and hard instances" in page and "collapse_landscape" not in report.data
    assert set(report.data["training"]) == {"standard", "Fast-AT"}
    with pytest.raises(ValueError, match="at least one"):
        training_section(report, {})


def co_prone_model(seed: int) -> nn.Module:
    """A small BatchNorm CNN that learns MNIST within an epoch (and, trained with FGSM at eps 0.3, to fool FGSM)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 49, 10),
    )  # fmt: skip


def test_catastrophic_overfitting_criterion() -> None:
    from robustlab.training.loop import catastrophic_overfitting

    # A collapse from the peak (Wong et al.: a fall of 0.2) with FGSM accuracy staying up.
    assert catastrophic_overfitting(robust=0.05, peak=0.6, fgsm=0.7, drop=0.2)
    assert not catastrophic_overfitting(robust=0.45, peak=0.6, fgsm=0.7, drop=0.2)  # fell less than 0.2
    assert not catastrophic_overfitting(robust=0.30, peak=0.6, fgsm=0.35, drop=0.2)  # FGSM fell too: no CO
    # A collapsed state: PGD near zero, FGSM far above it (CO before the first validation).
    assert catastrophic_overfitting(robust=0.02, peak=0.04, fgsm=0.40, drop=0.2)
    assert not catastrophic_overfitting(robust=0.02, peak=0.04, fgsm=0.10, drop=0.2)  # nothing learned yet
    assert not catastrophic_overfitting(robust=0.29, peak=0.29, fgsm=0.41, drop=0.2)  # PGD-AT early on
    # A split: FGSM far above PGD at a moderate PGD level (Fast-AT at eps 0.3 in the training benchmark: PGD-10
    # 0.29 with FGSM 0.90; its test PGD-50-10 accuracy was 6.5%).
    assert catastrophic_overfitting(robust=0.29, peak=0.29, fgsm=0.90, drop=0.2)
    assert not catastrophic_overfitting(robust=0.58, peak=0.58, fgsm=0.87, drop=0.2)  # Fast-AT at eps 0.2, epoch 1


def test_co_detection_fires_on_fgsm_training_and_not_on_pgd_at() -> None:
    """FGSM training without random start at eps 0.3 on MNIST overfits to FGSM within the first epoch: validation
    FGSM accuracy 28-47% while PGD accuracy stays at 3-10% (seeds 0-2, checked). PGD-AT on the same data keeps FGSM
    within 15 points of PGD accuracy (18-40%) and raises no event."""
    from robustlab.report import Report
    from robustlab.training.report import collapse_landscape_section

    data = robustlab.load_dataset("mnist", split="train").head(1000)
    threat = robustlab.ThreatModel("linf", 0.3)
    base = dict(epochs=2, batch_size=16, optimizer="adam", lr=3e-3, weight_decay=0.0, schedule="constant",
                val_examples=200, val_attack_steps=5)  # fmt: skip
    for seed in (0, 1, 2):
        config = TrainConfig(**base, seed=seed)  # type: ignore[arg-type]
        with pytest.warns(UserWarning, match="catastrophic overfitting"):
            fgsm = train(co_prone_model(seed), data, "fast-at", threat, config, progress=False, random_start=False,
                         rel_step_size=1.0)  # fmt: skip
        assert fgsm.events and fgsm.events[-1]["val_pgd_accuracy"] < 0.1
        # Issue 27: the weights around the event are kept and the report draws the landscape: after the collapse,
        # PGD's direction reaches a higher loss within eps than the one-step direction FGSM training trusted.
        assert [c.epoch for c in fgsm.collapses] == [e["epoch"] for e in fgsm.events]
        report = Report("co")
        assert collapse_landscape_section(report, fgsm) is not None
        shown = next(iter(report.data["collapse_landscape"].values()))
        within = {
            name: max(
                loss
                for a, loss in zip(shown[name]["coords"][0], shown[name]["loss"], strict=True)
                if abs(a) <= 0.3 + 1e-6
            )
            for name in ("after, FGSM direction", "after, PGD direction")
        }
        assert within["after, PGD direction"] > within["after, FGSM direction"]
    for seed in (0, 1):
        config = TrainConfig(**base, seed=seed)  # type: ignore[arg-type]
        pgd = train(co_prone_model(seed), data, "pgd-at", threat, config, progress=False, steps=3)
        assert pgd.events == [] and pgd.collapses == []
        assert collapse_landscape_section(Report("pgd"), pgd) is None
        assert pgd.history["val_pgd_accuracy"][-1] > 0.15  # PGD-AT is becoming robust in the same setting
