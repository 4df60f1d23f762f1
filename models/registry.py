"""Name -> factory for the networks, explicit and small (timm's registry without the magic).

Factories register themselves where the network is defined; importing ``models`` imports those
modules, so there is no folder scanning and no fallback to a similar name. Each name also registers
its family's checkpoint filter (timm's ``checkpoint_filter_fn``): the one function that reads a
checkpoint's layout from its metadata and converts weights saved by older layouts.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

# (state_dict, metadata, into) -> (create_model kwargs, state_dict): without ``into`` the kwargs rebuild the
# layout the weights were saved with; with a config ``into``, the weights are converted to its layout.
CheckpointFilter = Callable[..., tuple[dict[str, object], dict[str, Tensor]]]

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_FILTERS: dict[str, CheckpointFilter] = {}


def register_model(
    name: str, *, checkpoint_filter: CheckpointFilter
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _FACTORIES:
            raise ValueError(f"model {name!r} is registered twice")
        _FACTORIES[name] = factory
        _FILTERS[name] = checkpoint_filter
        return factory

    return wrap


def _known(name: str) -> None:
    if name not in _FACTORIES:
        known = ", ".join(sorted(_FACTORIES))
        raise KeyError(f"unknown model {name!r}; registered: {known}")


def create_model(name: str, **kwargs: object) -> nn.Module:
    _known(name)
    return _FACTORIES[name](**kwargs)


def checkpoint_filter(name: str) -> CheckpointFilter:
    """The checkpoint filter of the family ``name`` belongs to."""
    _known(name)
    return _FILTERS[name]


def list_models(include_tiny: bool = True) -> list[str]:
    return sorted(n for n in _FACTORIES if include_tiny or not n.endswith("-tiny"))
