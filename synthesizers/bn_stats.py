"""Forward hooks on a teacher's BatchNorm layers: the feature-statistics prior of model inversion.

DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020) matches the statistics of the synthetic
batch at the input of every BatchNorm layer l to the running statistics stored in that layer:

    R_BN(x) = Σ_l ‖μ_l(x) − μ_l^BN‖₂ + ‖σ²_l(x) − σ²_l^BN‖₂

where μ_l(x), σ²_l(x) are the per-channel mean and (biased) variance over batch and space.
Contrastive Model Inversion (Fang et al., IJCAI 2021) uses the same prior and, as each synthetic
image's instance feature, the spatial means of all those BN inputs concatenated: (N, Σ_l C_l).

Fast-DFKD (Fang et al., AAAI 2022) matches, instead of one batch's statistics, their blend with a
moving average over the batches made before (momentum m, 0.9 published), so that the set as a whole,
not each small batch, carries the teacher's statistics:

    μ̂_l = m·μ̄_l + (1 − m)·μ_l(x),  σ̂²_l = m·σ̄²_l + (1 − m)·σ²_l(x),  R_BN = Σ_l ‖μ̂_l − μ_l^BN‖₂ + ‖σ̂²_l − σ²_l^BN‖₂

where μ̄, σ̄² are updated after each batch from its kept images (`update_momentum`); the first batch,
with no average yet, is matched on its own.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn
from torch.linalg import vector_norm
from torch.utils.hooks import RemovableHandle


def batchnorm_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The model's 2-d BatchNorm layers that hold running statistics, in registration order."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]


class BatchNormStatistics:
    """Hooks that record, for each teacher forward, R_BN and (optionally) the instance features.

    Call `reset()` before a forward and read `loss()` / `features()` after it. The statistics are
    computed in fp32 with autocast switched off, because bf16 means and variances of wide layers lose
    the small differences the prior is made of. `stat_rows`, when set, restricts R_BN to the first
    rows of the batch (CMI forwards two augmented views at once and matches statistics on one).
    Use as a context manager, or call `remove()`, to take the hooks off the model again.
    """

    def __init__(self, model: nn.Module, instance_features: bool = False, momentum: float | None = None) -> None:
        layers = batchnorm_layers(model)
        if not layers:
            raise ValueError(
                "teacher has no BatchNorm layers: model inversion needs BN statistics "
                "(running mean and variance) to match; use a teacher with BatchNorm2d layers"
            )
        self.instance_features = instance_features
        self.momentum = momentum
        # Per layer: the moving average (mean, var) over earlier batches, and the last forward's own statistics.
        self.averages: list[tuple[Tensor, Tensor]] = []
        self._last: list[tuple[Tensor, Tensor]] = []
        self.stat_rows: int | None = None
        self.feature_dim = sum(layer.num_features for layer in layers)
        self._distances: list[Tensor] = []
        self._features: list[Tensor] = []
        self._handles: list[RemovableHandle] = [layer.register_forward_hook(self._record) for layer in layers]

    def _record(self, module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0]
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            rows = x if self.stat_rows is None else x[: self.stat_rows]
            var, mean = torch.var_mean(rows, dim=(0, 2, 3), correction=0)
            if self.momentum is not None:
                layer = len(self._last)
                self._last.append((mean.detach(), var.detach()))
                if self.averages:
                    average_mean, average_var = self.averages[layer]
                    mean = self.momentum * average_mean + (1 - self.momentum) * mean
                    var = self.momentum * average_var + (1 - self.momentum) * var
            # batchnorm_layers keeps only layers that track running statistics, so both are tensors.
            running_mean, running_var = cast(Tensor, module.running_mean), cast(Tensor, module.running_var)
            distance = vector_norm(mean - running_mean) + vector_norm(var - running_var)
            self._distances.append(distance)
            if self.instance_features:
                self._features.append(x.mean(dim=(2, 3)))

    def reset(self) -> None:
        """Forget what the last forward recorded."""
        self._distances.clear()
        self._features.clear()
        self._last.clear()

    @torch.no_grad()
    def update_momentum(self) -> None:
        """Fold the last forward's statistics into the moving averages (with `momentum` set)."""
        if self.momentum is None or not self._last:
            raise RuntimeError("update_momentum needs hooks made with a momentum and a recorded forward")
        if not self.averages:
            self.averages = [(mean.clone(), var.clone()) for mean, var in self._last]
            return
        m = self.momentum
        self.averages = [
            (m * average_mean + (1 - m) * mean, m * average_var + (1 - m) * var)
            for (average_mean, average_var), (mean, var) in zip(self.averages, self._last)
        ]

    def loss(self) -> Tensor:
        """R_BN of the last forward: a fp32 scalar on the model's device, differentiable."""
        if not self._distances:
            raise RuntimeError("no forward was recorded since the last reset()")
        return torch.stack(self._distances).sum()

    def features(self) -> Tensor:
        """(N, Σ_l C_l) fp32 spatial means of every BN input of the last forward, in layer order."""
        if not self._features:
            raise RuntimeError("no instance features recorded: create the hooks with instance_features=True")
        return torch.cat(self._features, dim=1)

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    def __enter__(self) -> BatchNormStatistics:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
