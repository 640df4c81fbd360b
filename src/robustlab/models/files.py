"""Reading model files without running code from them, and fitting weights into a network.

:func:`torch_load` is ``torch.load(weights_only=True)`` with messages a user can act on; pickled Python objects
load only when the caller trusts the file (``allow_pickle``). :func:`extract_state_dict` finds a state dict inside
a training checkpoint, :func:`load_weights` puts it into a network and names the mismatch when it does not fit.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.errors import ConfigError, ModelError
from robustlab.state_io import describe_load_failure

__all__ = ["Device", "extract_state_dict", "load_weights", "resolve_device", "torch_load"]

Device = torch.device | str


def resolve_device(device: Device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here (a ConfigError for unknown names or absent CUDA)."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r} (use 'cpu', 'cuda', 'cuda:1', 'mps', ...)") from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but CUDA is not available here; use device='cpu'")
    return target


def torch_load(file: Path, device: torch.device, *, allow_pickle: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; pickled Python objects only when the user trusts the file."""
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise ModelError(
                f"{file} is not a model file robustlab can read (TorchScript, a robustlab checkpoint or a "
                f"state dict saved with torch.save): {describe_load_failure(exc)}"
            ) from exc
        if not allow_pickle:
            raise ModelError(
                f"{file} cannot be loaded as a model: {describe_load_failure(exc)} (for example a whole model "
                "saved with torch.save(model)). Save model.state_dict() instead and give its architecture "
                "(--arch), or export TorchScript with torch.jit.script(model).save(path)"
            ) from exc
    except Exception as exc:
        raise ModelError(
            f"{file} is not a model file robustlab can read (TorchScript, a robustlab checkpoint or a state "
            f"dict saved with torch.save): {describe_load_failure(exc)}"
        ) from exc
    try:
        return torch.load(file, map_location=device, weights_only=False)
    except Exception as exc:
        raise ModelError(f"{file} could not be unpickled: {type(exc).__name__}: {exc}") from exc


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def extract_state_dict(obj: Any, file: Path) -> Mapping[str, Tensor]:
    """A state dict, possibly nested under a common key (``state_dict``, ``model``, ...); ``module.`` stripped."""
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("state_dict", "model_state_dict", "model", "net", "model_state"):
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        raise ModelError(f"{file} does not hold a state dict (a mapping of parameter names to tensors)")
    state: Mapping[str, Tensor] = obj
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch is a ModelError naming where the weights came from."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ModelError(
            f"the weights in {where} do not fit {type(model).__name__} (wrong arch or arch_kwargs?): {detail}"
        ) from exc
