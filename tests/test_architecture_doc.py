"""The examples of docs/architecture.md run as written: each registers its component, which then works."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

# What the examples take for granted: the imports of the module they say they belong in.
PRELUDE = """
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from robustlab.attacks.base import Attack, AttackConfig
from robustlab.attacks.registry import register_attack
from robustlab.checks import check_number, check_positive_int
from robustlab.data.builtin import Raw, _builtin
from robustlab.data.formats import read_mnist_style_dir
from robustlab.data.sources import DataRequest
from robustlab.errors import DataNotFoundError
from robustlab.losses import margin_loss
from robustlab.models import register_model
from robustlab.oracles import Access, ScoreOracle
from robustlab.threat import Norm
from robustlab.training.objectives.base import (
    Objective, ObjectiveConfig, StepContext, StepOutput, register_objective,
)
"""

CHECKS = """
import numpy as np, robustlab
from robustlab.data import load_dataset
from robustlab.models import build_model
from robustlab.training import TrainConfig, train

model = build_model("mlp", hidden=32).eval()
x, y = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 10
threat = robustlab.ThreatModel("linf", 0.3)
result = robustlab.attack(model, x, y, threat, "random_sign", steps=3, queries=10, seed=0)
assert (result.x_adv - x).abs().max() <= 0.3 + 1e-6 and int(result.queries.max()) <= 10
assert "noisy" in [info.name for info in robustlab.list_objectives()]
data = robustlab.data.from_arrays(x, y, num_classes=10)
config = TrainConfig(epochs=1, batch_size=3, val_attack="pgd")
trained = train(build_model("mlp", hidden=8), data, "noisy", threat, config)
assert len(trained.history["train_loss"]) == 1
assert "kmnist" in [info.name for info in robustlab.list_datasets()]
try:
    load_dataset("kmnist", root=".", download=False)
except robustlab.DataNotFoundError as exc:
    assert "put the four IDX files there" in str(exc)
else:
    raise AssertionError("kmnist should not be found in the working directory")
print("ok")
"""


def test_the_architecture_examples_run(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 4  # an attack, a training method, a data set, an architecture
    script = PRELUDE + "\n".join(textwrap.dedent(block) for block in blocks) + CHECKS
    done = subprocess.run(  # a process of its own: the examples register into the real registries
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
