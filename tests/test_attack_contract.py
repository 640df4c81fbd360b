"""Contract every registered attack must honour, whatever its algorithm."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import robustlab
from robustlab import Access, ThreatModel
from robustlab.attacks.registry import AttackInfo
from tests.toys import tiny_cnn

EPS = {"linf": 0.1, "l2": 0.5, "l1": 2.0, "l0": 3.0}


def fast_options(info: AttackInfo) -> dict:
    """Few iterations so the contract runs in seconds."""
    names = {f.name for f in dataclasses.fields(info.cls.Config)}
    options = {}
    if "steps" in names:
        options["steps"] = 4
    if "restarts" in names:
        options["restarts"] = 2
    if "n_target_classes" in names:
        options["n_target_classes"] = 2
    return options


CASES = [
    (info, norm)
    for info in robustlab.list_attacks()
    for norm in sorted(n.value for n in info.norms)
    if info.access is Access.GRADIENT
]


@pytest.mark.parametrize(("info", "norm"), CASES, ids=[f"{i.name}-{n}" for i, n in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("targeted", [False, True])
def test_contract(info: AttackInfo, norm: str, dtype: torch.dtype, targeted: bool) -> None:
    if targeted and not info.supports_targeted:
        pytest.skip("untargeted only")
    model = tiny_cnn().to(dtype)
    model[2].train()  # a module left in train mode must come back in train mode
    modes = [m.training for m in model.modules()]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, 6, 6, generator=g, dtype=dtype)
    x[:, :, 0, 0] = 0.0  # pixels on the box faces
    x[:, :, 0, 1] = 1.0
    y = torch.randint(0, 10, (10,), generator=g)
    targets = (y + 1) % 10 if targeted else None
    x_before = x.clone()
    threat = ThreatModel(norm, EPS[norm])

    result = robustlab.attack(model, x, y, threat, method=info.name, targets=targets, seed=3, **fast_options(info))

    assert torch.equal(x, x_before), "the caller's inputs were modified"
    assert [m.training for m in model.modules()] == modes, "model modes not restored"
    assert result.x_adv.dtype == dtype and result.x_adv.shape == x.shape and result.x_adv.device == x.device
    assert bool(threat.contains(result.x_adv, x).all()), "output outside ball or box"
    with torch.no_grad():
        predicted = model.eval()(result.x_adv).argmax(1)
    expected = predicted == targets if targeted else predicted != y
    assert torch.equal(result.success, expected), "claimed success differs from a fresh forward pass"
    assert torch.allclose(result.distance, threat.distance(result.x_adv, x))
    assert result.gradients is not None and bool((result.queries >= result.gradients).all())
    assert result.wall_time > 0 and result.num_examples == 10
    again = robustlab.attack(
        model.train(), x, y, threat, method=info.name, targets=targets, seed=3, **fast_options(info)
    )
    assert torch.equal(again.x_adv, result.x_adv), "not reproducible with a fixed seed"
    summary = result.summary()
    assert summary["method"] == info.name and summary["examples"] == 10


@pytest.mark.parametrize("name", [i.name for i in robustlab.list_attacks(access="gradient")])
def test_unknown_option_is_named(name: str) -> None:
    with pytest.raises(robustlab.ConfigError, match=r"unknown option.*bogus"):
        robustlab.get_attack(name).cls(bogus=1)


def test_registry_lists_by_access_and_norm() -> None:
    white = {i.name for i in robustlab.list_attacks(access="gradient", norm="linf")}
    assert {"pgd", "fgsm", "mi-fgsm", "cw-pgd"} <= white
    assert "mi-fgsm" not in {i.name for i in robustlab.list_attacks(norm="l1")}
    with pytest.raises(robustlab.ConfigError, match="unknown attack method 'pgdd'"):
        robustlab.get_attack("pgdd")


def test_score_oracle_cannot_run_white_box_attack() -> None:
    oracle = robustlab.ScoreOracle(lambda x: torch.zeros(x.shape[0], 10))
    with pytest.raises(robustlab.ConfigError, match="needs gradient access"):
        robustlab.attack(oracle, torch.rand(2, 1, 6, 6), torch.tensor([0, 1]), ThreatModel("linf", 0.1))
    with pytest.raises(robustlab.ModelError, match="plain function"):
        robustlab.attack(lambda x: x, torch.rand(2, 4), torch.tensor([0, 1]), ThreatModel("linf", 0.1))  # type: ignore[arg-type]


def test_nan_eps_method_norm_and_labels_errors() -> None:
    model = tiny_cnn()
    x = torch.rand(3, 1, 6, 6)
    y = torch.tensor([1, 2, 3])
    threat = ThreatModel("linf", 0.1)
    bad = x.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(robustlab.InvalidInputError, match="NaN"):
        robustlab.attack(model, bad, y, threat)
    with pytest.raises(robustlab.InvalidInputError, match="outside the threat model's input bounds"):
        robustlab.attack(model, x * 255, y, threat)
    with pytest.raises(robustlab.InvalidInputError, match=r"labels out of range.*\[0, 9\]"):
        robustlab.attack(model, x, torch.tensor([1, 2, 10]), threat)
    with pytest.raises(robustlab.InvalidInputError, match=r"labels must have shape \(3,\)"):
        robustlab.attack(model, x, torch.tensor([1, 2]), threat)
    with pytest.raises(robustlab.InvalidInputError, match="integer class indices"):
        robustlab.attack(model, x, torch.tensor([1.0, 2.0, 3.0]), threat)
    with pytest.raises(robustlab.InvalidInputError, match="targets equal the true labels"):
        robustlab.attack(model, x, y, threat, targets=y)
    with pytest.raises(robustlab.InvalidInputError, match="model cannot take its inputs"):
        robustlab.attack(model, torch.rand(3, 5), y, threat)
    with pytest.raises(robustlab.ConfigError, match="does not support the l1 norm"):
        robustlab.attack(model, x, y, ThreatModel("l1", 1.0), method="mi-fgsm")
    with pytest.raises(robustlab.ConfigError, match="steps must be a positive integer"):
        robustlab.attack(model, x, y, threat, steps=0)
    with pytest.raises(robustlab.ConfigError, match=r"threat must be a robustlab\.ThreatModel"):
        robustlab.attack(model, x, y, 0.3)  # type: ignore[arg-type]


def test_probabilities_warn() -> None:
    model = torch.nn.Sequential(tiny_cnn(), torch.nn.Softmax(dim=1))
    with pytest.warns(UserWarning, match="look like probabilities"):
        robustlab.attack(model, torch.rand(2, 1, 6, 6), torch.tensor([0, 1]), ThreatModel("linf", 0.1), steps=1)


def test_train_mode_warns() -> None:
    with pytest.warns(UserWarning, match="train mode"):
        robustlab.attack(tiny_cnn().train(), torch.rand(2, 1, 6, 6), torch.tensor([0, 1]), ThreatModel("linf", 0.1))
