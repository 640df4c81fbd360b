""":func:`load_model`: one entry point for every way a model is handed over.

A pretrained name (:mod:`robustlab.models.pretrained`), a TorchScript file, a robustlab checkpoint
(:mod:`robustlab.models.checkpoints`), a bare state dict plus ``arch``, or a ``package.module:function`` factory.
Files are read without running code from them unless the caller says the file is trusted
(:func:`robustlab.models.files.torch_load`).
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.errors import ConfigError, DataNotFoundError, ModelError
from robustlab.models.checkpoints import checkpoint_from_payload, is_checkpoint
from robustlab.models.files import Device, extract_state_dict, load_weights, resolve_device, torch_load
from robustlab.models.pretrained import PRETRAINED, load_pretrained
from robustlab.models.registry import MODELS, build_model
from robustlab.registry import normalize_name

__all__ = ["load_model"]

PathLike = str | os.PathLike[str]
_FACTORY = re.compile(r"(?P<module>[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")


def load_model(
    spec: PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    device: Device = "cpu",
    allow_pickle: bool = False,
) -> nn.Module:
    """Load a model, in eval mode on ``device``, from whatever ``spec`` names.

    ``spec`` is one of:

    - a pretrained name (:func:`~robustlab.models.list_pretrained`), e.g. ``"advertorch-lenet5-adv"``;
    - a TorchScript file (``torch.jit.script(model).save(path)``);
    - a robustlab checkpoint (:func:`~robustlab.models.save_checkpoint`): architecture, weights and normalization
      in one file;
    - a bare state dict (``torch.save(model.state_dict(), path)``, possibly nested under ``"state_dict"`` or
      ``"model"``, ``module.`` prefixes removed) together with ``arch`` (and ``arch_kwargs``);
    - ``"package.module:function"``: imported and called with no arguments; it must return an ``nn.Module``.

    Files are read with ``torch.load(weights_only=True)`` and ``map_location=device`` (weights saved on a GPU
    load on a CPU-only machine). A whole pickled model (``torch.save(model)``) needs ``allow_pickle=True``,
    which runs code from the file: only for files you trust.

    Raises:
        DataNotFoundError: the file does not exist (or the package of pretrained weights is not installed).
        ModelError: the file is not a model, a state dict is given without ``arch``, the weights do not fit the
            architecture, or a factory cannot be imported or does not return a module.
        ConfigError: an unknown ``arch``, or ``arch`` given with a file that already names its architecture.
    """
    text = os.fspath(spec)
    target = resolve_device(device)
    if text in PRETRAINED and not os.path.exists(text):
        if arch is not None:
            raise ConfigError(f"{text!r} is a pretrained model with a fixed architecture; do not pass arch")
        return load_pretrained(PRETRAINED.get(text), target)
    file = Path(text).expanduser()
    if not file.exists():
        if _FACTORY.fullmatch(text):
            if arch is not None:
                raise ConfigError("arch is for bare state dict files, not for a module:function factory")
            return _load_factory(text, target)
        raise DataNotFoundError(
            f"no model file {file}. A model is a TorchScript file, a robustlab checkpoint, a state dict file "
            f"with arch, a 'package.module:function' factory, or one of: {', '.join(PRETRAINED.names())}"
        )
    if file.is_dir():
        raise ModelError(f"{file} is a folder; give the model file inside it")
    if _is_torchscript(file):
        if arch is not None:
            raise ConfigError(f"{file} is TorchScript and carries its own architecture; do not pass arch")
        return _load_torchscript(file, target)
    return _load_saved(file, target, arch=arch, arch_kwargs=arch_kwargs, allow_pickle=allow_pickle)


def _is_torchscript(file: Path) -> bool:
    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _load_torchscript(file: Path, device: torch.device) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript
            module = torch.jit.load(str(file), map_location=device)
    except Exception as exc:
        raise ModelError(f"{file} looks like TorchScript but could not be loaded: {exc}") from exc
    return module.eval()


def _load_saved(
    file: Path,
    device: torch.device,
    *,
    arch: str | None,
    arch_kwargs: Mapping[str, Any] | None,
    allow_pickle: bool,
) -> nn.Module:
    """A file written by ``torch.save``: a robustlab checkpoint, a whole module (trusted files only) or weights."""
    obj = torch_load(file, device, allow_pickle=allow_pickle)
    if is_checkpoint(obj):
        checkpoint = checkpoint_from_payload(obj, device, file)
        if arch is not None and normalize_name(arch) != checkpoint.arch:
            raise ConfigError(
                f"{file} is a robustlab checkpoint of architecture {checkpoint.arch!r}, but arch={arch!r} was given"
            )
        return checkpoint.model
    if isinstance(obj, nn.Module):
        return obj.to(device).eval()
    try:
        state = extract_state_dict(obj, file)
    except ModelError:
        raise ModelError(
            f"{file} holds a {type(obj).__name__}, which is neither TorchScript, a robustlab checkpoint nor a "
            "state dict"
        ) from None
    if arch is None:
        raise ModelError(
            f"{file} is a bare state dict (weights without an architecture): pass arch (--arch) with one of "
            f"{', '.join(MODELS.names())}, plus arch_kwargs if it was built with non-default options"
        )
    model = build_model(arch, **dict(arch_kwargs or {}))
    load_weights(model, state, f"{file} (arch {normalize_name(arch)!r})")
    return model.to(device).eval()


def _load_factory(spec: str, device: torch.device) -> nn.Module:
    match = _FACTORY.fullmatch(spec)
    assert match is not None
    module_name, attr = match.group("module"), match.group("attr")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import {module_name!r} for the model factory {spec!r}: {exc}") from exc
    except Exception as exc:
        raise ModelError(f"importing {module_name!r} for the model factory {spec!r} failed: {exc!r}") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelError(f"{module_name!r} has no attribute {attr!r} (model factory {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"{spec!r} is a {type(target).__name__}, not a function that returns a model")
    try:
        model = target()
    except Exception as exc:
        raise ModelError(f"the model factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"the model factory {spec!r} returned a {type(model).__name__}; it must return a torch.nn.Module"
        )
    return model.to(device).eval()
