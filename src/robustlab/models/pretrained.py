"""Pretrained weights that ship inside installed packages, loadable by name (:func:`robustlab.models.load_model`).

advertorch's MNIST LeNet5 pair: naturally and adversarially trained (``advertorch-lenet5-clean`` /
``advertorch-lenet5-adv``), from the ``advertorch_examples`` package that ``pip install advertorch`` installs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.errors import DataNotFoundError
from robustlab.models.files import extract_state_dict, load_weights, torch_load
from robustlab.models.registry import build_model
from robustlab.registry import Registry
from robustlab.utils import package_path

__all__ = ["PRETRAINED", "PretrainedInfo", "list_pretrained", "load_pretrained"]


@dataclass(frozen=True)
class PretrainedInfo:
    """Pretrained weights that ship inside an installed package."""

    name: str
    arch: str
    arch_kwargs: Mapping[str, Any]
    package: str
    relative_path: str
    install: str
    description: str


PRETRAINED: Registry[PretrainedInfo] = Registry("pretrained model")
PRETRAINED.add(
    PretrainedInfo(
        "advertorch-lenet5-clean",
        "lenet5",
        {},
        "advertorch_examples",
        "trained_models/mnist_lenet5_clntrained.pt",
        "pip install advertorch",
        "advertorch's LeNet5 trained on clean MNIST; inputs in [0, 1], no normalization (about 98.9% clean)",
    )
)
PRETRAINED.add(
    PretrainedInfo(
        "advertorch-lenet5-adv",
        "lenet5",
        {},
        "advertorch_examples",
        "trained_models/mnist_lenet5_advtrained.pt",
        "pip install advertorch",
        "advertorch's LeNet5 adversarially trained on MNIST (PGD-40, linf eps 0.3, step 0.01); inputs in "
        "[0, 1] (about 98.6% clean, 93% under PGD at eps 0.3)",
    )
)


def list_pretrained(**filters: Any) -> list[PretrainedInfo]:
    """The pretrained models :func:`~robustlab.models.load_model` accepts by name, sorted by name; filters select
    by field, e.g. ``list_pretrained(arch="lenet5")``."""
    return PRETRAINED.list(**filters)


def _pretrained_file(info: PretrainedInfo) -> Path:
    file = package_path(info.package, info.relative_path)
    if file is None:
        raise DataNotFoundError(
            f"the weights of {info.name!r} ship with the {info.package} package ({info.relative_path}), which is "
            f"not installed: {info.install}"
        )
    return file


def load_pretrained(info: PretrainedInfo, device: torch.device) -> nn.Module:
    """The pretrained model, in eval mode on ``device``."""
    file = _pretrained_file(info)
    state = torch_load(file, device, allow_pickle=False)  # saved on CUDA: map_location brings it to `device`
    model = build_model(info.arch, **info.arch_kwargs)
    load_weights(model, extract_state_dict(state, file), f"{file} ({info.name})")
    return model.to(device).eval()
