"""Models from the field's own zoos, named `torchvision:<name>` or `timm:<name>` wherever a model is named.

A zoo name resolves to a `ModelSpec` like a built-in one: a constructor taking `num_classes` (freshly
initialised: weights come from a checkpoint, never downloaded), the default input size and the
normalisation mean and std the zoo publishes for the model (torchvision's weights metadata, timm's
pretrained config). torchvision ships with torch; timm is the optional extra `pip install 'dfkd[timm]'`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from dfkd.errors import DfkdError
from dfkd.models.spec import ModelSpec

ZOOS = ("torchvision", "timm")


def _unknown(zoo: str, name: str, known: list[str], listing: str) -> DfkdError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (close: {', '.join(f'{zoo}:{c}' for c in close)})" if close else ""
    return DfkdError(f"unknown {zoo} model {name!r}{hint}: {listing} lists them")


def _torchvision_spec(name: str) -> ModelSpec:
    from torchvision import models

    known = models.list_models(module=models)  # classification models only
    if name not in known:
        raise _unknown("torchvision", name, known, "torchvision.models.list_models(module=torchvision.models)")
    preset = models.get_model_weights(name).DEFAULT.transforms()  # metadata only: nothing is downloaded

    def build(num_classes: int) -> Any:
        return models.get_model(name, weights=None, num_classes=num_classes)

    return ModelSpec(
        f"torchvision:{name}",
        build,
        f"torchvision {name} (weights from a checkpoint)",
        int(preset.crop_size[0]),
        _stats(preset.mean),
        _stats(preset.std),
    )


def _timm_spec(name: str) -> ModelSpec:
    try:
        import timm
    except ImportError:
        raise DfkdError(f"timm:{name} needs timm, which is not installed: pip install 'dfkd[timm]'") from None
    known = timm.list_models()
    if name not in known:
        raise _unknown("timm", name, known, "timm.list_models()")
    config = timm.get_pretrained_cfg(name)
    if config is None:
        raise DfkdError(f"timm:{name} has no pretrained config to take its input size and normalisation from")

    def build(num_classes: int) -> Any:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    return ModelSpec(
        f"timm:{name}",
        build,
        f"timm {name} (weights from a checkpoint)",
        int(config.input_size[-1]),
        _stats(config.mean),
        _stats(config.std),
    )


def _stats(values: Any) -> tuple[float, float, float]:
    first, second, third = (float(v) for v in values)
    return first, second, third


_RESOLVERS: dict[str, Callable[[str], ModelSpec]] = {"torchvision": _torchvision_spec, "timm": _timm_spec}


def zoo_spec(name: str) -> ModelSpec:
    """The spec of `zoo:model`; an unknown zoo or model is a `DfkdError` naming close matches."""
    zoo, _, model = name.partition(":")
    if zoo not in _RESOLVERS or not model:
        raise DfkdError(f"unknown model zoo in {name!r}: name a model as torchvision:<name> or timm:<name>")
    return _RESOLVERS[zoo](model)
