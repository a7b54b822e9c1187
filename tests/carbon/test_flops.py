"""FLOP counting: torch's counter on one call, and the per-image training-step probe."""

from __future__ import annotations

import torch
from torch import nn

from dfkd.carbon.flops import count_flops, supervised_step_flops


def test_count_flops_of_a_linear_layer() -> None:
    layer, x = nn.Linear(64, 32), torch.randn(8, 64)
    assert count_flops(lambda: layer(x)) == 2 * 64 * 32 * 8


def test_supervised_step_counts_forward_and_backward_and_the_teacher_forward() -> None:
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    forward = 2 * 192 * 4
    # Backward of a linear layer: the weight gradient only (the input needs none), as much as the forward.
    assert supervised_step_flops(student, 8, 4) == 2 * forward
    assert supervised_step_flops(student, 8, 4, teacher=teacher) == 2 * forward + forward
    assert all(p.grad is None for p in student.parameters()), "the probe works on a copy"
