"""The one supervised training loop that teacher training and distillation share.

Images live on the device as uint8 and are augmented there (random crop pad 4 + flip); the step
loop never synchronises with the host: losses accumulate on the device and are read once per epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dfkd.collective import mean_over_ranks
from dfkd.data import iterate_batches, normalize, random_crop_flip
from dfkd.device import Precision, autocast, uses_channels_last
from dfkd.errors import DfkdError
from dfkd.progress import make_progress

# (normalised augmented batch, labels of the batch, indices into the training set) -> scalar loss
BatchLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EpochStats:
    epoch: int
    loss: float
    images: int
    seconds: float
    lr: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class NonFiniteLoss(DfkdError):
    """The loss became NaN or inf: training stops, keeping the last good epoch's state."""


def train_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    batch_loss: BatchLoss,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    generator: torch.Generator | None,
    precision: Precision,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """One optimiser step on `images[indices]` (uint8, on the device), augmented and normalised there;
    returns the loss as an fp32 device scalar (read it when convenient: reading it is a host sync).

    With `shard` = (rank, ranks) under DistributedDataParallel, every rank draws the whole batch and its
    augmentation from the same generator, so the generators stay in step, and trains on its rows
    rank, rank + ranks, ...; the gradients DDP averages are then those of the whole batch.
    """
    device = images.device
    augmented = random_crop_flip(images[indices], generator=generator)
    rank, ranks = shard
    if ranks > 1:
        augmented, indices = augmented[rank::ranks], indices[rank::ranks]
    batch = normalize(augmented, mean, std, uses_channels_last(device, precision))
    with autocast(device, precision):
        loss = batch_loss(batch, labels[indices], indices)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach().float()


def check_loss(mean_loss: float, where: str, unit: str) -> None:
    """A NaN or inf loss stops training; the last good `unit`'s state stays the one to resume from."""
    if not torch.isfinite(torch.tensor(mean_loss)):
        raise NonFiniteLoss(
            f"the training loss became {mean_loss} in {where}: the last good {unit} is kept; "
            "lower --lr or check the inputs"
        )


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_loss: BatchLoss,
    *,
    epochs: int,
    start_epoch: int,
    batch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    generator: torch.Generator | None,
    precision: Precision,
    after_epoch: Callable[[EpochStats], None],
    description: str,
    show_progress: bool = True,
    batch_info: Callable[[], str] = lambda: "",
    shard: tuple[int, int] = (0, 1),
) -> None:
    """Train `model` for epochs `start_epoch+1 .. epochs`, calling `after_epoch` after each.

    `images` (uint8) and `labels` must already be on the training device. `batch_info` adds text
    to the progress bar (e.g. the last tau) without touching device tensors. `shard`: this rank's part of
    each batch under DDP (`train_step`); the epoch's loss is then the mean over the ranks.
    """
    device = images.device
    steps_per_epoch = len(images) // batch_size
    if steps_per_epoch == 0:
        raise DfkdError(f"{len(images)} training images is fewer than one batch of {batch_size}: lower --batch-size")
    with make_progress(show_progress) as progress:
        task = progress.add_task(description, total=epochs, completed=start_epoch, info="")
        for epoch in range(start_epoch + 1, epochs + 1):
            model.train()
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for indices in iterate_batches(len(images), batch_size, device, generator=generator):
                loss_sum += train_step(
                    optimizer, scheduler, images, labels, indices, batch_loss, mean, std, generator, precision, shard
                )
            mean_loss = (mean_over_ranks(loss_sum) / steps_per_epoch).item()
            check_loss(mean_loss, f"epoch {epoch}", "epoch")
            stats = EpochStats(
                epoch=epoch,
                loss=mean_loss,
                images=steps_per_epoch * batch_size,
                seconds=time.perf_counter() - started,
                lr=optimizer.param_groups[0]["lr"],
            )
            after_epoch(stats)
            progress.update(
                task,
                completed=epoch,
                info=f"loss {mean_loss:.4f}  {stats.images_per_s:,.0f} img/s {batch_info()}",
            )
