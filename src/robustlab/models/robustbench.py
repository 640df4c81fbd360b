"""RobustBench model-zoo checkpoints in robustlab's own architectures.

The zoo (Croce et al., "RobustBench: a standardized adversarial robustness benchmark", NeurIPS 2021 Datasets and
Benchmarks) distributes state dicts of its own architecture code. This module reads them into robustlab's
architectures with explicit, tested key mappings (:data:`ZOO_FORMATS`), never by matching parameters in order:

- **WideResNet** (``wrn-28-10``, ``wrn-34-10``, any ``wideresnet``): the zoo's parameter names are robustlab's.
  ``sub_block1.*`` (an unused block TRADES-style checkpoints carry) is dropped; a classifier saved without bias
  (``bias_last=False``) gets an explicit zero bias.
- **PreActResNet-18**: the zoo has two. ``PreActResNet(PreActBlockV2, bn_before_fc=True)`` (Rice et al. 2020,
  Kireev et al. 2021) is robustlab's :class:`~robustlab.models.PreActResNet18` exactly. ``PreActResNet(PreActBlock)``
  (Andriushchenko & Flammarion 2020, Wong et al. 2020) differs in its computation, not only its names: its
  projection shortcuts take the block's raw input and there is no BatchNorm before the classifier;
  :class:`InputShortcutPreActResNet18` computes exactly that. With ``--arch preactresnet18`` the file decides: a
  state dict with the final BatchNorm (``bn.*``) is the first, one without it the second (in the zoo the two
  variants always come with these two key sets); ``preactresnet18-v1`` / ``-v2`` say it explicitly.
- Prefixes ``module.`` (DataParallel) and ``model.`` (the zoo's ``normalize_model`` wrapper) are removed.
- **Normalization**: the zoo keeps it in its model classes (``mu``/``sigma`` buffers, or a ``normalize`` layer);
  when the file carries those statistics they are used, otherwise the caller says (``normalize="cifar10"``,
  ``--normalize cifar10``): most CIFAR-10 zoo models take ``[0, 1]`` inputs without normalization, a few (e.g.
  Wong2020Fast, Rice2020Overfitting) normalize inside with the CIFAR-10 statistics. :data:`ZOO_MODELS` knows a
  handful of zoo entries by name (``robustbench:Wong2020Fast``) with their architecture and normalization.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.errors import ConfigError, DataNotFoundError
from robustlab.models.architectures import PreActBlock, PreActResNet18
from robustlab.models.registry import MODELS, build_model, model_info, register_model
from robustlab.registry import normalize_name

__all__ = [
    "NORMALIZATIONS",
    "ZOO_FORMATS",
    "ZOO_MODELS",
    "InputShortcutPreActResNet18",
    "ZooModel",
    "fit_zoo_state_dict",
    "normalization_stats",
    "resolve_zoo_model",
]

Stats = tuple[tuple[float, ...], tuple[float, ...]]

# Per-channel (mean, std) of the data sets, as the zoo's model classes use them.
NORMALIZATIONS: dict[str, Stats | None] = {
    "none": None,
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def normalization_stats(text: str) -> Stats | None:
    """``"cifar10"``, ``"cifar100"``, ``"imagenet"``, ``"none"``, or ``"M1,M2,M3/S1,S2,S3"``: (mean, std) or None."""
    key = text.strip().lower().replace("-", "")
    if key in NORMALIZATIONS:
        return NORMALIZATIONS[key]
    mean_text, slash, std_text = text.partition("/")
    try:
        if not slash:
            raise ValueError
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError:
        raise ConfigError(
            f"unknown normalization {text!r}: use {', '.join(NORMALIZATIONS)} or MEAN,MEAN,MEAN/STD,STD,STD"
        ) from None
    return mean, std


def _input_shortcut_block(block: PreActBlock, x: Tensor) -> Tensor:
    out = F.relu(block.bn1(x))
    shortcut = block.shortcut(x) if block.project else x  # the raw input, where robustlab's block uses ``out``
    out = block.conv1(out)
    out = block.conv2(F.relu(block.bn2(out)))
    return out + shortcut


class InputShortcutPreActResNet18(PreActResNet18):
    """The zoo's ``PreActResNet(PreActBlock, [2, 2, 2, 2])``: projection shortcuts on the block's raw input, and no
    BatchNorm before the classifier (Andriushchenko & Flammarion, "Understanding and Improving Fast Adversarial
    Training", NeurIPS 2020; Wong, Rice & Kolter, "Fast is better than free", ICLR 2020). Same parameter names as
    :class:`~robustlab.models.PreActResNet18` minus ``bn``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels)
        del self.bn

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                assert isinstance(block, PreActBlock)
                out = _input_shortcut_block(block, out)
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


