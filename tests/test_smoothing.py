"""Randomized smoothing: the statistics against statsmodels, radii against the closed form, abstain, queries."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm as gaussian
from torch import nn

from robustlab import ConfigError, LabelOracle
from robustlab.certification import ABSTAIN, RandomizedSmoothing, certified_accuracy, clopper_pearson_lower


@pytest.mark.parametrize(("k", "n"), [(0, 10), (1, 10), (5, 10), (10, 10), (950, 1000), (99_990, 100_000)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_matches_statsmodels(k: int, n: int, alpha: float) -> None:
    from statsmodels.stats.proportion import proportion_confint

    expected = proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]
    assert float(clopper_pearson_lower(k, n, alpha)) == pytest.approx(expected, abs=1e-12)


class HalfSpace(nn.Module):
    """Class 1 iff w.x + b > 0; the L2 distance to the boundary is |w.x + b| / ||w||."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w, b
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([-score, score], dim=1)


def test_linear_classifier_radius_approaches_the_distance_to_the_boundary() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=g, dtype=torch.float64)
    model = HalfSpace(w, 0.0)
    # Signed distances 0.2, -0.4, 0.8 to the boundary, plus a component along the boundary.
    along = torch.randn(3, 8, generator=g, dtype=torch.float64)
    along = along - (along @ w)[:, None] * w / w.norm() ** 2
    x = torch.tensor([0.2, -0.4, 0.8], dtype=torch.float64)[:, None] * w / w.norm() + along
    distance = (x @ w).abs() / w.norm()
    assert torch.allclose(distance, torch.tensor([0.2, 0.4, 0.8], dtype=torch.float64))
    sigma = 0.5
    smoothed = RandomizedSmoothing(model, 2, sigma, batch_size=20_000)
    cert = smoothed.certify(x, n0=100, n=200_000, alpha=0.001, generator=g)
    truth = (x @ w > 0).long()
    assert torch.equal(cert.prediction, truth)
    # p_A = Phi(distance / sigma) exactly, so R = sigma * Phi^-1(p_lower) <= distance, and close for large n.
    assert bool((cert.radius <= distance + 1e-6).all())
    slack = sigma * 4.5 / math.sqrt(200_000) / gaussian.pdf(gaussian.ppf(torch.tensor(0.99).item()))
    assert bool((distance - cert.radius < slack).all()), (distance, cert.radius)
    assert cert.queries.tolist() == [200_100] * 3
    assert model.rows == 3 * 200_100


def test_boundary_inputs_abstain() -> None:
    model = HalfSpace(torch.tensor([1.0, 0.0]), 0.0)
    x = torch.zeros(2, 2)  # on the boundary: both classes have probability 1/2
    smoothed = RandomizedSmoothing(model, 2, 0.25)
    g = torch.Generator().manual_seed(0)
    assert smoothed.certify(x, n=2000, generator=g).prediction.tolist() == [ABSTAIN, ABSTAIN]
    assert smoothed.predict(x, n=2000, generator=g).tolist() == [ABSTAIN, ABSTAIN]
    far = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])
    assert smoothed.predict(far, n=2000, generator=g).tolist() == [1, 0]


def test_certified_accuracy_and_oracle_accounting() -> None:
    model = HalfSpace(torch.tensor([1.0, 0.0]), 0.0)
    oracle = LabelOracle(lambda z: model(z).argmax(1))
    smoothed = RandomizedSmoothing(oracle, 2, 0.25, batch_size=64)
    x = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.05, 0.0]])
    cert = smoothed.certify(x, n0=10, n=500, alpha=0.01, generator=torch.Generator().manual_seed(0))
    assert cert.queries.tolist() == [510, 510, 510]
    labels = torch.tensor([1, 0, 0])
    accuracy = certified_accuracy(cert, labels, [0.0, 0.1, 10.0])
    assert accuracy[0] == pytest.approx(2 / 3) and accuracy[2] == 0.0
    assert accuracy[1] <= accuracy[0]


def test_bad_arguments() -> None:
    model = HalfSpace(torch.tensor([1.0, 0.0]), 0.0)
    with pytest.raises(ConfigError, match="sigma must be a positive number"):
        RandomizedSmoothing(model, 2, 0.0)
    smoothed = RandomizedSmoothing(model, 2, 0.25)
    with pytest.raises(ConfigError, match="alpha must be"):
        smoothed.certify(torch.zeros(1, 2), n=10, alpha=0.7)
    with pytest.raises(ConfigError, match="positive integer"):
        smoothed.certify(torch.zeros(1, 2), n=0)
