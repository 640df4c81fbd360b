"""The training loop's input-gradient norm (issue 27): logged per epoch next to the weight-gradient norm."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab import ThreatModel
from robustlab.data import from_arrays
from robustlab.training import TrainConfig, train


def test_input_gradient_norm_is_in_the_history() -> None:
    torch.manual_seed(0)
    x = torch.rand(32, 1, 2, 2)
    y = torch.randint(0, 3, (32,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    threat = ThreatModel("linf", 0.1)
    config = TrainConfig(epochs=1, batch_size=16, stats_every=1, val_fraction=0.25, val_attack="pgd",
                         val_attack_steps=2, lr=0.05)  # fmt: skip
    result = train(model, from_arrays(x, y), "standard", threat, config, progress=False)
    logged = result.history["input_grad_norm"]
    assert len(logged) == 1 and math.isfinite(logged[0]) and logged[0] > 0


def test_input_gradient_norm_matches_a_hand_computation_for_one_full_batch() -> None:
    torch.manual_seed(1)
    x = torch.rand(20, 1, 2, 2)
    y = torch.randint(0, 2, (20,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    threat = ThreatModel("l2", 0.1)
    config = TrainConfig(epochs=1, batch_size=16, stats_every=1, val_fraction=0.2, val_attack="pgd",
                         val_attack_steps=1, lr=0.1, momentum=0.0, weight_decay=0.0)  # fmt: skip
    data = from_arrays(x, y)
    result = train(model, data, "standard", threat, config, progress=False)
    # One step on the 16 training examples (the batch is the whole training part): recompute with the final weights.
    from robustlab.training.data import split_training_data

    train_part, _ = split_training_data(data, None, 0.2, 0)
    from robustlab.data import read_batch

    xt, yt = read_batch(train_part, range(len(train_part)))
    point = xt.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(point), yt, reduction="sum"), point)
    expected = float(grad.reshape(len(grad), -1).norm(dim=1).mean())
    assert result.history["input_grad_norm"][0] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ robust overfitting and catastrophic overfitting
class Interrupt(Exception):
    pass


def _separable(count: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points in [0, 1]^4 labelled by a linear rule, some near the boundary (robust or not depending on the weights)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(count, 1, 2, 2, generator=generator)
    y = (x.reshape(count, -1) @ torch.tensor([1.0, -1.0, 0.5, -0.5]) > 0).long()
    return x, y


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 2))


LOOP = TrainConfig(epochs=3, batch_size=16, val_fraction=0.25, val_attack="pgd", val_attack_steps=3, lr=0.2,
                   schedule="constant", stats_every=100)  # fmt: skip


def test_validation_masks_match_the_robust_accuracy_and_drive_the_overfitting_section(tmp_path: Path) -> None:
    from robustlab.analysis.overfitting import generalization_gap
    from robustlab.report import Report
    from robustlab.training.report import training_section

    x, y = _separable()
    threat = ThreatModel("linf", 0.05)
    result = train(_linear(), from_arrays(x, y), "pgd-at", threat, LOOP, progress=False)
    masks = result.val_robust
    assert masks is not None and masks.epochs == [0, 1, 2] and masks.robust.shape == (3, 24)
    # Each epoch's mask is the per-example form of the validation robust accuracy the history records.
    assert masks.robust.float().mean(1).tolist() == pytest.approx(result.history["val_robust_accuracy"])
    report = Report("training")
    training_section(report, result)
    _, html_path = report.write(tmp_path)
    page = html_path.read_text()
    assert "Robust overfitting and hard instances" in page and "catastrophic overfitting" not in page.lower()
    data = report.data["robust_overfitting"]["run"]
    expected_flips = (masks.robust[1:] != masks.robust[:-1]).sum(0)
    assert data["flips_per_example"] == expected_flips.tolist()
    assert data["flips"]["examples_flipping"] == int((expected_flips > 0).sum())
    assert data["gap"] == pytest.approx(generalization_gap(result.history)["gap"])
    assert data["train_accuracy_on"] == "training attack" and "collapse_landscape" not in report.data


def _co_stub(fire_on_call: int) -> Callable[..., bool]:
    """A detector that fires on its ``fire_on_call``-th call only (counted across runs sharing it)."""
    calls: list[int] = []

    def detector(*_: float) -> bool:
        calls.append(1)
        return len(calls) == fire_on_call

    return detector


def test_collapse_weights_survive_a_mid_epoch_resume_and_the_report_shows_the_landscape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from robustlab.report import Report
    from robustlab.training.report import training_section
    from robustlab.training.state import CollapseWeights

    x, y = _separable()
    data, threat = from_arrays(x, y), ThreatModel("linf", 0.05)
    config = dataclasses.replace(LOOP, epochs=2, select="last", checkpoint_every=2)
    # Uninterrupted: the (stubbed) detector fires when the second epoch ends.
    monkeypatch.setattr("robustlab.training.loop.catastrophic_overfitting", _co_stub(2))
    with pytest.warns(UserWarning, match="catastrophic overfitting at epoch 2"):
        reference = train(_linear(), data, "fast-at", threat, config, checkpoint_dir=tmp_path / "a", progress=False)
    (collapse,) = reference.collapses
    assert collapse.epoch == 1 and len(collapse.y) == 8 and collapse.before is not None
    assert all(torch.equal(v, collapse.after[k]) for k, v in reference.model.state_dict().items())  # select="last"
    # Killed after a mid-epoch checkpoint of the second epoch (step 6 of 2 x 5), then resumed: the weights kept
    # before the event come from the state (the model there is already mid-epoch), and equal the reference's.
    monkeypatch.setattr("robustlab.training.loop.catastrophic_overfitting", _co_stub(2))

    def stop(info: dict[str, Any]) -> None:
        if info["step"] == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(_linear(), data, "fast-at", threat, config, checkpoint_dir=tmp_path / "b", callbacks=[stop],
              progress=False)  # fmt: skip
    with pytest.warns(UserWarning, match="catastrophic overfitting"):
        resumed = train(_linear(), data, "fast-at", threat, config, checkpoint_dir=tmp_path / "b", progress=False)
    (again,) = resumed.collapses
    assert collapse.before is not None and again.before is not None
    for weights, other in ((collapse.before, again.before), (collapse.after, again.after)):
        assert all(torch.equal(v, other[k]) for k, v in weights.items())
    assert resumed.val_robust is not None and reference.val_robust is not None
    assert torch.equal(collapse.x, again.x) and torch.equal(resumed.val_robust.robust, reference.val_robust.robust)
    # The file beside the state reads back weights-only, and a third run resuming the finished state reloads it.
    saved = CollapseWeights.load(tmp_path / "b" / CollapseWeights.file_name(1))
    assert all(torch.equal(v, saved.after[k]) for k, v in again.after.items())
    finished = train(_linear(), data, "fast-at", threat, config, checkpoint_dir=tmp_path / "b", progress=False)
    assert len(finished.collapses) == 1 and finished.collapses[0].epoch == 1
    report = Report("training")
    training_section(report, {"Fast-AT": resumed})
    _, html_path = report.write(tmp_path / "report")
    assert "Loss landscape around catastrophic overfitting" in html_path.read_text()
    shown = report.data["collapse_landscape"]["Fast-AT, epoch 2"]
    for name in ("before, FGSM direction", "before, PGD direction", "after, FGSM direction", "after, PGD direction"):
        assert len(shown[name]["loss"]) == 21
    assert shown["before, PGD direction"]["coords"][0][-1] == pytest.approx(2 * threat.eps)


def test_an_old_state_without_masks_resumes_with_an_empty_history(tmp_path: Path) -> None:
    x, y = _separable()
    data, threat = from_arrays(x, y), ThreatModel("linf", 0.05)

    def stop(info: dict[str, Any]) -> None:
        if info["step"] == 6:  # after the first epoch's checkpoint
            raise Interrupt

    with pytest.raises(Interrupt):
        train(_linear(), data, "pgd-at", threat, LOOP, checkpoint_dir=tmp_path, callbacks=[stop], progress=False)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    del state["val_robust"]  # as written before issue 27
    torch.save(state, tmp_path / "train_state.pt")
    result = train(_linear(), data, "pgd-at", threat, LOOP, checkpoint_dir=tmp_path, progress=False)
    assert result.val_robust is not None and result.val_robust.epochs == [1, 2]
    assert len(result.history["val_robust_accuracy"]) == 3


class _Payload:
    """Any object that only unpickling can rebuild."""


def test_collapse_files_are_read_weights_only(tmp_path: Path) -> None:
    from robustlab.errors import ConfigError, StateFileError
    from robustlab.training.state import CollapseWeights

    weights = {"w": torch.ones(2)}
    kept = CollapseWeights(3, None, weights, torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long))
    path = kept.save(tmp_path)
    assert path.name == "co_weights_epoch4.pt"
    back = CollapseWeights.load(path)
    assert back.epoch == 3 and back.before is None and torch.equal(back.after["w"], weights["w"])
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "robustlab-co-weights-v1", "after": _Payload()}, hostile)
    with pytest.raises(StateFileError):
        CollapseWeights.load(hostile)
    foreign = tmp_path / "foreign.pt"
    torch.save({"after": weights}, foreign)
    with pytest.raises(ConfigError, match="catastrophic-overfitting weights"):
        CollapseWeights.load(foreign)
