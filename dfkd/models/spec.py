"""What the registry knows about a model (no torch here): its name, constructor, input size, mean and std."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

Stats = tuple[float, float, float]


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model besides how to build it (`build(num_classes)`)."""

    name: str
    build: Callable[[int], nn.Module]
    description: str
    input_size: int
    mean: Stats
    std: Stats
    params_at_10_classes: int | None = None
