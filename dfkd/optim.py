"""Optimisers: the SGD + cosine factory, and the one way an optimiser's state is saved and restored.

An optimiser's per-parameter state (momentum buffers, Adam moments and steps) is flattened into
safetensors tensors named `<prefix>.<param index>.<slot>`, so distillation's resume file and CMI's
synthesizer state store it the same way, and restore it through `Optimizer.load_state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn


def warmup_cosine(total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up to 1, then cosine to 0 (Loshchilov & Hutter 2017)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def sgd_with_cosine(
    model: nn.Module,
    lr: float,
    total_steps: int,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    nesterov: bool = True,
    warmup_steps: int = 0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD whose weight decay spares BN and bias parameters (they only scale), stepped per batch."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    return optimizer, scheduler


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, Tensor]:
    """The optimiser's per-parameter state as `{"<prefix>.<index>.<slot>": CPU tensor}` (empty slots left out)."""
    return {
        f"{prefix}.{index}.{slot}": value.detach().to("cpu", copy=True).contiguous()
        for index, slots in optimizer.state_dict()["state"].items()
        for slot, value in slots.items()
        if isinstance(value, Tensor)
    }


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], prefix: str) -> None:
    """Restore what `optimizer_tensors` saved; the parameter groups (lr, betas ...) stay the optimiser's own."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(f"{prefix}."):
            index, slot = key.removeprefix(f"{prefix}.").split(".", 1)
            state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict(
        {"state": dict(sorted(state.items())), "param_groups": optimizer.state_dict()["param_groups"]}
    )
