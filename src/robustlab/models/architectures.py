"""The architectures of the robustness literature, registered by name (:func:`robustlab.models.build_model`).

:class:`SmallCNN` (any input size), :func:`sequential_cnn` (verifiable by bound propagation), :class:`LeNet5`
(advertorch's MNIST model), :class:`PreActResNet18`, :class:`WideResNet` (``wrn-34-10``, ``wrn-28-10``) and
:class:`ResNet` (``resnet18``, ``resnet50`` with the CIFAR stem; ``resnet18-imagenet``, ``resnet50-imagenet`` with
ImageNet's). Parameter names follow the reference implementations, so their published state dicts load unchanged.

The CIFAR and ImageNet networks register the input statistics they are conventionally trained with, so
``build_model(name, normalize=True)`` gives the network behind its :class:`~robustlab.models.Normalize` layer
(inputs stay in ``[0, 1]``). Each network checks its input before the first layer: a wrong number of channels, or
an image smaller than the network's total stride (a 28x28 image into an ImageNet ResNet), is an
:class:`~robustlab.errors.InvalidInputError` naming the network and what it takes, not a shape error from inside
torch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.checks import check_choice, check_number, check_positive_int
from robustlab.errors import ConfigError, InvalidInputError
from robustlab.models.registry import register_model

__all__ = [
    "CIFAR10_STATISTICS",
    "IMAGENET_STATISTICS",
    "LeNet5",
    "PreActResNet18",
    "ResNet",
    "SmallCNN",
    "WideResNet",
    "check_image_input",
    "sequential_cnn",
]

# Per-channel (mean, std) of the training images, as the reference implementations normalize with them:
# CIFAR-10's of Wong et al. 2020 and Rice et al. 2020 (locuslab/fast_adversarial, robust_overfitting: utils.py),
# ImageNet's of torchvision's ResNets.
CIFAR10_STATISTICS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
IMAGENET_STATISTICS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _check_sizes(**sizes: int) -> None:
    """Every size (channels, classes, widths) a positive integer, or a ConfigError naming it."""
    for name, value in sizes.items():
        check_positive_int(name, value)


def check_image_input(
    x: Tensor, model: str, channels: int, *, min_size: int = 1, exact_size: int | None = None, hint: str = ""
) -> None:
    """Refuse an input ``model`` cannot take with an :class:`InvalidInputError` saying what it takes.

    ``model`` takes ``(N, channels, H, W)`` images with ``H, W >= min_size`` (its total stride: below it the last
    stages would see nothing but padding), or exactly ``exact_size`` square (a classifier sized for it). ``hint``
    is appended to a size error (e.g. which variant takes small images).
    """
    if x.dim() != 4:
        raise InvalidInputError(f"{model} takes image batches shaped (N, C, H, W), got a tensor {tuple(x.shape)}")
    got_channels, height, width = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    if got_channels != channels:
        raise InvalidInputError(
            f"{model} is built for {channels}-channel images but got {got_channels}-channel ones {tuple(x.shape)}; "
            f"build it with in_channels={got_channels} (robustlab train does this from the data)"
        )
    if exact_size is not None and (height, width) != (exact_size, exact_size):
        raise InvalidInputError(
            f"{model} takes {exact_size}x{exact_size} images, got {height}x{width}{'; ' + hint if hint else ''}"
        )
    if min(height, width) < min_size:
        raise InvalidInputError(
            f"{model} takes images of at least {min_size}x{min_size} (its total stride), got {height}x{width}"
            f"{'; ' + hint if hint else ''}"
        )


@register_model("smallcnn", input_shape=(1, 28, 28), description="conv32-conv64-fc128, any input size")
class SmallCNN(nn.Module):
    """A small, fast convolutional network for any input size (MNIST 28x28, digits 8x8, CIFAR 32x32).

    ``conv3x3(width) - ReLU - maxpool2 - conv3x3(2 width) - ReLU - maxpool2 - adaptive avgpool 4x4 - fc(hidden) -
    ReLU - fc(num_classes)``. The adaptive pooling makes the flattened size independent of the input size; at
    28x28 it averages the 7x7 maps into 4x4 overlapping windows, at 8x8 it spreads the 2x2 maps over 4x4.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        _check_sizes(in_channels=in_channels, num_classes=num_classes, width=width, hidden=hidden)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)  # ceil: a 1x1 map stays 1x1 instead of vanishing
        self.squeeze = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(2 * width * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        out = self.pool(F.relu(self.conv1(x)))
        out = self.pool(F.relu(self.conv2(out)))
        out = torch.flatten(self.squeeze(out), 1)
        return self.fc2(F.relu(self.fc1(out)))

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        check_image_input(x, "SmallCNN", self.conv1.in_channels)


@register_model("lenet5", input_shape=(1, 28, 28), description="advertorch's MNIST LeNet-5 (32-64-200)")
class LeNet5(nn.Module):
    """The MNIST LeNet-5 variant of advertorch (``advertorch/test_utils.py``), with the same parameter names.

    ``conv1`` 3x3x32 - ReLU - maxpool 2 - ``conv2`` 3x3x64 - ReLU - maxpool 2 - ``linear1`` 200 - ReLU -
    ``linear2`` 10, on 1x28x28 inputs in ``[0, 1]`` without normalization. advertorch's pretrained weights
    (``advertorch-lenet5-clean`` / ``-adv``, see :func:`load_model`) load into it unchanged. Unlike the original,
    the ReLUs are not in-place, so intermediate activations stay intact for gradient and bound computations.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        _check_sizes(in_channels=in_channels, num_classes=num_classes)
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
        if not torch.jit.is_scripting():
            self._check_input(x)
        out = self.maxpool1(self.relu1(self.conv1(x)))
        out = self.maxpool2(self.relu2(self.conv2(out)))
        out = torch.flatten(out, 1)
        return self.linear2(self.relu3(self.linear1(out)))

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        hint = "its classifier is sized for MNIST's 28x28 (smallcnn takes any size)"
        check_image_input(x, "LeNet5", self.conv1.in_channels, exact_size=28, hint=hint)


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


@register_model(
    "preactresnet18", input_shape=(3, 32, 32), description="PreAct ResNet-18 (He et al. 2016)",
    normalization=CIFAR10_STATISTICS,
)  # fmt: skip
class PreActResNet18(nn.Module):
    """PreAct ResNet-18 (He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016).

    The CIFAR variant used by Rice, Wong & Kolter, "Overfitting in adversarially robust deep learning", ICML 2020
    and Wong, Rice & Kolter, "Fast is better than free", ICLR 2020, with their parameter names (``conv1``,
    ``layer1..4``, ``bn``, ``linear``), so their state dicts load. Global average pooling replaces their fixed
    4x4 pooling: identical on 32x32 inputs, and other sizes work too.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        _check_sizes(num_classes=num_classes, in_channels=in_channels)
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
        if not torch.jit.is_scripting():
            self._check_input(x)
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        check_image_input(x, type(self).__name__, self.conv1.in_channels, min_size=8)


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


@register_model(
    "wideresnet", input_shape=(3, 32, 32), description="WideResNet, depth and widen_factor options",
    normalization=CIFAR10_STATISTICS,
)  # fmt: skip
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
        _check_sizes(depth=depth, widen_factor=widen_factor, num_classes=num_classes, in_channels=in_channels)
        if (depth - 4) % 6 != 0:
            raise ConfigError(f"WideResNet depth must be 6n + 4 (16, 22, 28, 34, 40, ...), got {depth}")
        drop_rate = check_number("drop_rate", drop_rate, low=0.0, high=1.0, high_open=True)
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
        if not torch.jit.is_scripting():
            self._check_input(x)
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        check_image_input(x, "WideResNet", self.conv1.in_channels, min_size=4)

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


def _register_named_wide_resnets() -> None:
    """The WideResNets of the adversarial-training literature by name: depth and width fixed, other options free."""
    for depth, widen, source in ((34, 10, " (Madry et al. / TRADES)"), (28, 10, "")):
        register_model(
            f"wrn-{depth}-{widen}",
            WideResNet,
            input_shape=(3, 32, 32),
            description=f"WideResNet-{depth}-{widen}{source}",
            defaults={"depth": depth, "widen_factor": widen},
            normalization=CIFAR10_STATISTICS,
        )


_register_named_wide_resnets()


class BasicBlock(nn.Module):
    """ResNet basic block: ``conv3x3-BN-ReLU-conv3x3-BN`` plus the (projected) input, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck: ``conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN`` plus the (projected) input, then
    ReLU. The stride sits on the 3x3 convolution, as in torchvision's ResNet-50 ("v1.5") and the RobustBench zoo."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """The shortcut: identity (an empty Sequential) where the shape is kept, else a strided 1x1 conv and BN."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


_RESNET_LAYOUTS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
RESNET_STEMS = ("cifar", "imagenet")


@register_model(
    "resnet", input_shape=(3, 32, 32), description="ResNet, depth (18/34/50/101/152) and stem options",
    normalization=CIFAR10_STATISTICS,
)  # fmt: skip
class ResNet(nn.Module):
    """ResNet (He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016).

    ``stem="cifar"``: a 3x3 convolution with stride 1 and no max-pooling (total stride 8), the CIFAR layout of the
    adversarial-training literature and the RobustBench zoo (``model_zoo/architectures/resnet.py``).
    ``stem="imagenet"``: a 7x7 convolution with stride 2 and a 3x3 max-pool with stride 2 (total stride 32), as
    torchvision's ``resnet18``/``resnet50``. Parameter names are the zoo's (``conv1``, ``bn1``, ``layer1..4``,
    blocks' ``shortcut``, ``linear``), so its CIFAR state dicts load unchanged; torchvision's names (``downsample``,
    ``fc``) are read too, so its ImageNet state dicts load into ``stem="imagenet"``. Global average pooling (the
    zoo's fixed 4x4 pooling at 32x32) lets other input sizes through.
    """

    def __init__(self, depth: int = 18, num_classes: int = 10, in_channels: int = 3, stem: str = "cifar") -> None:
        super().__init__()
        _check_sizes(depth=depth, num_classes=num_classes, in_channels=in_channels)
        if depth not in _RESNET_LAYOUTS:
            raise ConfigError(f"ResNet depth must be one of {', '.join(map(str, _RESNET_LAYOUTS))}, got {depth}")
        self.stem = check_choice("stem", stem, RESNET_STEMS)
        block, counts = _RESNET_LAYOUTS[depth]
        self.depth = depth
        if self.stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        planes = 64
        layers = []
        for width, count, stride in zip((64, 128, 256, 512), counts, (1, 2, 2, 2)):
            blocks = []
            for i in range(count):
                blocks.append(block(planes, width, stride if i == 0 else 1))
                planes = width * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(planes, num_classes)
        for module in self.modules():  # torchvision's initialization
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        name = f"ResNet-{self.depth} ({self.stem} stem)"
        if self.stem == "imagenet":
            hint = f"for small images use the CIFAR stem (resnet{self.depth}, or stem='cifar')"
            check_image_input(x, name, self.conv1.in_channels, min_size=32, hint=hint)
        else:
            check_image_input(x, name, self.conv1.in_channels, min_size=8)

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
        # torchvision's names for the same tensors: blocks' ``downsample`` is our ``shortcut``, ``fc`` our ``linear``.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix) :]
            renamed = rest.replace(".downsample.", ".shortcut.")
            renamed = "linear." + renamed[3:] if renamed.startswith("fc.") else renamed
            if renamed != rest:
                state_dict[prefix + renamed] = state_dict.pop(key)  # torch passes a copy of the caller's dict
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _register_named_resnets() -> None:
    """ResNet-18 and -50 by name, with the CIFAR stem (``resnet18``) and with ImageNet's (``resnet18-imagenet``)."""
    for depth in (18, 50):
        register_model(
            f"resnet{depth}", ResNet, input_shape=(3, 32, 32),
            description=f"ResNet-{depth}, CIFAR stem (3x3 conv, no max-pool)",
            defaults={"depth": depth, "stem": "cifar"}, normalization=CIFAR10_STATISTICS,
        )  # fmt: skip
        register_model(
            f"resnet{depth}-imagenet", ResNet, input_shape=(3, 224, 224),
            description=f"ResNet-{depth}, ImageNet stem (7x7 conv stride 2, max-pool), as torchvision's",
            defaults={"depth": depth, "stem": "imagenet", "num_classes": 1000}, normalization=IMAGENET_STATISTICS,
        )  # fmt: skip


_register_named_resnets()


@register_model("seqcnn", input_shape=(1, 28, 28), description="Sequential conv16-conv32-fc100, verifiable")
def sequential_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 16) -> nn.Sequential:
    """The small CNN of certified-training papers as an ``nn.Sequential`` that bound propagation can verify.

    ``conv4x4/2(width) - ReLU - conv4x4/2(2 width) - ReLU - Flatten - fc100 - ReLU - fc(num_classes)`` (the
    "small" model of Gowal et al. 2018 / Zhang et al. 2020 with width 16). No pooling and no BatchNorm in train
    mode, so IBP and CROWN apply (see :mod:`robustlab.certification.bounds`).
    """
    _check_sizes(in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)
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
