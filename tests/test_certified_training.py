"""IBP certified training: worst-case logits, schedules, and a run that makes examples verifiable."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import robustlab
from robustlab.certification import margin_bounds, verify
from robustlab.data import ArrayDataset
from robustlab.models import build_model
from robustlab.training import TrainConfig, train
from robustlab.training.objectives.ibp import IBPTraining, worst_case_logits


def test_worst_case_logits_layout() -> None:
    margins = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    logits = worst_case_logits(margins, torch.tensor([0, 2]))
    assert torch.equal(logits, torch.tensor([[0.0, -1.0, -2.0], [-3.0, 4.0, 0.0]]))


def test_schedule_ramps_eps_and_kappa() -> None:
    objective = IBPTraining(robustlab.ThreatModel("linf", 0.2), warmup=0.2, ramp=0.6, kappa_end=0.5)
    assert objective.schedule(0.1) == (0.0, 1.0, 1.0)
    eps, kappa, beta = objective.schedule(0.4)
    assert abs(eps - 0.1) < 1e-12 and abs(kappa - 0.75) < 1e-12 and abs(beta - 0.5) < 1e-12
    assert objective.schedule(0.9)[:2] == (0.2, 0.5)


def test_ibp_training_makes_examples_verifiable() -> None:
    data = robustlab.load_dataset("digits", split="train")
    test = robustlab.load_dataset("digits", split="test")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    threat = robustlab.ThreatModel("linf", 0.05)
    before = float(verify(model.eval(), test.x, test.y, threat, "ibp").float().mean())
    config = TrainConfig(epochs=6, batch_size=32, optimizer="adam", lr=3e-3, schedule="constant", select="last",
                         val_examples=100, val_attack_steps=3)  # fmt: skip
    result = train(model, data, "ibp", threat, config, progress=False, warmup=0.1, ramp=0.5)
    after_ibp = float(verify(result.model, test.x, test.y, threat, "ibp").float().mean())
    after_crown = float(verify(result.model, test.x, test.y, threat, "crown").float().mean())
    assert before < 0.05
    assert after_ibp > 0.5
    assert after_crown >= after_ibp


@pytest.mark.parametrize(("arch", "bounds"), [("preactresnet18", "ibp"), ("wideresnet", "crown-ibp")])
def test_certified_training_runs_on_residual_networks(arch: str, bounds: str) -> None:
    """Residual networks with BatchNorm (``robustlab train --method ibp --arch preactresnet18``): their IBP bounds
    explode at the usual initialization, the objective re-initializes them (Shi et al.), and training then runs with
    finite losses and useful bounds."""
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(10, 3, 32, 32, generator=g), torch.randint(0, 10, (10,), generator=g), "noise", 10)
    threat = robustlab.ThreatModel("linf", 2 / 255)
    config = TrainConfig(epochs=1, batch_size=8, optimizer="adam", lr=1e-3, schedule="constant", select="last",
                         val_fraction=0.2, val_examples=2, val_attack_steps=1)  # fmt: skip
    torch.manual_seed(1)
    model = build_model(arch, depth=16, widen_factor=1) if arch == "wideresnet" else build_model(arch)
    before = margin_bounds(model.eval(), data.x[:4], data.y[:4], threat, "ibp").margins.detach()
    assert float(before.abs().median()) > 1e4
    with pytest.warns(RuntimeWarning, match="IBP initialization"):
        result = train(model, data, "ibp", threat, config, progress=False, warmup=0.0, ramp=0.01, bounds=bounds)
    losses = result.history["train_loss"]
    assert losses and all(math.isfinite(v) for v in losses)
    after = margin_bounds(result.model.eval(), data.x[:4], data.y[:4], threat, "ibp").margins.detach()
    assert float(after.abs().max()) < 1e3
