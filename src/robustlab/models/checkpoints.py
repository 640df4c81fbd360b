"""robustlab checkpoints: a self-describing file (format tag, architecture name and options, weights,
normalization, anything else the caller keeps) that loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.errors import ConfigError, DataNotFoundError, ModelError
from robustlab.models.files import Device, load_weights, resolve_device, torch_load
from robustlab.models.normalization import Normalize, NormalizedModel
from robustlab.models.registry import build_model, model_info

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "Checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "robustlab-checkpoint"
CHECKPOINT_VERSION = 1
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Checkpoint:
    """A loaded robustlab checkpoint: the model (eval mode) and what was saved with it."""

    model: nn.Module
    arch: str
    arch_kwargs: dict[str, Any]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _check_plain(value: Any, where: str) -> None:
    """Only values ``torch.load(weights_only=True)`` can read back: plain containers, numbers, str, tensors."""
    if value is None or isinstance(value, bool | int | float | str | Tensor):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise ConfigError(f"{where} has a key of type {type(key).__name__}; use str keys")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise ConfigError(
        f"{where} holds a {type(value).__name__}; checkpoints store only numbers, strings, tensors and "
        "lists/dicts of them (so they load safely with weights_only=True)"
    )


def _state_dict_mismatch(expected: nn.Module, state: Mapping[str, Tensor]) -> str | None:
    wanted = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {wanted[k]}"
        for k in wanted
        if k in state and tuple(state[k].shape) != wanted[k]
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            parts.append(f"{label}: {', '.join(keys[:5])}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""))
    return "; ".join(parts)


def _network_and_normalization(
    model: nn.Module, mean: float | Sequence[float] | None, std: float | Sequence[float] | None
) -> tuple[nn.Module, dict[str, list[float]] | None]:
    """The network to store and its input statistics: a NormalizedModel's own, or ``mean``/``std`` given."""
    if isinstance(model, NormalizedModel):
        if mean is not None or std is not None:
            raise ConfigError("the model is a NormalizedModel and carries its own mean/std; do not pass them")
        return model.model, {"mean": model.normalize.mean.tolist(), "std": model.normalize.std.tolist()}
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std, or neither")
    if mean is not None and std is not None:
        probe = Normalize(mean, std)
        return model, {"mean": probe.mean.tolist(), "std": probe.std.tolist()}
    return model, None


def save_checkpoint(
    model: nn.Module,
    path: PathLike,
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> Path:
    """Save ``model`` as a robustlab checkpoint that :func:`load_model` / :func:`load_checkpoint` rebuild.

    The file is a dict ``{"format": "robustlab-checkpoint", "version": 1, "arch", "arch_kwargs",
    "state_dict", "normalization": {"mean", "std"} or None, "extra"}`` of plain values and CPU tensors, so it
    loads with ``torch.load(weights_only=True)``. A :class:`NormalizedModel` is stored as its inner network plus
    the statistics (or give ``mean``/``std`` for a bare network that expects normalized inputs).

    Args:
        model: the network (``build_model(arch, **arch_kwargs)`` must build the same parameter shapes; this is
            checked before writing).
        arch: a registered architecture name (:func:`list_models`).
        arch_kwargs: the options the network was built with.
        extra: anything else to keep (epoch, metrics, training config): numbers, strings, tensors, lists/dicts.
    """
    arch_kwargs = dict(arch_kwargs or {})
    extra = dict(extra or {})
    info = model_info(arch)
    _check_plain(arch_kwargs, "arch_kwargs")
    _check_plain(extra, "extra")
    network, normalization = _network_and_normalization(model, mean, std)
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    with torch.device("meta"):  # shapes only: building even a WRN-34-10 here costs nothing
        reference = build_model(info.name, **arch_kwargs)
    mismatch = _state_dict_mismatch(reference, state)
    if mismatch is not None:
        raise ConfigError(f"the model's weights do not match build_model({info.name!r}, **{arch_kwargs}): {mismatch}")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": info.name,
        "arch_kwargs": arch_kwargs,
        "state_dict": state,
        "normalization": normalization,
        "extra": extra,
    }
    file = Path(path).expanduser()
    file.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
        os.replace(tmp_name, file)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return file


def is_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is a robustlab checkpoint (by its format tag)."""
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


def checkpoint_from_payload(payload: Mapping[str, Any], device: torch.device, path: Path | None) -> Checkpoint:
    """Rebuild the model a loaded checkpoint describes; a damaged or too new one is a ModelError naming ``path``."""
    where = str(path) if path is not None else "the checkpoint"
    try:
        version = int(payload.get("version", 0))
        arch = str(payload["arch"])
        arch_kwargs = dict(payload.get("arch_kwargs") or {})
        state = payload["state_dict"]
        normalization = payload.get("normalization")
        extra = dict(payload.get("extra") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{where} is a damaged robustlab checkpoint (missing {exc})") from exc
    if version > CHECKPOINT_VERSION:
        raise ModelError(f"{where} has checkpoint version {version}; this robustlab reads up to {CHECKPOINT_VERSION}")
    try:
        network = build_model(arch, **arch_kwargs)
    except ConfigError as exc:
        raise ModelError(f"{where} needs architecture {arch!r}, which cannot be built here: {exc}") from exc
    load_weights(network, state, f"{where} (arch {arch!r})")
    mean = std = None
    model: nn.Module = network
    if normalization is not None:
        try:
            mean = tuple(float(v) for v in normalization["mean"])
            std = tuple(float(v) for v in normalization["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where} has a damaged normalization entry: {normalization!r}") from exc
        model = NormalizedModel(network, mean, std)
    return Checkpoint(model.to(device).eval(), arch, arch_kwargs, mean, std, extra, path)


def load_checkpoint(path: PathLike, *, device: Device = "cpu") -> Checkpoint:
    """Load a file written by :func:`save_checkpoint`: the model (eval mode, on ``device``) and its metadata."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataNotFoundError(f"no such checkpoint file: {file}")
    target = resolve_device(device)
    payload = torch_load(file, target, allow_pickle=False)
    if not is_checkpoint(payload):
        raise ModelError(f"{file} is not a robustlab checkpoint (no format tag {CHECKPOINT_FORMAT!r}); use load_model")
    return checkpoint_from_payload(payload, target, file)
