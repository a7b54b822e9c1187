"""FLOPs of a stage: torch's FlopCounterMode on one representative step, outside the metered loop."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn`, counted by torch's FlopCounterMode.

    Call it on one representative step outside the metered loop: the counter slows what it wraps.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def supervised_step_flops(
    model: nn.Module, input_size: int, num_classes: int, teacher: nn.Module | None = None
) -> float:
    """FLOPs of one training step per image: forward + backward of `model` (and the frozen teacher's forward).

    Counted on CPU copies with a batch of 2, so the probe never touches the trained model's state.
    """
    student = copy.deepcopy(model).float().cpu().train()
    frozen = copy.deepcopy(teacher).float().cpu().eval() if teacher is not None else None
    x = torch.rand(2, 3, input_size, input_size)
    y = torch.randint(0, num_classes, (2,))

    def step() -> None:
        if frozen is not None:
            with torch.no_grad():
                frozen(x)
        F.cross_entropy(student(x), y).backward()

    return count_flops(step) / 2
