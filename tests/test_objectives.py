"""Robust-training objectives: threat model, BatchNorm modes, Fast-BAT's implicit gradient, WAR's lambda rule."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustlab
from robustlab.training import build_objective, list_objectives
from robustlab.training.objectives.base import StepContext
from robustlab.training.objectives.fast_bat import INSIDE_TOLERANCE, FastBAT, lower_level_solution
from robustlab.training.objectives.gradalign import GradAlignConfig, alignment_cosine, default_lambda
from robustlab.training.objectives.war import WAR, measure_zeta, update_lambda


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Many small forward/backward passes: on two busy cores a second intra-op thread mostly waits for the other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Options an objective cannot do without (WAR's zeta has no universal default).
REQUIRED: dict[str, dict[str, Any]] = {"war": {"zeta": 0.5}}

# The BatchNorm mode each method's reference uses while generating its training attack (algorithms.md).
DOCUMENTED_BN_MODE = {
    "pgd-at": "eval",
    "fast-at": "train",
    "trades": "eval",
    "fast-trades": "eval",
    "gradalign": "train",
    "atas": "eval",
    "backward-smoothing": "eval",
    "fast-bat": "train",
    "war": "eval",
}


def bn_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )


def plain_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = robustlab.load_dataset("digits", split="train").head(24)
    return data.x, data.y


def context(n: int, seed: int = 0, epoch: int = 0, epochs: int = 3) -> StepContext:
    return StepContext(
        index=torch.arange(n), epoch=epoch, step=0, epochs=epochs, generator=torch.Generator().manual_seed(seed)
    )


def run_step(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.2) -> Any:
    objective = build_objective(name, robustlab.ThreatModel("linf", eps), **REQUIRED.get(name, {}))
    objective.setup(model, x.shape[0], tuple(x.shape[1:]), torch.device("cpu"))
    model.train()
    output = objective.step(model, x, y, context(x.shape[0]))
    output.loss.backward()
    return objective, output


@pytest.mark.parametrize("name", [info.name for info in list_objectives()])
def test_training_attack_obeys_the_threat_model(name: str, batch) -> None:
    x, y = batch
    for eps in (0.05, 0.3):  # 0.3 makes the box bind on most of the digits' zero pixels
        _, output = run_step(name, plain_model(), x, y, eps)
        assert torch.isfinite(output.loss)
        if name in DOCUMENTED_BN_MODE:
            assert output.x_adv is not None, f"{name} is adversarial and must report its perturbation"
        if output.x_adv is not None:
            threat = robustlab.ThreatModel("linf", eps)
            assert bool(threat.contains(output.x_adv, x).all()), f"{name} left the ball or the box at eps {eps}"
            assert not torch.equal(output.x_adv, x), f"{name} did not perturb"


def test_training_attacks_obey_l2_threat_models(batch) -> None:
    x, y = batch
    threat = robustlab.ThreatModel("l2", 1.0)
    for name in ("trades", "fast-trades", "gradalign", "atas", "backward-smoothing", "war"):
        objective = build_objective(name, threat, **REQUIRED.get(name, {}))
        objective.setup(plain_model(), x.shape[0], tuple(x.shape[1:]), torch.device("cpu"))
        output = objective.step(plain_model(), x, y, context(x.shape[0]))
        assert output.x_adv is not None and bool(threat.contains(output.x_adv, x).all()), name
    with pytest.raises(robustlab.ConfigError, match="linf"):
        build_objective("fast-bat", threat)


@pytest.mark.parametrize("name", [info.name for info in list_objectives()])
def test_batchnorm_mode_while_attacking_and_train_mode_after(name: str, batch) -> None:
    x, y = batch
    model = bn_model()
    modes: list[bool] = []
    bn = model[1]
    bn.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    objective, output = run_step(name, model, x, y)
    assert all(m.training for m in model.modules()), f"{name} did not leave every module in train mode"
    if name in DOCUMENTED_BN_MODE:
        assert objective.attack_bn_mode == DOCUMENTED_BN_MODE[name]
    if output.x_adv is None:
        return
    if objective.attack_bn_mode == "train":
        assert all(modes), f"{name} attacked with BatchNorm in eval mode: {modes}"
    else:
        # The attack's forward passes (eval) all come before the loss's forward passes (train).
        first_train = modes.index(True)
        assert first_train >= 1 and not any(modes[:first_train]) and all(modes[first_train:]), modes


def test_gradalign_lambda_rule() -> None:
    assert default_lambda(8 / 255) == pytest.approx(0.2)
    assert default_lambda(16 / 255) == pytest.approx(2.0)
    assert default_lambda(4 / 255) == pytest.approx(0.02 * 10**0.5)
    assert default_lambda(0.3) == pytest.approx(2.0)  # held beyond the largest eps the rule was fitted on


def test_gradalign_cosine_charges_zero_gradients() -> None:
    g1 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    g2 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-3.0, -4.0]])
    # cosines 1, 0 (a zero gradient: no escape from the regularizer), -1
    assert float(alignment_cosine(g1, g2)) == pytest.approx(0.0)
    assert float(alignment_cosine(torch.zeros(4, 3), torch.zeros(4, 3))) == 0.0  # a dead network pays lambda
    g2.requires_grad_(True)
    alignment_cosine(g1, g2).backward()
    assert g2.grad is not None and torch.isfinite(g2.grad).all()


def test_gradalign_zero_start_is_fgsm_from_the_clean_input(batch) -> None:
    x, y = batch
    model = plain_model()
    threat = robustlab.ThreatModel("linf", 0.2)
    objective = build_objective("gradalign", threat, lam=0.5)
    x_var = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_var), y, reduction="sum"), x_var)
    expected = threat.project(x + 0.2 * grad.sign(), x)
    output = objective.step(model, x, y, context(x.shape[0]))
    assert output.x_adv is not None and torch.equal(output.x_adv, expected)


def test_gradalign_random_start_without_regularizer_is_fast_at(batch) -> None:
    """start="random" puts the regularizer on Fast-AT's attack: with lambda 0 the step is Fast-AT's, draw for draw."""
    x, y = batch
    threat = robustlab.ThreatModel("linf", 0.3)
    model = plain_model()
    fast_at = build_objective("fast-at", threat).step(model, x, y, context(x.shape[0], seed=5))
    objective = build_objective("gradalign", threat, start="random", lam=0.0)
    aligned = objective.step(model, x, y, context(x.shape[0], seed=5))
    assert aligned.x_adv is not None and fast_at.x_adv is not None
    assert torch.equal(aligned.x_adv, fast_at.x_adv)
    assert torch.allclose(aligned.loss, fast_at.loss)
    assert GradAlignConfig(start="random").step_multiple == 1.25 and GradAlignConfig().step_multiple == 1.0
    assert GradAlignConfig(start="random", rel_step_size=0.5).step_multiple == 0.5
    with pytest.raises(robustlab.ConfigError, match="start must be"):
        build_objective("gradalign", threat, start="uniform")


# ------------------------------------------------------------------------------------------------- Fast-BAT
def test_fast_bat_implicit_gradient_matches_finite_differences() -> None:
    """d/dtheta CE(theta, x + delta*(theta)) by the implicit formula vs central differences of the pipeline.

    A linear model in float64; z (the lower level's linearization point) is fixed, as it is a constant of the upper
    level; delta* is recomputed from z at every perturbed theta. With lambda = 1 / step the implicit term is the
    exact derivative while the inside mask does not change, which the test checks at every evaluation.
    """
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).double()
    x = 0.2 + 0.6 * torch.rand(5, 1, 2, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    threat = robustlab.ThreatModel("linf", 0.1)
    rel = 2.0
    objective = FastBAT(threat, rel_step_size=rel, lam=1.0 / (rel * threat.eps))
    z = objective.start(model, x, y, torch.Generator().manual_seed(0))
    low, high = threat.linf_bounds(x)

    def inside_mask() -> torch.Tensor:
        solution, _ = lower_level_solution(model, x, y, z, threat, objective.step_size, create_graph=False)
        return (solution > low + INSIDE_TOLERANCE) & (solution < high - INSIDE_TOLERANCE)

    def upper_loss() -> float:
        solution, _ = lower_level_solution(model, x, y, z, threat, objective.step_size, create_graph=False)
        with torch.no_grad():
            return float(F.cross_entropy(model(solution), y))

    mask = inside_mask()
    assert 0.2 < float(mask.double().mean()) < 0.8, "the case should mix inside and saturated coordinates"
    params = list(model.parameters())
    implicit = torch.autograd.grad(objective.loss_from(model, x, y, z).loss, params)
    naive_objective = FastBAT(threat, rel_step_size=rel, implicit=False)
    naive = torch.autograd.grad(naive_objective.loss_from(model, x, y, z).loss, params)

    h = 1e-6
    for param, g_implicit, g_naive in zip(params, implicit, naive):
        finite = torch.zeros_like(param)
        for i in range(param.numel()):
            flat = param.data.view(-1)
            original = float(flat[i])
            values = []
            for sign in (1.0, -1.0):
                flat[i] = original + sign * h
                assert torch.equal(inside_mask(), mask), "the inside mask changed under the perturbation"
                values.append(upper_loss())
            flat[i] = original
            finite.view(-1)[i] = (values[0] - values[1]) / (2 * h)
        assert torch.allclose(g_implicit, finite, rtol=1e-6, atol=1e-8), (g_implicit, finite)
        # The implicit term matters: the gradient at a fixed delta* is measurably different.
        assert (g_naive - finite).abs().max() > 1e-3


def test_fast_bat_fused_backward_gives_the_two_pass_gradient(batch) -> None:
    """The default path takes the weights' gradient at x* in the same backward pass as the implicit term's
    direction; the two-pass path (kept for autocast and DDP) must give the same total gradient and value."""
    x, y = batch
    objective = FastBAT(robustlab.ThreatModel("linf", 0.3))
    model = plain_model()
    z = objective.start(model, x, y, torch.Generator().manual_seed(0))
    params = list(model.parameters())
    outputs = [objective._upper_level(model, x, y, z, fused=fused) for fused in (True, False)]
    fused_grads, two_pass_grads = (torch.autograd.grad(out.loss, params) for out in outputs)
    assert float(outputs[0].loss) == pytest.approx(float(outputs[1].loss), rel=1e-6)
    for a, b in zip(fused_grads, two_pass_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in fused_grads)


def test_fast_bat_defaults_and_loss_value(batch) -> None:
    x, y = batch
    objective = FastBAT(robustlab.ThreatModel("linf", 8 / 255))
    assert objective.step_size == pytest.approx(5000 / 255)
    assert objective.config.lam == 10.0
    assert FastBAT(robustlab.ThreatModel("linf", 16 / 255)).step_size == pytest.approx(250 * 16 / 255)
    model = plain_model()
    output = objective.step(model, x, y, context(x.shape[0]))
    assert output.x_adv is not None
    with torch.no_grad():  # the implicit term adds gradient, not value
        assert float(output.loss) == pytest.approx(float(F.cross_entropy(model(output.x_adv), y)), rel=1e-5)


# ------------------------------------------------------------------------------------------------------ WAR
def test_war_lambda_rule_on_given_numbers() -> None:
    assert update_lambda(1.0, 0.5, 2.0, zeta=0.4, alpha=0.1) == pytest.approx(1.0 + 0.1 * (0.4 - 0.25))
    assert update_lambda(2.0, 0.1, 1.0, zeta=0.4, alpha=0.1) == pytest.approx(2.0 + 0.1 * 0.3)
    assert update_lambda(0.01, 3.0, 1.0, zeta=0.4, alpha=0.1) == 0.0  # projected onto lambda >= 0
    assert update_lambda(0.7, 1.0, 0.0, zeta=0.4, alpha=0.1) == 0.7  # the ratio is undefined: no update
    assert update_lambda(0.7, 1.0, -0.2, zeta=0.4, alpha=0.1) == 0.7


def test_war_updates_lambda_every_step_from_the_batch_losses(batch) -> None:
    x, y = batch
    threat = robustlab.ThreatModel("linf", 0.2)
    objective = WAR(threat, zeta=0.3, steps=2)
    model = plain_model()
    assert objective.lam == 1.0
    for step in range(3):
        before = objective.lam
        output = objective.step(model, x, y, context(x.shape[0], seed=step))
        assert output.scalars["lambda"] == before  # the batch's loss uses lambda from before the update
        assert output.x_adv is not None
        with torch.no_grad():
            natural = F.cross_entropy(model(x), y)
            robust = F.cross_entropy(model(output.x_adv), y) - natural
        assert float(output.loss.detach()) == pytest.approx(float(natural + before * robust), rel=1e-5)
        expected = max(before + 0.1 * (0.3 - float(natural) / float(robust)), 0.0)
        assert objective.lam == pytest.approx(expected, rel=1e-5)
    assert objective.state_dict() == {"lambda": objective.lam}
    assert WAR(threat, zeta=0.3, robust_loss="kl").lam == 6.0
    zeta = measure_zeta(model, robustlab.load_dataset("digits", split="train").head(40), threat, steps=2)
    assert zeta > 0


def test_bad_options_are_named() -> None:
    threat = robustlab.ThreatModel("linf", 0.1)
    with pytest.raises(robustlab.ConfigError, match="war needs zeta"):
        build_objective("war", threat)
    with pytest.raises(robustlab.ConfigError, match="beta must be"):
        build_objective("trades", threat, beta=-1)
    with pytest.raises(robustlab.ConfigError, match="rel_min_step"):
        build_objective("atas", threat, rel_min_step=2.0, rel_max_step=1.0)
    with pytest.raises(robustlab.ConfigError, match="lam must be"):
        build_objective("gradalign", threat, lam=-0.5)
    with pytest.raises(robustlab.ConfigError, match="robust_loss"):
        build_objective("war", threat, zeta=0.5, robust_loss="margin")
    with pytest.raises(robustlab.ConfigError, match="unknown option"):
        build_objective("fast-bat", threat, lmbda=3)
