"""Where and how tensors run: device choice, bf16 autocast, channels_last, seeding, the LR schedule."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Callable, ContextManager

import torch
from torch import nn

from dfkd.errors import DfkdError


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` -> CUDA when present, else CPU; `cpu`, `cuda`, `cuda:N` as given (checked)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DfkdError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DfkdError(f"device {spec} asked for, but CUDA is not available here: use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise DfkdError(f"device {spec!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def autocast(device: torch.device) -> ContextManager:
    """bf16 autocast on CUDA (safe for these convnets: BN and losses stay fp32); plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to `device`; channels_last on CUDA, where cuDNN's convolutions are fastest in NHWC."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def compiled(model: nn.Module, enabled: bool, device: torch.device) -> nn.Module:
    """`torch.compile(model)` on CUDA when asked (it shares the parameters, so save `model` itself)."""
    return torch.compile(model) if enabled and device.type == "cuda" else model


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)


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
