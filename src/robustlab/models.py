"""Models: normalization as the first layer, the architectures of the robustness literature, and loading.

- :class:`Normalize` / :class:`NormalizedModel`: ``(x - mean) / std`` inside the model, so attacks, threat models
  and certificates all work in the raw input box (RobustBench's ``normalize_model``; the ``NormalizeLayer`` of
  Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019).
- Architectures, registered by name (:func:`build_model`, :func:`list_models`): :class:`SmallCNN`,
  :class:`LeNet5` (advertorch's MNIST model), :class:`PreActResNet18` and :class:`WideResNet` (``wrn-34-10``).
- :func:`save_checkpoint` / :func:`load_checkpoint`: a self-describing file (format tag, architecture name and
  options, weights, normalization) that loads with ``torch.load(weights_only=True)``.
- :func:`load_model`: one entry point for every way a model is handed over: a TorchScript file, a robustlab
  checkpoint, a bare state dict plus ``arch``, a ``package.module:function`` factory, or a pretrained name
  (:func:`list_pretrained`). Models come back in eval mode on the requested device.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.errors import ConfigError, DataNotFoundError, InvalidInputError, ModelError
from robustlab.state_io import describe_load_failure

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "LeNet5",
    "ModelInfo",
    "Normalize",
    "NormalizedModel",
    "PreActResNet18",
    "PretrainedInfo",
    "SmallCNN",
    "WideResNet",
    "build_model",
    "list_models",
    "list_pretrained",
    "load_checkpoint",
    "load_model",
    "model_info",
    "register_model",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "robustlab-checkpoint"
CHECKPOINT_VERSION = 1
PathLike = str | os.PathLike[str]
Device = torch.device | str


# ----------------------------------------------------------------------------------------------- normalization
def _per_channel(value: float | Sequence[float] | Tensor, what: str) -> Tensor:
    try:
        out = torch.as_tensor(value, dtype=torch.float32).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{what} must be a number or one number per channel, got {value!r}") from exc
    if out.numel() == 0 or not bool(torch.isfinite(out).all()):
        raise ConfigError(f"{what} must be finite numbers, one per channel, got {value!r}")
    return out


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, meant as a model's first layer.

    Inputs stay in the data's box (``[0, 1]`` for images), where threat models, attacks and certificates are
    defined; the normalization a network was trained with is part of the network. ``mean`` and ``std`` are
    registered buffers, so they move with ``.to(device)`` and are saved in the state dict.

    Args:
        mean, std: one value per channel, or a single value for every channel (e.g. ``(0.1307,), (0.3081,)``
            for MNIST, or the CIFAR-10 statistics for 3 channels). ``std`` must be positive.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``; any ``(N, C, ...)`` works.
    """

    if TYPE_CHECKING:  # buffers; annotated for type checkers only (TorchScript cannot read these annotations)
        mean: Tensor
        std: Tensor

    def __init__(self, mean: float | Sequence[float] | Tensor, std: float | Sequence[float] | Tensor) -> None:
        super().__init__()
        mean_t, std_t = _per_channel(mean, "mean"), _per_channel(std, "std")
        if mean_t.numel() != std_t.numel() and 1 not in (mean_t.numel(), std_t.numel()):
            raise ConfigError(f"mean has {mean_t.numel()} channels but std has {std_t.numel()}")
        if bool((std_t <= 0).any()):
            raise ConfigError(f"std must be positive, got {std_t.tolist()}")
        channels = max(mean_t.numel(), std_t.numel())
        self.register_buffer("mean", mean_t.expand(channels).clone())
        self.register_buffer("std", std_t.expand(channels).clone())

    @property
    def channels(self) -> int:
        return int(self.mean.numel())

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            self._check(x)
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = self.mean.to(x.dtype).reshape(shape)
        std = self.std.to(x.dtype).reshape(shape)
        return (x - mean) / std

    @torch.jit.unused
    def _check(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise InvalidInputError(f"Normalize needs inputs shaped (N, C, ...), got {tuple(x.shape)}")
        if self.channels > 1 and x.shape[1] != self.channels:
            raise InvalidInputError(
                f"Normalize has statistics for {self.channels} channels but the input has {x.shape[1]}"
            )

    def extra_repr(self) -> str:
        return f"mean={[round(v, 6) for v in self.mean.tolist()]}, std={[round(v, 6) for v in self.std.tolist()]}"


class NormalizedModel(nn.Module):
    """``model(normalize(x))``: a network together with the input normalization it was trained with.

    :func:`save_checkpoint` stores the inner model's weights with the statistics, and :func:`load_checkpoint`
    rebuilds this wrapper, so the model always takes raw inputs in ``[0, 1]``.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: float | Sequence[float] | Tensor,
        std: float | Sequence[float] | Tensor,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalize(x))


# ------------------------------------------------------------------------------------------------ architectures
class SmallCNN(nn.Module):
    """A small, fast convolutional network for any input size (MNIST 28x28, digits 8x8, CIFAR 32x32).

    ``conv3x3(width) - ReLU - maxpool2 - conv3x3(2 width) - ReLU - maxpool2 - adaptive avgpool 4x4 - fc(hidden) -
    ReLU - fc(num_classes)``. The adaptive pooling makes the flattened size independent of the input size; at
    28x28 it averages the 7x7 maps into 4x4 overlapping windows, at 8x8 it spreads the 2x2 maps over 4x4.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        _positive_ints(in_channels=in_channels, num_classes=num_classes, width=width, hidden=hidden)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)  # ceil: a 1x1 map stays 1x1 instead of vanishing
        self.squeeze = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(2 * width * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool(F.relu(self.conv1(x)))
        out = self.pool(F.relu(self.conv2(out)))
        out = torch.flatten(self.squeeze(out), 1)
        return self.fc2(F.relu(self.fc1(out)))


class LeNet5(nn.Module):
    """The MNIST LeNet-5 variant of advertorch (``advertorch/test_utils.py``), with the same parameter names.

    ``conv1`` 3x3x32 - ReLU - maxpool 2 - ``conv2`` 3x3x64 - ReLU - maxpool 2 - ``linear1`` 200 - ReLU -
    ``linear2`` 10, on 1x28x28 inputs in ``[0, 1]`` without normalization. advertorch's pretrained weights
    (``advertorch-lenet5-clean`` / ``-adv``, see :func:`load_model`) load into it unchanged. Unlike the original,
    the ReLUs are not in-place, so intermediate activations stay intact for gradient and bound computations.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        _positive_ints(in_channels=in_channels, num_classes=num_classes)
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3, padding=1, stride=1)
        self.relu1 = nn.ReLU()
        self.maxpool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1, stride=1)
        self.relu2 = nn.ReLU()
        self.maxpool2 = nn.MaxPool2d(2)
        self.linear1 = nn.Linear(7 * 7 * 64, 200)
        self.relu3 = nn.ReLU()
        self.linear2 = nn.Linear(200, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.maxpool1(self.relu1(self.conv1(x)))
        out = self.maxpool2(self.relu2(self.conv2(out)))
        out = torch.flatten(out, 1)
        return self.linear2(self.relu3(self.linear1(out)))


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``BN-ReLU-conv3x3-BN-ReLU-conv3x3`` plus the (projected) input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.project = stride != 1 or in_planes != planes
        # A 1x1 projection on the pre-activated input where the shape changes (He et al. 2016, option B).
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))
            if self.project
            else nn.Sequential()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.project else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 (He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016).

    The CIFAR variant used by Rice, Wong & Kolter, "Overfitting in adversarially robust deep learning", ICML 2020
    and Wong, Rice & Kolter, "Fast is better than free", ICLR 2020, with their parameter names (``conv1``,
    ``layer1..4``, ``bn``, ``linear``), so their state dicts load. Global average pooling replaces their fixed
    4x4 pooling: identical on 32x32 inputs, and other sizes work too.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        _positive_ints(num_classes=num_classes, in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        planes = 64
        layers = []
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(PreActBlock(planes, width, stride), PreActBlock(width, width, 1)))
            planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


class WideBasicBlock(nn.Module):
    """Wide ResNet block: ``BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3`` plus the (projected) input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.equal_in_out = in_planes == out_planes and stride == 1
        # convShortcut: the name in the TRADES and Madry et al. checkpoints.
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = x
        if self.convShortcut is not None:
            shortcut = self.convShortcut(out)  # the projection sees the pre-activated input
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideGroup(nn.Module):
    """``n`` wide blocks at one width (the ``NetworkBlock`` of the TRADES code: blocks live in ``.layer``)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """Wide residual network WRN-depth-k (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

    The CIFAR layout used for adversarial training by Madry et al. 2018 and TRADES (Zhang et al., ICML 2019),
    WRN-34-10 by default, with the TRADES parameter names (``conv1``, ``block1..3.layer.i``, ``bn1``, ``fc``).
    TRADES' code also builds an unused ``sub_block1`` whose weights its checkpoints carry; they are ignored when
    loading. ``(depth - 4)`` must be divisible by 6: ``(depth - 4) / 6`` blocks per group at widths
    ``16k, 32k, 64k``.
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        _positive_ints(depth=depth, widen_factor=widen_factor, num_classes=num_classes, in_channels=in_channels)
        if (depth - 4) % 6 != 0:
            raise ConfigError(f"WideResNet depth must be 6n + 4 (16, 22, 28, 34, 40, ...), got {depth}")
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WideGroup(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideGroup(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideGroup(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():  # the initialization of the reference implementation
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + "sub_block1.")]:
            del state_dict[key]  # torch passes a copy of the caller's dict
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _positive_ints(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


# ------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ModelInfo:
    """A registered architecture: how to build it and the input it was designed for."""

    name: str
    factory: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    input_shape: tuple[int, int, int]
    description: str


_MODELS: dict[str, ModelInfo] = {}


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_model(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    input_shape: tuple[int, int, int],
    description: str,
    defaults: Mapping[str, Any] | None = None,
) -> ModelInfo:
    """Register an architecture under ``name`` (case-insensitive; ``_`` and ``-`` are the same).

    ``defaults`` are keyword arguments for ``factory`` that the name implies (``wrn-34-10`` is
    ``WideResNet`` with ``depth=34, widen_factor=10``); :func:`build_model` options override them.
    """
    key = _canonical(name)
    if key in _MODELS and _MODELS[key].factory is not factory:
        raise ConfigError(f"an architecture named {key!r} is already registered")
    info = ModelInfo(key, factory, dict(defaults or {}), input_shape, description)
    _MODELS[key] = info
    return info


def list_models() -> list[str]:
    """Names :func:`build_model` accepts."""
    return sorted(_MODELS)


def model_info(arch: str) -> ModelInfo:
    """The registry entry of ``arch`` (factory, default options, designed-for input shape, description)."""
    if not isinstance(arch, str) or _canonical(arch) not in _MODELS:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of: {', '.join(list_models())}")
    return _MODELS[_canonical(arch)]


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """A freshly initialized model of a registered architecture (:func:`list_models`), in train mode.

    Example:
        >>> model = build_model("smallcnn", in_channels=1, num_classes=10)
        >>> model = build_model("wrn-34-10", num_classes=100)
    """
    info = model_info(arch)
    options = {**info.defaults, **kwargs}
    try:
        inspect.signature(info.factory).bind(**options)
    except TypeError as exc:
        accepted = ", ".join(inspect.signature(info.factory).parameters)
        raise ConfigError(f"architecture {info.name!r} takes the options ({accepted}); got {options}: {exc}") from exc
    return info.factory(**options)


def sequential_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 16) -> nn.Sequential:
    """The small CNN of certified-training papers as an ``nn.Sequential`` that bound propagation can verify.

    ``conv4x4/2(width) - ReLU - conv4x4/2(2 width) - ReLU - Flatten - fc100 - ReLU - fc(num_classes)`` (the
    "small" model of Gowal et al. 2018 / Zhang et al. 2020 with width 16). No pooling and no BatchNorm in train
    mode, so IBP and CROWN apply (see :mod:`robustlab.certification.bounds`).
    """
    _positive_ints(in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)
    side = (image_size - 2) // 2 + 1  # each 4x4 convolution with stride 2 and padding 1
    side = (side - 2) // 2 + 1
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * side * side, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


register_model("smallcnn", SmallCNN, input_shape=(1, 28, 28), description="conv32-conv64-fc128, any input size")
register_model(
    "seqcnn", sequential_cnn, input_shape=(1, 28, 28), description="Sequential conv16-conv32-fc100, verifiable"
)
register_model("lenet5", LeNet5, input_shape=(1, 28, 28), description="advertorch's MNIST LeNet-5 (32-64-200)")
register_model(
    "preactresnet18", PreActResNet18, input_shape=(3, 32, 32), description="PreAct ResNet-18 (He et al. 2016)"
)
register_model(
    "wideresnet", WideResNet, input_shape=(3, 32, 32), description="WideResNet, depth and widen_factor options"
)
register_model(
    "wrn-34-10",
    WideResNet,
    input_shape=(3, 32, 32),
    description="WideResNet-34-10 (Madry et al. / TRADES)",
    defaults={"depth": 34, "widen_factor": 10},
)
register_model(
    "wrn-28-10",
    WideResNet,
    input_shape=(3, 32, 32),
    description="WideResNet-28-10",
    defaults={"depth": 28, "widen_factor": 10},
)


# ------------------------------------------------------------------------------------------------ checkpoints
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
    network = model
    normalization: dict[str, list[float]] | None = None
    if isinstance(model, NormalizedModel):
        if mean is not None or std is not None:
            raise ConfigError("the model is a NormalizedModel and carries its own mean/std; do not pass them")
        network = model.model
        normalization = {"mean": model.normalize.mean.tolist(), "std": model.normalize.std.tolist()}
    elif (mean is None) != (std is None):
        raise ConfigError("give both mean and std, or neither")
    elif mean is not None and std is not None:
        probe = Normalize(mean, std)
        normalization = {"mean": probe.mean.tolist(), "std": probe.std.tolist()}
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


def _device(device: Device) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r} (use 'cpu', 'cuda', 'cuda:1', 'mps', ...)") from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but CUDA is not available here; use device='cpu'")
    return target


def _is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


def _checkpoint_from_payload(payload: Mapping[str, Any], device: torch.device, path: Path | None) -> Checkpoint:
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
    _load_weights(network, state, f"{where} (arch {arch!r})")
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
    target = _device(device)
    payload = _torch_load(file, target, allow_pickle=False)
    if not _is_checkpoint(payload):
        raise ModelError(f"{file} is not a robustlab checkpoint (no format tag {CHECKPOINT_FORMAT!r}); use load_model")
    return _checkpoint_from_payload(payload, target, file)


# ---------------------------------------------------------------------------------------------- pretrained
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


PRETRAINED: dict[str, PretrainedInfo] = {
    info.name: info
    for info in (
        PretrainedInfo(
            "advertorch-lenet5-clean",
            "lenet5",
            {},
            "advertorch_examples",
            "trained_models/mnist_lenet5_clntrained.pt",
            "pip install advertorch",
            "advertorch's LeNet5 trained on clean MNIST; inputs in [0, 1], no normalization (about 98.9% clean)",
        ),
        PretrainedInfo(
            "advertorch-lenet5-adv",
            "lenet5",
            {},
            "advertorch_examples",
            "trained_models/mnist_lenet5_advtrained.pt",
            "pip install advertorch",
            "advertorch's LeNet5 adversarially trained on MNIST (PGD-40, linf eps 0.3, step 0.01); inputs in "
            "[0, 1] (about 98.6% clean, 93% under PGD at eps 0.3)",
        ),
    )
}


def list_pretrained() -> list[str]:
    """Pretrained model names :func:`load_model` accepts."""
    return sorted(PRETRAINED)


def _pretrained_file(info: PretrainedInfo) -> Path:
    try:
        spec = importlib.util.find_spec(info.package)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / info.relative_path
        if candidate.is_file():
            return candidate
    raise DataNotFoundError(
        f"the weights of {info.name!r} ship with the {info.package} package ({info.relative_path}), which is not "
        f"installed: {info.install}"
    )


def _load_pretrained(info: PretrainedInfo, device: torch.device) -> nn.Module:
    file = _pretrained_file(info)
    state = _torch_load(file, device, allow_pickle=False)  # saved on CUDA: map_location brings it to `device`
    model = build_model(info.arch, **info.arch_kwargs)
    _load_weights(model, _extract_state_dict(state, file), f"{file} ({info.name})")
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------- loading
_FACTORY = re.compile(r"(?P<module>[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")


def _torch_load(file: Path, device: torch.device, *, allow_pickle: bool) -> Any:
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


def _is_torchscript(file: Path) -> bool:
    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _extract_state_dict(obj: Any, file: Path) -> Mapping[str, Tensor]:
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


def _load_weights(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ModelError(
            f"the weights in {where} do not fit {type(model).__name__} (wrong arch or arch_kwargs?): {detail}"
        ) from exc


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

    - a pretrained name (:func:`list_pretrained`), e.g. ``"advertorch-lenet5-adv"``;
    - a TorchScript file (``torch.jit.script(model).save(path)``);
    - a robustlab checkpoint (:func:`save_checkpoint`): architecture, weights and normalization in one file;
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
    target = _device(device)
    key = text.strip().lower()
    if key in PRETRAINED and not os.path.exists(text):
        if arch is not None:
            raise ConfigError(f"{text!r} is a pretrained model with a fixed architecture; do not pass arch")
        return _load_pretrained(PRETRAINED[key], target)
    file = Path(text).expanduser()
    if not file.exists():
        if _FACTORY.fullmatch(text):
            if arch is not None:
                raise ConfigError("arch is for bare state dict files, not for a module:function factory")
            return _load_factory(text, target)
        raise DataNotFoundError(
            f"no model file {file}. A model is a TorchScript file, a robustlab checkpoint, a state dict file "
            f"with arch, a 'package.module:function' factory, or one of: {', '.join(list_pretrained())}"
        )
    if file.is_dir():
        raise ModelError(f"{file} is a folder; give the model file inside it")
    if _is_torchscript(file):
        if arch is not None:
            raise ConfigError(f"{file} is TorchScript and carries its own architecture; do not pass arch")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript
                module = torch.jit.load(str(file), map_location=target)
        except Exception as exc:
            raise ModelError(f"{file} looks like TorchScript but could not be loaded: {exc}") from exc
        return module.eval()
    obj = _torch_load(file, target, allow_pickle=allow_pickle)
    if _is_checkpoint(obj):
        checkpoint = _checkpoint_from_payload(obj, target, file)
        if arch is not None and _canonical(arch) != checkpoint.arch:
            raise ConfigError(
                f"{file} is a robustlab checkpoint of architecture {checkpoint.arch!r}, but arch={arch!r} was given"
            )
        return checkpoint.model
    if isinstance(obj, nn.Module):
        return obj.to(target).eval()
    try:
        state = _extract_state_dict(obj, file)
    except ModelError:
        raise ModelError(
            f"{file} holds a {type(obj).__name__}, which is neither TorchScript, a robustlab checkpoint nor a "
            "state dict"
        ) from None
    if arch is None:
        raise ModelError(
            f"{file} is a bare state dict (weights without an architecture): pass arch (--arch) with one of "
            f"{', '.join(list_models())}, plus arch_kwargs if it was built with non-default options"
        )
    model = build_model(arch, **dict(arch_kwargs or {}))
    _load_weights(model, state, f"{file} (arch {_canonical(arch)!r})")
    return model.to(target).eval()
