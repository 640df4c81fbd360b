"""RayS: exact query sequences on a hand-solved case, convergence to the closed-form Linf distance, batching."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import robustlab
from robustlab import ThreatModel
from robustlab.attacks.rays import average_boundary_distance
from tests.toys import LinearClassifier, binary_linear, tiny_cnn

TOL = 1e-3


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Label-only attacks make many tiny sequential model calls; on a loaded machine two intra-op threads make
    each of them wait for the other core (about 40 ms instead of 0.15 ms here), so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder(nn.Module):
    """Passes inputs to ``model`` and keeps every batch it was asked about."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.detach().clone())
        return self.model(x)


def two_pixel_model() -> LinearClassifier:
    """Class 1 iff ``-2 z0 + z1 - 0.1 > 0``. At x = (0.5, 0.5) the margin is -0.6; ||w||_1 = 3, so the Linf
    distance to the boundary is 0.2, reached along the sign direction (-1, +1)."""
    w = torch.tensor([-2.0, 1.0], dtype=torch.float64)
    return LinearClassifier(torch.stack([torch.zeros(2, dtype=torch.float64), w]), torch.tensor([0.0, -0.1]).double())


def bisection(lo: float, hi: float, boundary: float, tol: float = TOL) -> tuple[float, int]:
    """The reference's binary search on a ray whose boundary is at ``boundary``: (final hi, queries)."""
    count = 0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        count += 1
        if mid > boundary:
            hi = mid
        else:
            lo = mid
    return hi, count


def run_two_pixel(
    eps: float, queries: int, x: tuple[float, float] = (0.5, 0.5), **options
) -> tuple[robustlab.AttackResult, list[torch.Tensor]]:
    """RayS on the two-pixel model; the reference's start unless ``start`` is given."""
    model = Recorder(two_pixel_model())
    point = torch.tensor([x], dtype=torch.float64)
    options = {"start": "ones"} | options
    result = robustlab.attack(
        model, point, torch.tensor([0]), ThreatModel("linf", eps), method="rays", queries=queries, **options
    )
    return result, model.calls[:-1]  # the last call is the audit, outside the budget


def test_two_pixel_adbd_query_sequence_is_exact() -> None:
    # Query 1: the clean input. Query 2: candidate (-1,-1) (all ones with the stage-0 block flipped) at the box
    # corner (0, 0): margin -2.1, rejected. Query 3: stage 1, block 0 flips coordinate 0 of (1, 1): (-1, 1) at the
    # corner (0, 1): margin 0.9, adversarial, so binary search on [0, min(inf, sqrt 2)] to 1e-3:
    # ceil(log2(sqrt(2) / 1e-3)) = 11 queries. From then on (-1, 1) is optimal and every candidate is rejected by
    # its single fast check.
    result, calls = run_two_pixel(0.1, 30, mode="adbd")
    root = math.sqrt(2)
    expected_hi, searches = bisection(0.0, root, 0.2 * root)
    assert searches == 11 == math.ceil(math.log2(root / TOL))
    assert len(calls) == 30 == int(result.queries[0])
    assert torch.equal(calls[0], torch.full((1, 2), 0.5, dtype=torch.float64))
    assert calls[1].tolist() == [[0.0, 0.0]] and calls[2].tolist() == [[0.0, 1.0]]
    steps = torch.cat(calls[3:14])
    assert torch.allclose(steps[:, 0] - 0.5, -(steps[:, 1] - 0.5))  # all on the ray (-1, 1)
    assert abs(float(steps[0, 1]) - 0.5 - root / 2 / root) < 1e-12  # first midpoint: r = sqrt(2) / 2
    # Every later query is a fast check at r_best on a rejected candidate: (-1,-1) and (1,1) alternately.
    radius = expected_hi / root
    for k, call in enumerate(calls[14:]):
        sign = -1.0 if k % 2 == 0 else 1.0
        assert torch.allclose(call, torch.full((1, 2), 0.5 + sign * radius, dtype=torch.float64), atol=1e-12)
    distance = float(result.extras["boundary_distance"][0])
    assert distance == pytest.approx(expected_hi / root, abs=1e-12)
    assert 0.0 <= distance - 0.2 <= TOL / root
    assert not bool(result.success[0]) and bool(result.extras["clean_correct"][0])
    assert int(result.extras["success_queries"][0]) == -1
    assert torch.equal(result.x_adv, torch.full((1, 2), 0.5, dtype=torch.float64))  # failures return x


