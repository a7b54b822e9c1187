"""Device memory of one synthesis batch, estimated before the batch starts.

A batch that does not fit fails only after minutes of set-up on a GPU (CUDA out of memory) and, on a
CPU, swaps the machine to a crawl, so the synthesis stage asks this estimate first and refuses with the
batch size that would fit. The estimate runs the model once on the meta device (shapes only: no memory,
no arithmetic) and counts the outputs of every leaf module for one image: what autograd keeps for the
backward pass through it. The backward pass needs about as much again for the gradients of those
activations at its peak, hence `_BACKWARD_FACTOR`. It is an estimate, not a measurement: allocator
fragmentation, cuDNN workspaces and torch.compile's buffers come on top.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from dfkd.device import Precision

_BACKWARD_FACTOR = 2


def activation_bytes(model: nn.Module, example: Tensor, precision: Precision) -> int:
    """Bytes of the outputs of `model`'s leaf modules for the one-row input `example`, in `precision`.

    bf16 autocast keeps activations in 2 bytes, fp32 in 4 (BN statistics are computed in fp32 but
    their outputs are what is kept).
    """
    element = 2 if precision == "bf16" else 4
    shadow = copy.deepcopy(model).to("meta")
    total = 0

    def count(_: nn.Module, __: Any, output: Any) -> None:
        nonlocal total
        total += sum(t.numel() for t in _tensors(output))

    handles = [m.register_forward_hook(count) for m in shadow.modules() if not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            shadow(example.to("meta"))
    finally:
        for handle in handles:
            handle.remove()
    return total * element


def _tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def training_bytes_per_image(model: nn.Module, example: Tensor, precision: Precision) -> int:
    """What a forward and backward pass through `model` holds at its peak, per input row."""
    return _BACKWARD_FACTOR * activation_bytes(model, example, precision)
