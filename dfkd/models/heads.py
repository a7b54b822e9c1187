"""A classifier's head and the pooled features it reads, for built-in and zoo models alike.

The built-ins expose `forward_features`; torchvision and timm classifiers end in an `nn.Linear` head
(`fc`, `classifier`, `head`…) whose input is the pooled feature vector, so that input is taken with a
forward pre-hook instead of knowing each architecture's attribute names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dfkd.models.tiny import TinyNet
from dfkd.models.wrn import WideResNet


def classifier(model: nn.Module) -> nn.Linear:
    """The model's last `nn.Linear`: its classification head."""
    heads = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classification head")
    return heads[-1]


def pooled_features(model: nn.Module, images: Tensor) -> Tensor:
    """The pooled feature vectors the head classifies, (N, features)."""
    if isinstance(model, WideResNet | TinyNet):  # timm's forward_features is not pooled: not used
        return model.forward_features(images)
    captured: list[Tensor] = []

    def keep(_: nn.Module, inputs: tuple[Any, ...]) -> None:
        captured.append(inputs[0])

    handle = classifier(model).register_forward_pre_hook(keep)
    try:
        model(images)
    finally:
        handle.remove()
    return torch.flatten(captured[-1], 1)
