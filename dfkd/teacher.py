"""`dfkd teacher train`: the standard CIFAR recipe for a teacher (or a real-data student baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from dfkd.checkpoints import CIFAR10_MEAN, CIFAR10_STD, CheckpointMeta, save_checkpoint
from dfkd.config import config_dict
from dfkd.data import check_data_path, load_split, stratified_subset
from dfkd.evaluate import evaluate_on
from dfkd.models import create_model, model_spec
from dfkd.rundir import RunDir, utc_now
from dfkd.runtime import compiled, prepare_model, resolve_device, seed_everything, sgd_with_cosine
from dfkd.stages import StageReport, supervised_step_flops
from dfkd.training import EpochStats, train_epochs


@dataclass(frozen=True)
class TeacherConfig:
    """SGD (Nesterov, momentum 0.9), cosine schedule, weight decay 5e-4, random crop + flip.

    `lr` is given for a batch of 128 and scaled linearly with `batch_size` (Goyal et al. 2017).
    """

    arch: str = "wrn40_2"
    data: str = ""
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    seed: int = 0
    device: str = "auto"
    eval_every: int = 10
    train_subset: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        model_spec(self.arch)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.eval_every < 1:
            raise ValueError("epochs, batch_size, eval_every must be >= 1 and lr > 0")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError("warmup_epochs must be within [0, epochs)")
        if self.train_subset < 0:
            raise ValueError("train_subset must be >= 0 (0 = the whole training split)")
        if 0 < self.train_subset < self.batch_size:
            raise ValueError(f"train_subset {self.train_subset} is smaller than one batch of {self.batch_size}: lower --batch-size")

    @property
    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / 128


def train_teacher(config: TeacherConfig, out: Path, run: RunDir, show_progress: bool = True) -> StageReport:
    """Train `config.arch` on the training split of `config.data`, save it to `out` and record it in `run`."""
    device = resolve_device(config.device)
    seed_everything(config.seed)
    train_set = load_split(Path(config.data), "train")
    test_set = load_split(Path(config.data), "test")
    if config.train_subset:
        train_set = train_set.subset(stratified_subset(train_set.labels, config.train_subset, config.seed))
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    model = prepare_model(create_model(config.arch, train_set.num_classes), device)
    steps_per_epoch = len(train_set.images) // config.batch_size
    optimizer, scheduler = sgd_with_cosine(
        model,
        config.scaled_lr,
        total_steps=config.epochs * steps_per_epoch,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_epochs * steps_per_epoch,
    )
    forward = compiled(model, config.compile, device)
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    log: list[dict[str, Any]] = []

    def after_epoch(stats: EpochStats) -> None:
        entry = {"epoch": stats.epoch, "loss": stats.loss, "lr": stats.lr, "images_per_s": stats.images_per_s}
        if stats.epoch % config.eval_every == 0 or stats.epoch == config.epochs:
            entry["test_acc"] = evaluate_on(model, test_set, mean, std, device)["accuracy"]
        log.append(entry)

    train_epochs(
        model,
        optimizer,
        scheduler,
        images,
        labels,
        lambda x, y, _: F.cross_entropy(forward(x), y),
        epochs=config.epochs,
        start_epoch=0,
        batch_size=config.batch_size,
        mean=mean,
        std=std,
        generator=generator,
        after_epoch=after_epoch,
        description=f"train {config.arch}",
        show_progress=show_progress,
    )
    accuracy = log[-1]["test_acc"]
    meta = CheckpointMeta(
        arch=config.arch,
        num_classes=train_set.num_classes,
        mean=mean,
        std=std,
        dataset=f"{Path(config.data).resolve().name} ({check_data_path(Path(config.data))})",
        test_acc=accuracy,
        extra={"epochs": str(config.epochs), "trained_utc": utc_now(), "recipe": "dfkd teacher train"},
    )
    digest = save_checkpoint(out, model, meta)
    run.update_manifest(
        stages={"teacher": {"config": config_dict(config), "log": log, "checkpoint": str(out), "checkpoint_sha256": digest}}
    )
    images_seen = config.epochs * steps_per_epoch * config.batch_size
    return StageReport(
        result={"test_acc": accuracy, "checkpoint": str(out), "checkpoint_sha256": digest},
        work={"epochs": config.epochs, "images": images_seen, "device": str(device)},
        flops_probe=lambda: supervised_step_flops(model, 32, train_set.num_classes),
        flops_units=images_seen,
        flops_unit_name="training image",
    )
