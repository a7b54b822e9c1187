"""The model zoo: a name -> constructor registry (timm's `create_model`) with the CIFAR Wide-ResNets.

Models are plain `nn.Module`s with no side effects. Parameter names follow the public CIFAR
data-free KD checkpoints (`conv1`, `block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}`, `bn1`,
`fc`) so their weights load unchanged. Every model exposes `forward_features` (the pooled
penultimate features) and `fc`, which the synthesis quality figures use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from dfkd.errors import DfkdError


class BasicBlock(nn.Module):
    """Pre-activation WRN block (Zagoruyko & Komodakis 2016).

    A block that changes width takes its 1x1 shortcut from the activated input, as the public
    checkpoints were trained.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(num_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs: a 3x3 stem, three groups of (depth-4)/6 blocks, BN-ReLU, pool, fc."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.adaptive_avg_pool2d(F.relu(self.bn1(out)), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class TinyNet(nn.Module):
    """Two conv-BN-ReLU layers and a linear head: exists only to make tests fast."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)
        self.num_features = 16

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model besides how to build it."""

    build: Callable[[int], nn.Module]
    description: str
    input_size: int = 32
    params_at_10_classes: int | None = None


_REGISTRY: dict[str, ModelSpec] = {
    "wrn16_1": ModelSpec(lambda c: WideResNet(16, 1, c), "Wide-ResNet 16-1 (the paper's student)", 32, 175_066),
    "wrn16_2": ModelSpec(lambda c: WideResNet(16, 2, c), "Wide-ResNet 16-2", 32),
    "wrn40_1": ModelSpec(lambda c: WideResNet(40, 1, c), "Wide-ResNet 40-1", 32),
    "wrn40_2": ModelSpec(lambda c: WideResNet(40, 2, c), "Wide-ResNet 40-2 (the paper's teacher)", 32, 2_243_546),
    "tiny": ModelSpec(TinyNet, "two-layer CNN for fast tests only", 32),
}


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; an unknown name is a `DfkdError` listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DfkdError(f"unknown model {name!r}: choose one of {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build a freshly initialised model by registry name."""
    if num_classes < 2:
        raise DfkdError(f"num_classes must be at least 2, got {num_classes}")
    return model_spec(name).build(num_classes)


def batchnorm_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The model's 2-d BatchNorm layers in forward order (what model inversion matches statistics at)."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