register_model(
    "preactresnet18-v1", InputShortcutPreActResNet18, input_shape=(3, 32, 32),
    description="the RobustBench zoo's PreActResNet-18 with input shortcuts, no final BN (Wong et al. 2020)",
)  # fmt: skip
register_model(
    "preactresnet18-v2", PreActResNet18, input_shape=(3, 32, 32),
    description="the RobustBench zoo's PreActResNet-18 with a final BN (Rice et al. 2020): robustlab's preactresnet18",
)  # fmt: skip


State = dict[str, Tensor]


@dataclass(frozen=True)
class ZooFormat:
    """How the zoo's state dicts of one architecture family become robustlab's: a key mapping and the classifier."""

    families: tuple[str, ...]  # robustlab architecture names (and prefixes, ending in '-') it applies to
    classifier: str  # the final layer's weight key: its rows are the number of classes
    fit: Callable[[State], State]


def _fit_wide_resnet(state: State) -> State:
    out = {k: v for k, v in state.items() if not k.startswith("sub_block1.")}
    if "fc.weight" in out and "fc.bias" not in out:  # bias_last=False: an explicit zero bias computes the same
        out["fc.bias"] = torch.zeros(out["fc.weight"].shape[0], dtype=out["fc.weight"].dtype)
    return out


def _wide_resnet_size(state: State) -> dict[str, int]:
    """``depth`` and ``widen_factor`` of a WideResNet state dict: ``(depth - 4) / 6`` blocks per group, the first
    group ``16 * widen_factor`` wide."""
    blocks = {k.split(".")[2] for k in state if k.startswith("block1.layer.") and k.count(".") >= 3}
    first = state.get("block1.layer.0.conv1.weight")
    if not blocks or first is None or first.shape[0] % 16:
        return {}
    return {"depth": 6 * len(blocks) + 4, "widen_factor": int(first.shape[0]) // 16}


def _same_names(state: State) -> State:
    return dict(state)


ZOO_FORMATS: tuple[ZooFormat, ...] = (
    ZooFormat(("wideresnet", "wrn-"), "fc.weight", _fit_wide_resnet),
    ZooFormat(("preactresnet18", "preactresnet18-v1", "preactresnet18-v2"), "linear.weight", _same_names),
    ZooFormat(("resnet18", "resnet50"), "linear.weight", _same_names),
)


def _format_of(arch: str) -> ZooFormat | None:
    for zoo_format in ZOO_FORMATS:
        for family in zoo_format.families:
            if arch == family or (family.endswith("-") and arch.startswith(family)):
                return zoo_format
    return None


def _strip_prefixes(state: Mapping[str, Tensor]) -> State:
    out = dict(state)
    for prefix in ("module.", "model."):
        if out and all(k.startswith(prefix) or k in ("mu", "sigma") or k.startswith("normalize.") for k in out):
            out = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in out.items()}
    return out


def _stats_in(state: State) -> tuple[State, Stats | None]:
    """The state without its normalization buffers, and the statistics they held (zoo classes keep them inside)."""
    for mean_key, std_key in (("mu", "sigma"), ("normalize.mean", "normalize.std"), ("mean", "std")):
        if mean_key in state and std_key in state:
            mean = tuple(float(v) for v in state[mean_key].flatten())
            std = tuple(float(v) for v in state[std_key].flatten())
            rest = {k: v for k, v in state.items() if k not in (mean_key, std_key)}
            return rest, (mean, std)
    return state, None


