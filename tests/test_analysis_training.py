"""The training loop's input-gradient norm (issue 27): logged per epoch next to the weight-gradient norm."""

from __future__ import annotations

import math

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
