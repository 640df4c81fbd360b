""":func:`load_model`: one entry point for every way a model is handed over.

A pretrained name (:mod:`robustlab.models.pretrained`), a TorchScript file, an ONNX file (converted and checked,
:mod:`robustlab.models.onnx_model`), a robustlab checkpoint (:mod:`robustlab.models.checkpoints`), a bare state dict
plus ``arch`` (RobustBench's format included, :mod:`robustlab.models.robustbench`), a ``robustbench:NAME`` zoo
entry, or a ``package.module:function`` factory. Files are read without running code from them unless the caller
says the file is trusted (:func:`robustlab.models.files.torch_load`). An HTTP endpoint spec (``.yaml``/``.json``)
has no weights and gives black-box access only (:func:`robustlab.vendor.connect_spec`).
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
from robustlab.models.files import Device, extract_state_dict, resolve_device, torch_load
from robustlab.models.normalization import NormalizedModel
from robustlab.models.onnx_model import OutputChoice, convert_onnx, is_onnx_file
from robustlab.models.pretrained import PRETRAINED, load_pretrained
from robustlab.models.registry import MODELS
from robustlab.models.robustbench import (
    Stats,
    build_fitted,
    fit_zoo_state_dict,
    normalization_stats,
    resolve_zoo_model,
)
from robustlab.registry import normalize_name

__all__ = ["is_endpoint_spec", "load_model"]

PathLike = str | os.PathLike[str]
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
_FACTORY = re.compile(r"(?P<module>[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")


def load_model(
    spec: PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    device: Device = "cpu",
    allow_pickle: bool = False,
    normalize: str | Stats | None = None,
    onnx_output: OutputChoice = None,
) -> nn.Module:
    """Load a model, in eval mode on ``device``, from whatever ``spec`` names.

    ``spec`` is one of:

    - a pretrained name (:func:`~robustlab.models.list_pretrained`), e.g. ``"advertorch-lenet5-adv"``;
    - a TorchScript file (``torch.jit.script(model).save(path)``);
    - an ONNX file (``.onnx``): converted to PyTorch by onnx2torch and checked against onnxruntime on sample inputs
      (:func:`~robustlab.models.onnx_model.convert_onnx`; the result's ``max_abs_difference`` says how close), for
      white-box attacks. A graph that cannot be converted faithfully is a ModelError that points to its black-box
      handle, :func:`~robustlab.model_access.onnx_oracle`. ``onnx_output`` picks the output of a
      multi-output graph;
    - a robustlab checkpoint (:func:`~robustlab.models.save_checkpoint`): architecture, weights and normalization
      in one file;
    - a bare state dict (``torch.save(model.state_dict(), path)``, possibly nested under ``"state_dict"`` or
      ``"model"``, ``module.``/``model.`` prefixes removed) together with ``arch`` (and ``arch_kwargs``). RobustBench
      zoo files load into robustlab's architectures (:mod:`~robustlab.models.robustbench`), ``num_classes`` read
      from the classifier's weights;
    - ``"robustbench:[cifar10/][Linf|L2/]NAME[@FILE]"``: a zoo entry robustlab knows, with its architecture and
      normalization (:data:`~robustlab.models.robustbench.ZOO_MODELS`);
    - ``"package.module:function"``: imported and called with no arguments; it must return an ``nn.Module``.

    ``normalize`` (``"cifar10"``, ``"cifar100"``, ``"imagenet"``, ``"none"``, ``"M,M,M/S,S,S"`` or ``(mean, std)``)
    puts that normalization in front of a state dict's, an ONNX graph's or a TorchScript file's network, so the
    model takes raw ``[0, 1]`` inputs. Statistics a zoo file carries (``mu``/``sigma`` buffers) apply without it.

    Files are read with ``torch.load(weights_only=True)`` and ``map_location=device`` (weights saved on a GPU
    load on a CPU-only machine). A whole pickled model (``torch.save(model)``) needs ``allow_pickle=True``,
    which runs code from the file: only for files you trust.

    Raises:
        DataNotFoundError: the file does not exist (or the package of pretrained weights is not installed).
        ModelError: the file is not a model, a state dict is given without ``arch``, the weights do not fit the
            architecture, an ONNX graph cannot be converted faithfully, an endpoint spec is given (no weights), or
            a factory cannot be imported or does not return a module.
        ConfigError: an unknown ``arch`` or normalization, or one given with a file that already names its own.
    """
    text = os.fspath(spec)
    target = resolve_device(device)
    stats = _normalization(normalize)
    if text in PRETRAINED and not os.path.exists(text):
        if arch is not None or stats is not None:
            raise ConfigError(f"{text!r} is a pretrained model with a fixed architecture; do not pass arch")
        return load_pretrained(PRETRAINED.get(text), target)
    if text.startswith("robustbench:"):
        zoo_file, entry = resolve_zoo_model(text)
        if arch is not None and normalize_name(arch) != entry.arch:
            raise ConfigError(f"{text} is a {entry.arch}; do not pass another arch ({arch})")
        stats = _normalization(normalize if normalize is not None else entry.normalize)
        return _load_saved(zoo_file, target, arch=entry.arch, arch_kwargs=arch_kwargs, allow_pickle=False, stats=stats)
    return _load_path(
        text,
        target,
        arch=arch,
        arch_kwargs=arch_kwargs,
        allow_pickle=allow_pickle,
        stats=stats,
        onnx_output=onnx_output,
    )


def _load_path(
    text: str,
    target: torch.device,
    *,
    arch: str | None,
    arch_kwargs: Mapping[str, Any] | None,
    allow_pickle: bool,
    stats: Stats | None,
    onnx_output: OutputChoice,
) -> nn.Module:
    """A model from a file (or, when no file has that name, a ``module:function`` factory)."""
    file = Path(text).expanduser()
    if not file.exists():
        if _FACTORY.fullmatch(text):
            if arch is not None or stats is not None:
                raise ConfigError("arch and normalize are for model files, not for a module:function factory")
            return _load_factory(text, target)
        raise DataNotFoundError(
            f"no model file {file}. A model is a TorchScript or ONNX file, a robustlab checkpoint, a state dict file "
            f"with arch, a 'package.module:function' factory, or one of: {', '.join(PRETRAINED.names())}"
        )
    if file.is_dir():
        raise ModelError(f"{file} is a folder; give the model file inside it")
    if is_endpoint_spec(file):
        raise ModelError(
            f"{file} describes an HTTP endpoint, which answers queries but has no weights: it gives black-box access "
            "only (robustlab.vendor.connect_spec in Python; --model SPEC with a black-box attack on the command line)"
        )
    if is_onnx_file(file) or _is_torchscript(file):
        if arch is not None:
            kind = "an ONNX graph" if is_onnx_file(file) else "TorchScript"
            raise ConfigError(f"{file} is {kind} and carries its own architecture; do not pass arch")
        if is_onnx_file(file):
            return _normalized(convert_onnx(file, output=onnx_output, device=target), stats, target)
        return _normalized(_load_torchscript(file, target), stats, target)
    return _load_saved(file, target, arch=arch, arch_kwargs=arch_kwargs, allow_pickle=allow_pickle, stats=stats)


def is_endpoint_spec(path: PathLike) -> bool:
    """Whether ``path`` names an HTTP endpoint spec (a ``.yaml``, ``.yml`` or ``.json`` file)."""
    return os.fspath(path).lower().endswith(SPEC_SUFFIXES)


def _normalization(normalize: str | Stats | None) -> Stats | None:
    if normalize is None:
        return None
    if isinstance(normalize, str):
        return normalization_stats(normalize)
    try:
        mean, std = normalize
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise ConfigError(f"normalize must be a name or (mean, std), got {normalize!r}") from None


def _normalized(model: nn.Module, stats: Stats | None, device: torch.device) -> nn.Module:
    if stats is None:
        return model.to(device).eval()
    return NormalizedModel(model, *stats).to(device).eval()


def _same_stats(a: Stats, b: Stats) -> bool:
    return all(len(x) == len(y) and all(abs(u - v) < 1e-6 for u, v in zip(x, y)) for x, y in zip(a, b))


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
    stats: Stats | None,
) -> nn.Module:
    """A file written by ``torch.save``: a robustlab checkpoint, a whole module (trusted files only) or weights."""
    obj = torch_load(file, device, allow_pickle=allow_pickle)
    if is_checkpoint(obj):
        checkpoint = checkpoint_from_payload(obj, device, file)
        if arch is not None and normalize_name(arch) != checkpoint.arch:
            raise ConfigError(
                f"{file} is a robustlab checkpoint of architecture {checkpoint.arch!r}, but arch={arch!r} was given"
            )
        if stats is not None:
            raise ConfigError(f"{file} is a robustlab checkpoint and carries its own normalization; do not pass one")
        return checkpoint.model
    if isinstance(obj, nn.Module):
        return _normalized(obj, stats, device)
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
    fitted_arch, fitted, options, in_file = fit_zoo_state_dict(arch, state, arch_kwargs)
    if stats is not None and in_file is not None and not _same_stats(stats, in_file):
        raise ConfigError(
            f"{file} carries its own normalization (mean {list(in_file[0])}, std {list(in_file[1])}), which differs "
            "from the one given; drop normalize (--normalize)"
        )
    model = build_fitted(fitted_arch, fitted, options, f"{file} (arch {fitted_arch!r})")
    return _normalized(model, stats if stats is not None else in_file, device)


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
