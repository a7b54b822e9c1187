"""One model described for `dfkd models NAME`: where it comes from, its size, input and cost per image."""

from __future__ import annotations

from typing import Any

import torch

from dfkd.carbon.flops import count_flops
from dfkd.models.heads import classifier
from dfkd.models.registry import create_model, model_spec


def describe_model(name: str, num_classes: int) -> dict[str, Any]:
    """Name, description, input size, mean/std, parameters, pooled features and forward FLOPs per image."""
    spec = model_spec(name)
    model = create_model(name, num_classes).eval()
    size = spec.input_size
    with torch.no_grad():
        flops = count_flops(lambda: model(torch.zeros(1, 3, size, size)))
    return {
        "name": spec.name,
        "description": spec.description,
        "num_classes": num_classes,
        "input_size": size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "parameters": sum(p.numel() for p in model.parameters()),
        "features": classifier(model).in_features,
        "forward_flops_per_image": flops,
    }
