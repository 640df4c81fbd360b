"""The architecture registry: names to factories, with the input each architecture was designed for.

``build_model("wrn-34-10", num_classes=100)`` builds a registered architecture; :func:`register_model` adds one,
called directly or as a decorator on a class or factory function. Names are case-insensitive and ``-`` and ``_``
are the same (:func:`robustlab.registry.normalize_name`).

Normalization is the model's first layer (:class:`~robustlab.models.NormalizedModel`), never the caller's job. An
architecture records the per-channel input statistics it is conventionally trained with (``normalization``: the
CIFAR-10 statistics for the CIFAR networks, ImageNet's for the ImageNet ones), and
``build_model(arch, normalize=True)`` returns the network behind a :class:`~robustlab.models.Normalize` layer with
them, taking raw inputs in ``[0, 1]``. Without ``normalize`` it returns the bare network, which is what state dicts
and checkpoints describe (:func:`~robustlab.models.save_checkpoint` stores a ``NormalizedModel`` as the network plus
its statistics).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from torch import nn

from robustlab.errors import ConfigError
from robustlab.models.normalization import NormalizedModel
from robustlab.registry import Registry, normalize_name

__all__ = ["MODELS", "ModelInfo", "Statistics", "build_model", "list_models", "model_info", "register_model"]

FactoryT = TypeVar("FactoryT", bound=Callable[..., nn.Module])
Statistics = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std)


@dataclass(frozen=True)
class ModelInfo:
    """A registered architecture: how to build it and the input it was designed for.

    Attributes:
        name, factory, defaults: the registry name, what builds it, and the options the name implies.
        input_shape: the ``(C, H, W)`` it was designed for.
        description: one line for listings.
        normalization: the per-channel ``(mean, std)`` it is conventionally trained with (None: raw ``[0, 1]``
            inputs, as the MNIST networks); ``build_model(..., normalize=True)`` puts them in front of it.
    """

    name: str
    factory: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    input_shape: tuple[int, int, int]
    description: str
    normalization: Statistics | None = None


MODELS: Registry[ModelInfo] = Registry("architecture")


@overload
def register_model(
    name: str,
    factory: FactoryT,
    *,
    input_shape: tuple[int, int, int],
    description: str,
    defaults: Mapping[str, Any] | None = None,
    normalization: Statistics | None = None,
) -> ModelInfo: ...
@overload
def register_model(
    name: str,
    factory: None = None,
    *,
    input_shape: tuple[int, int, int],
    description: str,
    defaults: Mapping[str, Any] | None = None,
    normalization: Statistics | None = None,
) -> Callable[[FactoryT], FactoryT]: ...


def register_model(
    name: str,
    factory: FactoryT | None = None,
    *,
    input_shape: tuple[int, int, int],
    description: str,
    defaults: Mapping[str, Any] | None = None,
    normalization: Statistics | None = None,
) -> ModelInfo | Callable[[FactoryT], FactoryT]:
    """Register an architecture under ``name`` (case-insensitive; ``_`` and ``-`` are the same).

    ``defaults`` are keyword arguments for ``factory`` that the name implies (``wrn-34-10`` is
    ``WideResNet`` with ``depth=34, widen_factor=10``); :func:`build_model` options override them. Registering a
    name again with the same factory updates its entry; another factory under a taken name is an error.

    Called with a factory it returns the new :class:`ModelInfo`; without one it is a decorator::

        @register_model("tinynet", input_shape=(1, 28, 28), description="two convolutions")
        class TinyNet(nn.Module): ...
    """
    if factory is None:

        def decorate(target: FactoryT) -> FactoryT:
            register_model(
                name, target, input_shape=input_shape, description=description, defaults=defaults,
                normalization=normalization,
            )  # fmt: skip
            return target

        return decorate
    key = normalize_name(name)
    if key in MODELS and MODELS.get(key).factory is not factory:
        raise ConfigError(f"an architecture named {key!r} is already registered")
    stats = _checked_statistics(normalization, f"the normalization of {key!r}") if normalization is not None else None
    info = ModelInfo(key, factory, dict(defaults or {}), input_shape, description, stats)
    return MODELS.add(info, replace=True)


def list_models(**filters: Any) -> list[ModelInfo]:
    """The architectures :func:`build_model` accepts, sorted by name; filters select by field, e.g.
    ``list_models(input_shape=(3, 32, 32))``."""
    return MODELS.list(**filters)


def model_info(arch: str) -> ModelInfo:
    """The registry entry of ``arch`` (factory, default options, designed-for input shape, description)."""
    if not isinstance(arch, str):
        raise ConfigError(f"unknown architecture {arch!r}; choose one of: {', '.join(MODELS.names())}")
    return MODELS.get(arch)


def build_model(arch: str, *, normalize: bool | str | Statistics | None = None, **kwargs: Any) -> nn.Module:
    """A freshly initialized model of a registered architecture (:func:`list_models`), in train mode.

    Args:
        arch: a registered name.
        normalize: None or False: the bare network. True: a :class:`NormalizedModel` with the architecture's
            registered input statistics (:attr:`ModelInfo.normalization`; an error for an architecture without
            them). A name (``"cifar10"``, ``"cifar100"``, ``"imagenet"``, ``"none"``) or a ``(mean, std)`` pair:
            those statistics.
        **kwargs: options of the architecture (override the defaults its name implies).

    Example:
        >>> model = build_model("smallcnn", in_channels=1, num_classes=10)
        >>> model = build_model("wrn-34-10", num_classes=100)
        >>> model = build_model("resnet50-imagenet", normalize=True)  # takes [0, 1] images
    """
    info = model_info(arch)
    options = {**info.defaults, **kwargs}
    try:
        inspect.signature(info.factory).bind(**options)
    except TypeError as exc:
        accepted = ", ".join(inspect.signature(info.factory).parameters)
        raise ConfigError(f"architecture {info.name!r} takes the options ({accepted}); got {options}: {exc}") from exc
    stats = _statistics_for(info, normalize)
    if stats is not None:
        takes = inspect.signature(info.factory).parameters
        channels = options.get("in_channels", takes["in_channels"].default if "in_channels" in takes else None)
        if isinstance(channels, int) and len(stats[0]) not in (1, channels):
            raise ConfigError(
                f"the normalization has statistics for {len(stats[0])} channels but {info.name} is built for "
                f"{channels}; give statistics for {channels} channels, or normalize=None"
            )
    network = info.factory(**options)
    return network if stats is None else NormalizedModel(network, *stats)


def _statistics_for(info: ModelInfo, normalize: bool | str | Statistics | None) -> Statistics | None:
    """The (mean, std) ``normalize`` asks for (see :func:`build_model`), or None for the bare network."""
    if normalize is None or normalize is False:
        return None
    if normalize is True:
        if info.normalization is None:
            raise ConfigError(
                f"{info.name} has no registered input statistics (it takes raw [0, 1] inputs); name the "
                "statistics (normalize='cifar10', ...) or leave normalize off"
            )
        return info.normalization
    if isinstance(normalize, str):
        from robustlab.models.robustbench import normalization_stats  # the named statistics (imports this module)

        return normalization_stats(normalize)
    return _checked_statistics(normalize, "normalize")


def _checked_statistics(value: Any, what: str) -> Statistics:
    try:
        mean, std = value
        stats = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a name or a (mean, std) pair of per-channel values, got {value!r}") from None
    if not stats[0] or len(stats[0]) != len(stats[1]) or min(stats[1]) <= 0:
        raise ConfigError(f"{what} needs as many means as positive stds, got {value!r}")
    return stats
