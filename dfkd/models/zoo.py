"""The built-in models, registered with their default input size and normalisation. No torch here:
each constructor imports its architecture when it is called."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dfkd.models.registry import register_model

if TYPE_CHECKING:
    from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def _wrn(depth: int, widen_factor: int, num_classes: int) -> nn.Module:
    from dfkd.models.wrn import WideResNet

    return WideResNet(depth, widen_factor, num_classes)


@register_model(
    description="Wide-ResNet 16-1 (the paper's student)",
    params_at_10_classes=175_066,
    input_size=32,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
)
def wrn16_1(num_classes: int) -> nn.Module:
    return _wrn(16, 1, num_classes)


@register_model(description="Wide-ResNet 16-2", input_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
def wrn16_2(num_classes: int) -> nn.Module:
    return _wrn(16, 2, num_classes)


@register_model(description="Wide-ResNet 40-1", input_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
def wrn40_1(num_classes: int) -> nn.Module:
    return _wrn(40, 1, num_classes)


@register_model(
    description="Wide-ResNet 40-2 (the paper's teacher)",
    params_at_10_classes=2_243_546,
    input_size=32,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
)
def wrn40_2(num_classes: int) -> nn.Module:
    return _wrn(40, 2, num_classes)


@register_model(description="two-layer CNN for fast tests only", input_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
def tiny(num_classes: int) -> nn.Module:
    from dfkd.models.tiny import TinyNet

    return TinyNet(num_classes)
