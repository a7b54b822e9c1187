"""The model registry, in timm's manner: a decorator registers a constructor under its function name
with the model's default input size, mean and std. No torch here (constructors import their
architecture when called), so configs can check a model name without loading torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dfkd.errors import DfkdError
from dfkd.models.spec import ModelSpec, Stats

if TYPE_CHECKING:
    from torch import nn

_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    *, description: str, input_size: int, mean: Stats, std: Stats, params_at_10_classes: int | None = None
) -> Callable[[Callable[[int], Any]], Callable[[int], Any]]:
    """Decorator: register `build(num_classes) -> nn.Module` under its function name."""

    def register(build: Callable[[int], Any]) -> Callable[[int], Any]:
        name = build.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, build, description, input_size, mean, std, params_at_10_classes)
        return build

    return register


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or for `torchvision:<name>` / `timm:<name>` the zoo's (which imports that
    zoo); an unknown name is a `DfkdError` listing the valid ones."""
    if ":" in name:
        from dfkd.models.external import zoo_spec

        return zoo_spec(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DfkdError(
            f"unknown model {name!r}: choose one of {', '.join(list_models())}, or torchvision:<name> or timm:<name>"
        ) from None


def check_model_name(name: str) -> None:
    """What a config checks a model name by, without needing torch: a built-in or zoo name that does not exist is
    a `DfkdError`. A zoo name is checked against its zoo wherever torch can be imported; the torch-free read side
    (`dfkd validate` on a machine without torch) checks only its zoo, and the model is checked where it runs,
    before any stage starts."""
    try:
        model_spec(name)
    except ImportError:
        if ":" not in name:
            raise


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build a freshly initialised model by registry name."""
    if num_classes < 2:
        raise DfkdError(f"num_classes must be at least 2, got {num_classes}")
    return model_spec(name).build(num_classes)
