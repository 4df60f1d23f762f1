"""Name -> factory for the networks, explicit and small (timm's registry without the magic).

Factories register themselves where the network is defined; importing ``models`` imports those
modules, so there is no folder scanning and no fallback to a similar name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _FACTORIES:
            raise ValueError(f"model {name!r} is registered twice")
        _FACTORIES[name] = factory
        return factory

    return wrap


def create_model(name: str, **kwargs: object) -> nn.Module:
    try:
        factory = _FACTORIES[name]
    except KeyError:
        known = ", ".join(sorted(_FACTORIES))
        raise KeyError(f"unknown model {name!r}; registered: {known}") from None
    return factory(**kwargs)


def list_models(include_tiny: bool = True) -> list[str]:
    return sorted(n for n in _FACTORIES if include_tiny or not n.endswith("-tiny"))
