"""Property-based checks: random shapes, dtypes and eps, every white-box attack stays in ball and box."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import robustlab
from robustlab import ThreatModel

WHITE_BOX = sorted(i.name for i in robustlab.list_attacks(access="gradient"))


class FlatLinear(nn.Module):
    """A linear classifier over any input shape (flattened)."""

    def __init__(self, features: int, classes: int, dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, features, generator=g, dtype=dtype) * 3)
        self.bias = nn.Parameter(torch.zeros(classes, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.flatten(1)) @ self.weight.T + self.bias


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(WHITE_BOX),
    norm=st.sampled_from(["linf", "l2", "l1"]),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    batch=st.integers(1, 6),
    eps=st.floats(1e-3, 2.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    targeted=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_any_shape_dtype_eps_stays_feasible(method, norm, shape, batch, eps, dtype, targeted, seed) -> None:
    info = robustlab.get_attack(method)
    if norm not in {n.value for n in info.norms} or (targeted and not info.supports_targeted):
        return
    features = 1
    for s in shape:
        features *= s
    classes = 4
    model = FlatLinear(features, classes, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *shape), generator=g, dtype=dtype)
    y = torch.randint(0, classes, (batch,), generator=g)
    targets = (y + 1) % classes if targeted else None
    threat = ThreatModel(norm, eps)
    options: dict[str, Any] = {"steps": 3} if "steps" in info.cls.Config.__dataclass_fields__ else {}
    if method == "apgd-t":
        options["n_target_classes"] = 2
    result = robustlab.attack(model, x, y, threat, method=method, targets=targets, seed=seed, **options)
    assert result.x_adv.dtype == dtype and result.x_adv.shape == x.shape
    assert bool(threat.contains(result.x_adv, x).all())
    with torch.no_grad():
        predicted = model(result.x_adv).argmax(1)
    assert torch.equal(result.success, predicted == targets if targeted else predicted != y)
