"""Intrinsic robustness: the concentration bound against a Gaussian mixture with a linear generator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from robustlab import ThreatModel
from robustlab.analysis.intrinsic import (
    CVAEConfig,
    generator_lipschitz,
    in_distribution_attack,
    intrinsic_limit,
    intrinsic_robustness,
    robustness_bound,
    train_cvae,
)
from robustlab.data import from_arrays
from robustlab.errors import ConfigError


def _phi(t: float) -> float:
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


class LinearGenerator:
    """Class k is ``A z + mu_k``: a Gaussian mixture; its Lipschitz constant (l2 -> l2) is ``||A||_2``."""

    def __init__(self, a: Tensor, means: Tensor) -> None:
        self.a, self.means = a, means

    def __call__(self, z: Tensor, y: Tensor) -> Tensor:
        return z @ self.a.T + self.means[y]


def test_linear_generator_lipschitz_is_its_operator_norm() -> None:
    torch.manual_seed(0)
    a = torch.randn(12, 4, dtype=torch.float64)
    generator = LinearGenerator(a, torch.zeros(2, 12, dtype=torch.float64))
    estimate = generator_lipschitz(generator, 2, 4, "l2", batches=3, batch_size=4, dtype=torch.float64)
    exact = float(torch.linalg.matrix_norm(a, ord=2))
    assert torch.allclose(estimate.sampled_max, torch.full((2,), exact, dtype=torch.float64), rtol=1e-10)
    assert torch.allclose(estimate.weibull, estimate.sampled_max)
    linf = generator_lipschitz(generator, 2, 4, "linf", batches=2, batch_size=2, dtype=torch.float64)
    assert float(linf.sampled_max[0]) == pytest.approx(float(a.norm(dim=1).max()))  # ||A||_{2->inf}: largest row
    with pytest.raises(ConfigError):
        generator_lipschitz(generator, 2, 4, "l1")


def test_bound_equals_the_closed_form_of_a_half_space_on_a_gaussian_mixture() -> None:
    """Two classes N(+-mu, sigma^2 I): the half-space sign(mu.x) has error Phi(-|mu|/sigma) and l2 robust accuracy
    Phi((|mu| - eps)/sigma), which is exactly Phi(Phi^{-1}(1 - alpha) - eps/L) with L = sigma: the bound is tight."""
    torch.manual_seed(1)
    dim, sigma, distance = 10, 0.5, 0.8
    mu = torch.zeros(dim, dtype=torch.float64)
    mu[0] = distance
    generator = LinearGenerator(sigma * torch.eye(dim, dtype=torch.float64), torch.stack([mu, -mu]))
    lipschitz = generator_lipschitz(generator, 2, dim, "l2", batches=2, batch_size=2, dtype=torch.float64)
    error = torch.full((2,), _phi(-distance / sigma), dtype=torch.float64)
    eps = [0.0, 0.1, 0.2, 0.4, 0.8]
    bound = robustness_bound(eps, lipschitz.sampled_max, error)
    closed = torch.tensor([_phi((distance - e) / sigma) for e in eps], dtype=torch.float64)
    assert torch.allclose(bound, closed, atol=1e-12)
    assert (bound.diff() < 0).all()  # monotone in eps
    assert torch.allclose(intrinsic_limit(eps, sigma, float(error[0])), closed, atol=1e-12)
    # ... and the half-space's robust accuracy measured on generated samples matches it (exact l2 distance).
    z = torch.randn(20000, dim, dtype=torch.float64)
    y = torch.randint(0, 2, (20000,))
    x = generator(z, y)
    signed = (x @ mu) / distance * (1 - 2 * y).double()  # distance to the hyperplane, positive when correct
    for e, expected in zip(eps, closed.tolist(), strict=True):
        assert float((signed > e).double().mean()) == pytest.approx(expected, abs=0.015)


def test_prior_weighting_and_bad_arguments() -> None:
    bound = robustness_bound([0.5], torch.tensor([1.0, 2.0]), torch.tensor([0.1, 0.2]), prior=torch.tensor([3.0, 1.0]))
    expected = 0.75 * _phi(_phi_inverse(0.9) - 0.5) + 0.25 * _phi(_phi_inverse(0.8) - 0.25)
    assert float(bound[0]) == pytest.approx(expected, rel=1e-7)
    with pytest.raises(ConfigError):
        robustness_bound([0.1], torch.tensor([1.0]), torch.tensor([0.1, 0.2]))
    with pytest.raises(ConfigError):
        robustness_bound([0.1], torch.tensor([0.0]), torch.tensor([0.1]))


def _phi_inverse(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def test_in_distribution_attack_stays_on_the_manifold_and_in_the_ball() -> None:
    torch.manual_seed(2)
    dim = 6
    mu = torch.zeros(dim)
    mu[0] = 0.3
    generator = LinearGenerator(0.2 * torch.eye(dim), torch.stack([mu, -mu]))
    classifier = nn.Linear(dim, 2)
    with torch.no_grad():
        classifier.weight.copy_(torch.stack([mu, -mu]))
        classifier.bias.zero_()
    z = torch.randn(64, dim)
    y = torch.randint(0, 2, (64,))
    threat = ThreatModel("l2", 0.2, -math.inf, math.inf)
    broken, x_adv = in_distribution_attack(classifier, generator, z, y, threat, steps=20)
    x = generator(z, y)
    assert threat.contains(x_adv, x).all()
    # The linear generator is onto: the latent attack reaches every point, so it breaks exactly the correctly
    # classified examples within eps of the hyperplane.
    signed = (x @ mu) / mu.norm() * (1 - 2 * y).float()
    expected = (signed > 0) & (signed <= 0.2 - 1e-3)
    assert (broken[expected]).all()
    assert not broken[signed > 0.2 + 1e-3].any()


def test_cvae_trains_and_intrinsic_report_runs() -> None:
    torch.manual_seed(3)
    x = torch.rand(64, 1, 4, 4)
    y = torch.arange(64) % 2
    x[y == 1] = x[y == 1] * 0.3
    data = from_arrays(x, y)
    cvae = train_cvae(data, CVAEConfig(latent_dim=2, hidden=16, epochs=2, batch_size=32))
    images = cvae.generate(torch.zeros(2, 2), torch.tensor([0, 1]))
    assert images.shape == (2, 1, 4, 4) and float(images.min()) >= 0 and float(images.max()) <= 1
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    result = intrinsic_robustness(classifier, cvae.generate, 2, 2, "l2", [0.1, 0.5], per_class=8,
                                  lipschitz_batches=2, attack_steps=3)  # fmt: skip
    assert (result.bound_sampled.diff() <= 0).all()
    assert (result.bound_sampled <= result.bound_weibull + 1e-12).all()
    assert (result.unconstrained <= 1).all() and len(result.summary()["eps"]) == 2
