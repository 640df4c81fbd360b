"""IBP certified training: worst-case logits, schedules, and a run that makes examples verifiable."""

from __future__ import annotations

import torch
from torch import nn

import robustlab
from robustlab.certification import verify
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