def fit_zoo_state_dict(
    arch: str, state: Mapping[str, Tensor], arch_kwargs: Mapping[str, Any] | None = None
) -> tuple[str, State, dict[str, Any], Stats | None]:
    """(architecture, state dict in its names, options, normalization in the file) for a zoo-format state dict.

    The architecture stays ``arch`` except ``preactresnet18`` without a final BatchNorm, which is the zoo's
    input-shortcut variant (``preactresnet18-v1``). ``num_classes`` comes from the classifier's rows unless given.
    State dicts of other architectures pass with only the prefixes removed.
    """
    key = normalize_name(arch)
    fitted, stats = _stats_in(_strip_prefixes(state))
    options = dict(arch_kwargs or {})
    zoo_format = _format_of(key)
    if zoo_format is None:
        return key, fitted, options, stats
    if key == "preactresnet18" and "bn.weight" not in fitted and "linear.weight" in fitted:
        key = "preactresnet18-v1"
    fitted = zoo_format.fit(fitted)
    if key == "wideresnet":  # the generic name: depth and width are read from the weights unless given
        options = {**_wide_resnet_size(fitted), **options}
    classifier = fitted.get(zoo_format.classifier)
    takes = inspect.signature(model_info(key).factory).parameters if key in MODELS else {}
    if classifier is not None and "num_classes" not in options and "num_classes" in takes:
        options["num_classes"] = int(classifier.shape[0])
    return key, fitted, options, stats


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry robustlab knows: its architecture here and the normalization its zoo class applies."""

    name: str
    dataset: str
    threat: str
    arch: str
    normalize: str


ZOO_MODELS: tuple[ZooModel, ...] = (
    ZooModel("Standard", "cifar10", "Linf", "wrn-28-10", "none"),
    ZooModel("Andriushchenko2020Understanding", "cifar10", "Linf", "preactresnet18-v1", "none"),
    ZooModel("Carmon2019Unlabeled", "cifar10", "Linf", "wrn-28-10", "none"),
    ZooModel("Sehwag2020Hydra", "cifar10", "Linf", "wrn-28-10", "none"),
    ZooModel("Zhang2019Theoretically", "cifar10", "Linf", "wrn-34-10", "none"),
    ZooModel("Wong2020Fast", "cifar10", "Linf", "preactresnet18-v1", "cifar10"),
    ZooModel("Standard", "cifar10", "L2", "wrn-28-10", "none"),
    ZooModel("Rice2020Overfitting", "cifar10", "L2", "preactresnet18-v2", "cifar10"),
)
_ZOO_SPEC = re.compile(
    r"robustbench:(?:(?P<dataset>cifar10)/)?(?:(?P<threat>Linf|L2)/)?(?P<name>[\w.-]+?)(?:@(?P<path>.+))?"
)


def resolve_zoo_model(spec: str) -> tuple[Path, ZooModel]:
    """The checkpoint file and zoo entry of ``robustbench:[cifar10/][Linf|L2/]NAME[@FILE]``.

    Without ``@FILE`` the file is where the zoo's own loader keeps it: ``$ROBUSTBENCH_MODELS`` (default
    ``./models``) ``/cifar10/<threat>/<NAME>.pt``.
    """
    match = _ZOO_SPEC.fullmatch(spec)
    if match is None:
        raise ConfigError(f"write a zoo model as robustbench:[cifar10/][Linf|L2/]NAME[@FILE], got {spec!r}")
    dataset, threat = match.group("dataset") or "cifar10", match.group("threat") or "Linf"
    found = [m for m in ZOO_MODELS if m.name == match.group("name") and m.dataset == dataset and m.threat == threat]
    if not found:
        known = ", ".join(f"{m.threat}/{m.name}" for m in ZOO_MODELS)
        raise ConfigError(
            f"robustlab does not know the zoo model {threat}/{match.group('name')}; known: {known}. For another "
            "zoo checkpoint give the file with --arch and --normalize"
        )
    root = Path(os.environ.get("ROBUSTBENCH_MODELS", "models"))
    file = Path(match.group("path")) if match.group("path") else root / dataset / threat / f"{found[0].name}.pt"
    if not file.exists():
        raise DataNotFoundError(
            f"no checkpoint {file} for the zoo model {threat}/{found[0].name}: download it with robustbench's "
            "load_model on a machine with internet and copy it there (or name it: robustbench:NAME@FILE)"
        )
    return file, found[0]


def build_fitted(arch: str, state: State, options: Mapping[str, Any], where: str) -> nn.Module:
    """A robustlab model of ``arch`` holding ``state`` (strict: every parameter fits), or a ModelError."""
    from robustlab.models.files import load_weights

    model = build_model(arch, **dict(options))
    load_weights(model, state, where)
    return model
