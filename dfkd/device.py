"""Where and how tensors run: device choice, bf16 autocast, channels_last, torch.compile, seeding."""

from __future__ import annotations

import contextlib
import os
import random
from contextlib import AbstractContextManager
from typing import Literal, cast

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
    """Memory that can still be allocated on `device`: free GPU memory, or available physical RAM.

    On Linux, RAM is the kernel's MemAvailable (free pages plus the page cache and slabs it can reclaim):
    free pages alone undercount it by the cache, which reading a dataset fills.
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# What a stage computes in: bf16 autocast (weights, BN statistics and losses stay fp32) or plain fp32.
Precision = Literal["bf16", "fp32"]


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: CUDA GPUs, and CPUs with AMX or AVX512-BF16 (oneDNN
    then runs bf16 convolutions 3-5x faster than fp32; elsewhere bf16 is emulated and slower)."""
    if device.type == "cuda":
        return True
    # Not mkldnn's own bf16 check: it also says yes for AVX512 CPUs without BF16 (Skylake to Ice Lake),
    # where bf16 is emulated and slower than fp32.
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_precision(device: torch.device) -> Precision:
    """bf16 where the device computes it natively, else fp32; `DFKD_PRECISION=fp32` (or `bf16`) chooses."""
    chosen = os.environ.get("DFKD_PRECISION", "auto")
    if chosen == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if chosen not in ("bf16", "fp32"):
        raise DfkdError(f"DFKD_PRECISION={chosen!r} is not a precision: use auto, bf16 or fp32")
    return cast(Precision, chosen)


def legacy_precision(device: torch.device) -> Precision:
    """What dfkd computed in before it used bf16 on CPUs: bf16 on CUDA, fp32 on the CPU. A stage begun
    then resumes in it, so its result stays the one an uninterrupted run of that version gives."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast(device: torch.device, precision: Precision) -> AbstractContextManager[None]:
    """bf16 autocast when `precision` says so (safe for these convnets: BN and losses stay fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def uses_channels_last(device: torch.device, precision: Precision) -> bool:
    """NHWC on CUDA (cuDNN's fastest layout) and under bf16 on the CPU (oneDNN's); NCHW for fp32 on the CPU."""
    return device.type == "cuda" or precision == "bf16"


def prepare_model(model: nn.Module, device: torch.device, precision: Precision) -> nn.Module:
    """Move to `device`, in the memory layout its kernels are fastest in for `precision`."""
    model = model.to(device)
    if uses_channels_last(device, precision):
        model = model.to(memory_format=torch.channels_last)
    return model


def compiled(model: nn.Module, enabled: bool, device: torch.device) -> nn.Module:
    """`torch.compile(model)` on CUDA when asked (it shares the parameters, so save `model` itself)."""
    return cast(nn.Module, torch.compile(model)) if enabled and device.type == "cuda" else model


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)
