"""`dfkd teacher train`: the standard CIFAR recipe for a teacher (or a real-data student baseline).

The checkpoint records the input size and the per-channel mean and std of the data it was trained
on (measured on its training split), so synthesis and distillation normalise as the teacher learnt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from dfkd.carbon.flops import supervised_step_flops
from dfkd.checkpoints import CheckpointMeta, as_recorded, save_checkpoint
from dfkd.config.overrides import config_dict
from dfkd.config.teacher import TeacherConfig
from dfkd.data import check_data_path, load_split, split_shape, stratified_subset
from dfkd.device import compiled, default_precision, prepare_model, resolve_device, seed_everything
from dfkd.files import utc_now
from dfkd.models import create_model
from dfkd.optim import sgd_with_cosine
from dfkd.rundir import RunDir
from dfkd.stages.evaluate import evaluate_on
from dfkd.stages.runner import FlopsPerUnit, StageReport
from dfkd.stages.training import EpochStats, train_epochs


def teacher_flops(config: TeacherConfig) -> FlopsPerUnit:
    """FLOPs of one training image of `config.arch` on its data's class count and image size (counted
    before the stage's meter starts, from the dataset's shape: no split is decoded)."""
    num_classes, input_size = split_shape(config.data)
    flops = supervised_step_flops(create_model(config.arch, num_classes), input_size, num_classes)
    return FlopsPerUnit(flops, "training image")


def train_teacher(config: TeacherConfig, out: Path, run: RunDir, show_progress: bool = True) -> StageReport:
    """Train `config.arch` on the training split of `config.data`, save it to `out` and record it in `run`."""
    device = resolve_device(config.device)
    seed_everything(config.seed)
    train_set = load_split(Path(config.data), "train")
    test_set = load_split(Path(config.data), "test")
    if config.train_subset:
        train_set = train_set.subset(stratified_subset(train_set.labels, config.train_subset, config.seed))
    # Train with exactly the figures the checkpoint will record, so synthesis, distillation and
    # `dfkd evaluate` normalise as the teacher learnt.
    mean, std = (as_recorded(stats) for stats in train_set.channel_stats())
    input_size = train_set.input_size
    precision = default_precision(device)
    model = prepare_model(create_model(config.arch, train_set.num_classes), device, precision)
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
            entry["test_acc"] = evaluate_on(model, test_set, mean, std, device, precision=precision)["accuracy"]
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
        precision=precision,
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
        input_size=input_size,
        test_acc=accuracy,
        extra={"epochs": str(config.epochs), "trained_utc": utc_now(), "recipe": "dfkd teacher train"},
        class_names=tuple(train_set.classes),
    )
    digest = save_checkpoint(out, model, meta)
    run.update_manifest(
        stages={
            "teacher": {
                "config": config_dict(config),
                "log": log,
                "checkpoint": str(out),
                "checkpoint_sha256": digest,
                "input_size": input_size,
                "mean": list(mean),
                "std": list(std),
                "precision": precision,
            }
        }
    )
    images_seen = config.epochs * steps_per_epoch * config.batch_size
    return StageReport(
        result={"test_acc": accuracy, "checkpoint": str(out), "checkpoint_sha256": digest},
        work={"epochs": config.epochs, "images": images_seen, "device": str(device)},
        flops_units=images_seen,
    )
