"""Device memory of one synthesis batch, estimated before the batch starts.

A batch that does not fit fails only after minutes of set-up on a GPU (CUDA out of memory) and, on a
CPU, swaps the machine to a crawl, so the synthesis stage asks this estimate first and refuses with the
batch size that would fit. The estimate runs the model once on the meta device (shapes only: no memory,
no arithmetic) with autograd's saved-tensor hooks and adds up the tensors autograd keeps for the backward
pass through it, for one image (a view counted once, through the tensor it views; parameters not at all):
within 1.00-1.08x of what a real CPU pass keeps for WRN-16-1/40-2, torchvision's ResNet-18, GoogLeNet and
MobileNetV3 and timm's ResNet-18, ConvNeXt and RegNetY (a test checks some). The backward pass needs about as
much again for the gradients of those activations at its peak, hence `_BACKWARD_FACTOR`. It is an estimate,
not a measurement: allocator fragmentation, cuDNN workspaces and torch.compile's buffers come on top.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dfkd.device import Precision

_BACKWARD_FACTOR = 2


def saved_bytes(model: nn.Module, example: Tensor, precision: Precision) -> int:
    """Bytes autograd keeps for the backward pass of `model`, in its current mode, on the one-row input `example`
    (which, as the synthesizers' images and latent codes do, requires grad), in `precision`.

    bf16 autocast keeps floating activations in 2 bytes, fp32 in 4; integer ones (pooling indices) as they are.
    """
    shadow = copy.deepcopy(model).to("meta")  # in the model's own mode: a frozen teacher is in eval mode
    parameters = {id(p) for p in shadow.parameters()}
    kept: dict[int, tuple[Tensor, int]] = {}  # by id, the tensor held so that no id is reused meanwhile
    floating = 2 if precision == "bf16" else 4

    def pack(tensor: Tensor) -> Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in parameters and id(tensor) not in parameters:
            size = floating if base.is_floating_point() else base.element_size()
            kept[id(base)] = (base, base.numel() * size)
        return tensor

    inputs = example.detach().to("meta").requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        shadow(inputs)
    return sum(size for _, size in kept.values())


def training_bytes_per_image(model: nn.Module, example: Tensor, precision: Precision) -> int:
    """What a forward and backward pass through `model` holds at its peak, per input row."""
    return _BACKWARD_FACTOR * saved_bytes(model, example, precision)
