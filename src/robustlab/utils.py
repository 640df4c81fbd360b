"""Small tensor and runtime utilities every layer uses: one definition each.

- :func:`rows_like`: a per-example mask or value shaped to broadcast over a batch of inputs.
- :func:`model_device`: where a module's weights live.
- :func:`model_mode`: run a block with a module in train or eval mode, restoring every submodule's mode.
- :func:`process_group`: (world size, rank) of an initialized torch.distributed group, else (1, 0).
- :func:`save_atomic` (from :mod:`robustlab.state_io`): write a state file so a kill never leaves half of it.
- :func:`package_path`: a file or folder shipped inside an installed package (data sets, pretrained weights).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from robustlab.state_io import save_atomic

__all__ = ["model_device", "model_mode", "package_path", "process_group", "rows_like", "save_atomic"]


def rows_like(values: Tensor, like: Tensor) -> Tensor:
    """``values`` of shape ``(n,)`` reshaped to ``(n, 1, ..., 1)`` so it broadcasts over ``like`` ``(n, ...)``."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def model_device(model: nn.Module) -> torch.device | None:
    """Device of the module's first parameter or buffer (None for a module without any)."""
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return None


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: Literal["train", "eval"]) -> Iterator[None]:
    """Run a block with ``model`` in train or eval mode, restoring every submodule's own mode afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def process_group() -> tuple[int, int]:
    """(world size, rank) of an initialized process group (torchrun), else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def package_path(package: str, relative: str, *, folder: bool = False) -> Path | None:
    """The file (or, with ``folder``, the folder) ``relative`` inside an installed package, found without importing
    the package; None when the package or the path is absent."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / relative
        if candidate.is_dir() if folder else candidate.is_file():
            return candidate
    return None