def test_two_pixel_eps_mode_counts() -> None:
    # eps 0.25 > 0.2: clean, rejected (-1,-1), passing check at the corner, then the eps probe at r = 0.25 sqrt 2
    # is adversarial: 4 queries, no binary search.
    result, calls = run_two_pixel(0.25, 100, tol=TOL)
    assert int(result.queries[0]) == 4 == len(calls) and bool(result.success[0])
    assert torch.allclose(calls[3], torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    assert torch.allclose(result.x_adv, calls[3]) and int(result.extras["success_queries"][0]) == 4
    # Without the probe the sequence is the reference's: 3 + 11 binary-search queries, success found at the end.
    plain, _ = run_two_pixel(0.25, 100, eps_probe=False, tol=TOL)
    assert int(plain.queries[0]) == 14 and bool(plain.success[0])
    # eps 1 (the box width): the passing corner check is itself within eps, so 3 queries.
    wide, calls = run_two_pixel(1.0, 100, tol=TOL)
    assert int(wide.queries[0]) == 3 and bool(wide.success[0]) and calls[2].tolist() == [[0.0, 1.0]]
    # eps 0.1 < 0.2: the probe fails, the search continues on [0.1 sqrt 2, sqrt 2]: ceil(log2(1272.8)) = 11 more,
    # and the rest of the budget goes to rejected candidates.
    low, _ = run_two_pixel(0.1, 40, tol=TOL)
    root = math.sqrt(2)
    expected_hi, searches = bisection(0.1 * root, root, 0.2 * root)
    assert searches == 11
    assert int(low.queries[0]) == 40 and not bool(low.success[0])
    assert float(low.extras["boundary_distance"][0]) == pytest.approx(expected_hi / root, abs=1e-12)


def test_box_start_and_the_eps_mode_tolerance() -> None:
    # x = (0.6, 0.4): margin -0.9, Linf distance 0.9 / 3 = 0.3 along (-1, +1), which is also the direction toward
    # each coordinate's farther face of the box. The box start asks about it first.
    root = math.sqrt(2)
    result, calls = run_two_pixel(0.35, 100, x=(0.6, 0.4), start="box")
    # clean, the box direction's corner (0, 1), the eps probe (0.25, 0.75): broken in 3 queries.
    assert int(result.queries[0]) == 3 == len(calls) and bool(result.success[0])
    assert calls[1].tolist() == [[0.0, 1.0]]
    assert torch.allclose(calls[2], torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    reference, _ = run_two_pixel(0.35, 100, x=(0.6, 0.4))  # the corner (0, 0) is rejected first
    assert int(reference.queries[0]) == 4 and bool(reference.success[0])
    # eps 0.17 < 0.3: the probe misses and the search on [0.17 sqrt 2, sqrt 2] stops at 1% of eps by default:
    # ceil(log2(0.83 sqrt 2 / (0.0017 sqrt 2))) = 9 midpoints, then every later candidate is rejected at once.
    tol = 0.17 * root / 100
    expected_hi, searches = bisection(0.17 * root, root, 0.3 * root, tol)
    assert searches == 9
    low, calls = run_two_pixel(0.17, 20, x=(0.6, 0.4), start="box")
    assert int(low.queries[0]) == 20 and not bool(low.success[0])
    on_ray = torch.cat(calls[3:12])
    assert torch.allclose(on_ray.sum(1), torch.ones(9, dtype=torch.float64))  # all on the ray (-1, +1)
    assert float(low.extras["boundary_distance"][0]) == pytest.approx(expected_hi / root, abs=1e-12)
    assert 0.0 <= float(low.extras["boundary_distance"][0]) - 0.3 <= 0.17 / 100
    # In ADBD mode the tolerance stays the reference's 1e-3: 11 midpoints on [0, sqrt 2].
    adbd, calls = run_two_pixel(0.17, 13, x=(0.6, 0.4), start="box", mode="adbd")
    assert float(adbd.extras["boundary_distance"][0]) == pytest.approx(bisection(0, root, 0.3 * root)[0] / root)


def test_box_start_on_an_unbounded_box_is_the_reference_start() -> None:
    model = binary_linear(8, seed=6).eval()
    x = torch.rand(6, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = model(x).argmax(1)
    threat = ThreatModel("linf", 0.05, -math.inf, math.inf)
    runs = [
        robustlab.attack(model, x, y, threat, method="rays", queries=200, max_radius=1.0, start=start)
        for start in ("box", "ones")
    ]
    assert torch.equal(runs[0].queries, runs[1].queries) and torch.equal(runs[0].x_adv, runs[1].x_adv)


def test_budget_cut_in_a_search_keeps_its_adversarial_end() -> None:
    # 3 queries: clean, rejected, the passing corner check at r = sqrt 2; the search never starts, but the corner
    # was seen adversarial, so the boundary distance is the corner's (0.5 in Linf).
    result, calls = run_two_pixel(0.1, 3, mode="adbd")
    assert len(calls) == 3
    assert float(result.extras["boundary_distance"][0]) == pytest.approx(0.5)


@pytest.mark.parametrize("dim", [10, 50])
def test_distance_converges_to_the_closed_form_on_a_linear_model(dim: int) -> None:
    model = binary_linear(dim, seed=3).eval()
    g = torch.Generator().manual_seed(1)
    x = 0.5 + 0.6 * (torch.rand(400, dim, generator=g, dtype=torch.float64) - 0.5)
    w = (model.weight[1] - model.weight[0]).detach()
    b = (model.bias[1] - model.bias[0]).detach()
    true = (x @ w + b).abs() / w.abs().sum()
    keep = true > 0.02  # distances well above the Linf tolerance 1e-3 / sqrt(dim)
    x, true = x[keep][:16], true[keep][:16]
    y = model(x).argmax(1)
    threat = ThreatModel("linf", 0.05, -math.inf, math.inf)  # unbounded: the closed form is exact
    result = robustlab.attack(model, x, y, threat, method="rays", queries=1000, mode="adbd", max_radius=1.0)
    found = result.extras["boundary_distance"]
    assert bool((found >= true * (1 - 1e-12)).all()), "found a boundary point nearer than the true minimum"
    assert float((found - true).max()) <= TOL / math.sqrt(dim)
    assert average_boundary_distance(result) == pytest.approx(float(found.mean()))
    assert bool((result.queries == 1000).all())
    assert torch.equal(result.success, found <= 0.05)


def test_eps_mode_breaks_exactly_the_examples_within_reach() -> None:
    model = binary_linear(12, seed=5).eval()
    g = torch.Generator().manual_seed(2)
    x = 0.5 + 0.5 * (torch.rand(60, 12, generator=g, dtype=torch.float64) - 0.5)
    y = model(x).argmax(1)
    w = (model.weight[1] - model.weight[0]).detach()
    true = (x @ w + (model.bias[1] - model.bias[0]).detach()).abs() / w.abs().sum()
    eps = float(true.median())
    threat = ThreatModel("linf", eps, -10.0, 10.0)  # inputs far from the box faces
    result = robustlab.attack(model, x, y, threat, method="rays", queries=2000)
    assert bool(result.success[true < eps - 1e-3].all())
    assert not bool(result.success[true > eps].any())
    assert bool((result.distance[result.success] <= eps * (1 + 1e-9)).all())  # the ball's faces, up to rounding
    stopped = result.success & (result.queries < 2000)
    assert torch.equal(stopped, result.success)  # each success stopped early
    assert torch.equal(result.extras["success_queries"][result.success], result.queries[result.success])


def test_batched_run_matches_single_runs_with_one_model_call_per_round() -> None:
    model = tiny_cnn()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(5, 1, 6, 6, generator=g)
    y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 10  # one misclassified example: one query, distance 0
    threat = ThreatModel("linf", 0.08)
    recorder = Recorder(model)
    batch = robustlab.attack(recorder, x, y, threat, method="rays", queries=80)
    rows = [int(c.shape[0]) for c in recorder.calls[:-1]]
    rounds = int(batch.queries.max())
    assert len(rows) == rounds, "one model call per round"
    for r, count in enumerate(rows):
        assert count == int((batch.queries > r).sum()), "each live example asks exactly once per round"
    assert int(batch.queries[0]) == 1 and not bool(batch.extras["clean_correct"][0])
    assert float(batch.extras["boundary_distance"][0]) == 0.0 and bool(batch.success[0])
    assert len(set(batch.queries.tolist())) > 1, "examples stopped at different rounds"
    for i in range(5):
        single = robustlab.attack(model, x[i : i + 1], y[i : i + 1], threat, method="rays", queries=80)
        assert torch.equal(single.queries, batch.queries[i : i + 1])
        assert torch.equal(single.x_adv, batch.x_adv[i : i + 1])
        assert torch.equal(single.extras["boundary_distance"], batch.extras["boundary_distance"][i : i + 1])


def test_adbd_is_over_correctly_classified_examples_only() -> None:
    model = tiny_cnn()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(8, 1, 6, 6, generator=g)
    y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 10
    result = robustlab.attack(model, x, y, ThreatModel("linf", 0.03), method="rays", queries=60, mode="adbd")
    correct = result.extras["clean_correct"]
    assert correct.tolist() == [False] * 3 + [True] * 5
    distance = result.extras["boundary_distance"]
    assert bool((distance[:3] == 0).all()) and bool((distance[3:] > 0).all())
    assert average_boundary_distance(result) == pytest.approx(float(distance[3:].mean()))
    assert bool((result.queries[:3] == 1).all()) and bool((result.queries[3:] == 60).all())
    # success means a boundary point within eps (up to float rounding of the ball's faces)
    assert torch.equal(result.success[3:], distance[3:] <= 0.03 * (1 + 1e-6))
    _, fractions = result.success_curve([1, 60])
    assert fractions[0] == pytest.approx(3 / 8)


def test_errors() -> None:
    model = tiny_cnn()
    x, y = torch.rand(2, 1, 6, 6), torch.tensor([0, 1])
    with pytest.raises(robustlab.ConfigError, match="queries must be a positive integer"):
        robustlab.attack(model, x, y, ThreatModel("linf", 0.1), method="rays", queries=0)
    with pytest.raises(robustlab.ConfigError, match="unknown RayS mode 'fast'"):
        robustlab.attack(model, x, y, ThreatModel("linf", 0.1), method="rays", mode="fast")
    with pytest.raises(robustlab.ConfigError, match="tol must be a positive number"):
        robustlab.attack(model, x, y, ThreatModel("linf", 0.1), method="rays", tol=-1.0)
    with pytest.raises(robustlab.ConfigError, match="does not support the l2 norm"):
        robustlab.attack(model, x, y, ThreatModel("l2", 0.1), method="rays")
    with pytest.raises(robustlab.ConfigError, match="untargeted only"):
        robustlab.attack(model, x, y, ThreatModel("linf", 0.1), method="rays", targets=(y + 1) % 10)
    with pytest.raises(robustlab.ConfigError, match="unbounded box give max_radius"):
        robustlab.attack(model, x, y, ThreatModel("linf", 0.1, -math.inf, math.inf), method="rays")
    with pytest.raises(ValueError, match="needs a RayS result"):
        average_boundary_distance(robustlab.attack(model, x, y, ThreatModel("linf", 0.1), method="fgsm"))
