"""The one optimiser-state flattener (distillation's resume file and CMI's state) and the SGD + cosine factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfkd.optim import load_optimizer_tensors, optimizer_tensors, sgd_with_cosine, warmup_cosine


def _trained(optimizer_class: type[torch.optim.Optimizer], steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.SGD])
def test_flattened_state_restores_into_a_fresh_optimiser(optimizer_class: type[torch.optim.Optimizer]) -> None:
    kwargs = {"momentum": 0.9} if optimizer_class is torch.optim.SGD else {}
    model, optimizer = _trained(lambda params, lr: optimizer_class(params, lr=lr, **kwargs), steps=3)
    tensors = optimizer_tensors(optimizer, "opt")
    assert tensors and all(key.startswith("opt.") and key.count(".") == 2 for key in tensors)
    assert all(value.device.type == "cpu" for value in tensors.values())

    fresh = optimizer_class(model.parameters(), lr=0.1, **kwargs)
    load_optimizer_tensors(fresh, {**tensors, "other.0.x": torch.zeros(1)}, "opt")
    saved, loaded = optimizer.state_dict()["state"], fresh.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for index, slots in saved.items():
        restored = loaded[index]
        assert slots.keys() == restored.keys(), index
        assert all(torch.equal(torch.as_tensor(slots[k]), torch.as_tensor(restored[k])) for k in slots)


def test_an_optimiser_that_has_not_stepped_flattens_to_nothing() -> None:
    _, optimizer = _trained(torch.optim.Adam, steps=0)
    assert optimizer_tensors(optimizer, "opt") == {}


def test_sgd_spares_bn_and_bias_from_weight_decay_and_warms_up_then_decays() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer, scheduler = sgd_with_cosine(model, lr=0.2, total_steps=10, warmup_steps=2)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert [p.ndim for p in decay["params"]] == [4] and all(p.ndim == 1 for p in no_decay["params"])
    factor = warmup_cosine(10, 2)
    assert [factor(step) for step in (0, 1, 2, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.0])
    assert scheduler.get_last_lr() == pytest.approx([0.1, 0.1])
