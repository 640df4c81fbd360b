"""Shared fixtures: the suite must run in seconds on two CPU cores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.toys import tiny_cnn


@pytest.fixture
def cnn() -> nn.Module:
    return tiny_cnn()


@pytest.fixture
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 1, 6, 6, generator=g)
    y = torch.randint(0, 10, (12,), generator=g)
    return x, y
