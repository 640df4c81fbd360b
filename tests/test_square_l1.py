"""Square Attack in l1 ("Mind the box", the l1 Square of AutoAttack's l1 version): the reference's bump, every query
in the l1 ball and the box, and a linear model's examples broken below their exact l1 distance."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import robustlab
from robustlab import ThreatModel
from robustlab.attacks.square import _bump
from robustlab.threat import Norm
from tests.test_apgd_l1 import Recorder, l1_minimum
from tests.toys import binary_linear


def test_the_l1_bump_is_the_references() -> None:
    """fra31/auto-attack's ``eta(3)`` in l1, worked by hand: rectangles weighted 1 / (k + 1)^4, each half of unit l1
    norm (top [1, 17, 1] / 19, bottom [[1, 1, 1], [1, 17, 1]] / 22), the whole of unit l1 norm."""
    bump = _bump(3, 3, torch.float64, torch.device("cpu"), Norm.L1)
    expected = torch.tensor([[1, 17, 1], [-1, -1, -1], [-1, -17, -1]], dtype=torch.float64)
    expected /= torch.tensor([[38.0], [44.0], [44.0]], dtype=torch.float64)
    assert torch.allclose(bump, expected, atol=1e-12)
    assert float(_bump(5, 5, torch.float64, torch.device("cpu"), Norm.L1).abs().sum()) == pytest.approx(1.0)
    l2 = _bump(3, 3, torch.float64, torch.device("cpu"), Norm.L2)  # the l2 bump is unchanged: weights 1 / (k + 1)^2
    assert float(l2.norm()) == pytest.approx(1.0) and float(l2[0, 1] / l2[0, 0]) == pytest.approx(5.0)


class NeverFooled(nn.Module):
    """A linear model whose class 0 leads by 100: the loss moves with the input (Square accepts proposals and its
    perturbation evolves) but no example is ever broken, so every query batch holds every example in order."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(300, 10)
        self.lead = nn.Parameter(torch.tensor([100.0] + [0.0] * 9), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1)) + self.lead


def test_every_query_stays_in_the_l1_ball_and_box() -> None:
    torch.manual_seed(0)
    model = Recorder(NeverFooled().eval())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 10, 10, generator=g)
    x[:, :, :3] = 0.0  # coordinates on the faces, where a bump would leave the box
    x[:, :, -1] = 1.0
    y = torch.zeros(6, dtype=torch.long)
    threat = ThreatModel("l1", 3.0)
    result = robustlab.attack(model, x, y, threat, "square", queries=60, seed=0)
    assert not bool(result.success.any()) and result.queries.tolist() == [60] * 6
    queried = torch.cat([batch for batch in model.seen if batch.shape[0] == 6])
    assert len(queried) >= 60 * 6  # the start, 59 proposals (and the re-check) for every example
    clean = x.repeat(len(queried) // 6, 1, 1, 1)
    assert bool(threat.contains(queried, clean, rtol=1e-6).all()), "a query left the l1 ball or the box"
    assert float(threat.distance(queried, clean).max()) > 2.9  # the search does use the ball's budget
    assert not torch.equal(result.x_adv, queried[:6])  # proposals were accepted: the perturbation moved


def test_binary_linear_broken_below_the_exact_l1_distance() -> None:
    """Images of a binary linear model: Square breaks, with 300 queries, every example whose exact (box-constrained)
    l1 distance is below 0.6 eps, and none whose distance exceeds eps."""
    model = binary_linear(64).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(60, 1, 8, 8, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    exact = torch.as_tensor(l1_minimum(model, x.flatten(1)))
    eps = float(exact[torch.isfinite(exact)].median())
    result = robustlab.attack(model, x, y, ThreatModel("l1", eps), "square", queries=300, seed=0)
    near, far = exact < 0.6 * eps, exact > eps
    assert int(near.sum()) > 10 and int(far.sum()) > 10
    assert bool(result.success[near].all()), f"missed {int((~result.success[near]).sum())} of {int(near.sum())}"
    assert not bool(result.success[far].any())
    assert bool((result.distance[result.success] >= exact[result.success] * (1 - 1e-9)).all())


@pytest.mark.parametrize("shape", [(5,), (1, 3, 3), (2, 4, 5), (3, 2), (1, 1, 7)])
@pytest.mark.parametrize("targeted", [False, True])
def test_odd_shapes_stay_feasible_within_the_budget(shape: tuple[int, ...], targeted: bool) -> None:
    """Flat inputs, single rows and images smaller than the 3 x 3 window: feasible, within budget, success
    re-checked (targeted: the target reached)."""
    g = torch.Generator().manual_seed(len(shape) * 10 + shape[-1])
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.Size(shape).numel()), 4)).double().eval()
    x = torch.rand((3, *shape), generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (3,), generator=g)
    targets = (y + 1) % 4 if targeted else None
    threat = ThreatModel("l1", 1.5)
    result = robustlab.attack(model, x, y, threat, "square", targets=targets, queries=40, seed=0)
    assert bool((result.queries <= 40).all()) and bool(threat.contains(result.x_adv, x).all())
    with torch.no_grad():
        predicted = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, predicted == targets if targeted else predicted != y)
