"""Where and how tensors run: device choice, bf16 autocast, channels_last, torch.compile, seeding."""

from __future__ import annotations

import contextlib
import os
import random
from contextlib import AbstractContextManager
from typing import cast

import torch
from torch import nn

from dfkd.errors import DfkdError


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """`auto` -> CUDA when present, else CPU; `cpu`, `cuda`, `cuda:N` as given (checked).

    A CUDA device always comes back with its index, so the meter reads the counter of the GPU
    the stage runs on.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DfkdError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DfkdError(f"device {spec!r} is not supported: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DfkdError(f"device {spec} asked for, but CUDA is not available here: use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def free_memory_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on `device`: free GPU memory, or available physical RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def autocast(device: torch.device) -> AbstractContextManager[None]:
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
    return cast(nn.Module, torch.compile(model)) if enabled and device.type == "cuda" else model


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)
