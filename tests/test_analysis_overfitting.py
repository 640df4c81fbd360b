"""Robust-overfitting tracking: the generalization gap from a history, and flips across checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab import ThreatModel
from robustlab.analysis.overfitting import generalization_gap, track_flips
from robustlab.errors import ConfigError


def test_generalization_gap_and_robust_overfitting() -> None:
    history = {
        "train_accuracy": [0.3, 0.5, 0.7, 0.9],
        "val_pgd_accuracy": [0.25, 0.4, 0.45, 0.35],
        "val_robust_accuracy": [0.2, 0.38, 0.44, 0.33],
    }
    gap = generalization_gap(history)
    assert gap["gap"] == pytest.approx([0.05, 0.1, 0.25, 0.55])
    assert gap["best_epoch"] == 3 and gap["robust_overfitting"] == pytest.approx(0.11)
    with pytest.raises(ConfigError):
        generalization_gap({"train_accuracy": [0.1]})


def _threshold_model(threshold: float) -> nn.Module:
    """Two classes on a scalar input: class 1 when x > threshold (logits (0, 100 (x - threshold)))."""
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0], [100.0]]))
        model.bias.copy_(torch.tensor([0.0, -100.0 * threshold]))
    return model


def test_flips_across_checkpoints_match_the_distances_to_each_threshold() -> None:
    x = torch.tensor([[0.1], [0.45], [0.55], [0.9]])
    y = torch.tensor([0, 0, 1, 1])
    threat = ThreatModel("linf", 0.1)
    models = [_threshold_model(t) for t in (0.5, 0.6, 0.5)]
    record = track_flips(models, x, y, threat, steps=20)
    # Threshold 0.5: 0.45 and 0.55 lie within 0.1 of it (broken); threshold 0.6: 0.45 is 0.15 away (robust) and 0.55
    # is on the wrong side (misclassified).
    expected = torch.tensor([[True, False, False, True], [True, True, False, True], [True, False, False, True]])
    assert torch.equal(record.robust, expected)
    assert record.flips.tolist() == [0, 2, 0, 0]
    assert record.hard[:2] == [1, 2]
    assert record.summary()["never_robust"] == 1
    with pytest.raises(ConfigError):
        track_flips(models[:1], x, y, threat)


def test_flip_record_of_given_outcomes() -> None:
    from robustlab.analysis.overfitting import flip_record

    robust = torch.tensor([[True, False, True, False], [False, False, True, True], [True, False, True, False]])
    record = flip_record(robust, hard=3)
    assert record.flips.tolist() == [2, 0, 0, 2]
    # Most flips first (ties: fewer robust epochs first: example 3 was robust once, example 0 twice), then never.
    assert record.hard == [3, 0, 1]
    assert record.summary()["always_robust"] == 1
    with pytest.raises(ConfigError, match="boolean"):
        flip_record(robust.float())
