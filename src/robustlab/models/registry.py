"""The architecture registry: names to factories, with the input each architecture was designed for.

``build_model("wrn-34-10", num_classes=100)`` builds a registered architecture; :func:`register_model` adds one,
called directly or as a decorator on a class or factory function. Names are case-insensitive and ``-`` and ``_``
are the same (:func:`robustlab.registry.normalize_name`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from torch import nn

from robustlab.errors import ConfigError
from robustlab.registry import Registry, normalize_name

__all__ = ["MODELS", "ModelInfo", "build_model", "list_models", "model_info", "register_model"]

FactoryT = TypeVar("FactoryT", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelInfo:
    """A registered architecture: how to build it and the input it was designed for."""

    name: str
    factory: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    input_shape: tuple[int, int, int]
    description: str


MODELS: Registry[ModelInfo] = Registry("architecture")


@overload
def register_model(
    name: str,
    factory: FactoryT,
    *,
    input_shape: tuple[int, int, int],
    description: str,
    defaults: Mapping[str, Any] | None = None,
) -> ModelInfo: ...
@overload
def register_model(
    name: str,
    factory: None = None,
    *,
    input_shape: tuple[int, int, int],
    description: str,
    defaults: Mapping[str, Any] | None = None,
) -> Callable[[FactoryT], FactoryT]: ...


def register_model(
    name: str,
    factory: FactoryT | None = None,
    *,
    input_shape: tuple[int, int, int],
    description: str,
    defaults: Mapping[str, Any] | None = None,
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
            register_model(name, target, input_shape=input_shape, description=description, defaults=defaults)
            return target

        return decorate
    key = normalize_name(name)
    if key in MODELS and MODELS.get(key).factory is not factory:
        raise ConfigError(f"an architecture named {key!r} is already registered")
    return MODELS.add(ModelInfo(key, factory, dict(defaults or {}), input_shape, description), replace=True)


def list_models(**filters: Any) -> list[ModelInfo]:
    """The architectures :func:`build_model` accepts, sorted by name; filters select by field, e.g.
    ``list_models(input_shape=(3, 32, 32))``."""
    return MODELS.list(**filters)


def model_info(arch: str) -> ModelInfo:
    """The registry entry of ``arch`` (factory, default options, designed-for input shape, description)."""
    if not isinstance(arch, str):
        raise ConfigError(f"unknown architecture {arch!r}; choose one of: {', '.join(MODELS.names())}")
    return MODELS.get(arch)


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
