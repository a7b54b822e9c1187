"""Evaluation of a classifier on a real test split: the paper's Table 5 metrics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd.checkpoints import CheckpointMeta, load_checkpoint
from dfkd.data import AnySplit, ImageSet, SplitClasses, StreamedSplit, load_split, normalize
from dfkd.device import Precision, autocast, default_precision, prepare_model, uses_channels_last
from dfkd.errors import DfkdError
from dfkd.metrics import classification_metrics
from dfkd.models.heads import pooled_features
from dfkd.progress import make_progress

# On the CPU a batch's activations must stay below glibc's 32 MiB mmap threshold, or every batch maps
# fresh pages and faults them in: WRN-40-2 on the 10k CIFAR test images took 66 s at batch 1000 (half
# of it system time, 31M page faults) and 25 s at batch 250 on 2 cores. 128 leaves room for wider models.
CPU_BATCH = 128


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor | ImageSet | StreamedSplit,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    batch_size: int | None = None,
    features: bool = False,
    done: Callable[[int], None] | None = None,
    precision: Precision | None = None,
) -> torch.Tensor:
    """fp32 logits (or, with `features`, penultimate features) of uint8 `images`, in batches, on `device`,
    computed in `precision` (default: bf16 where the device computes it natively).

    `images` is a tensor or a split, resident or streamed from disk (read through its `batches`).
    `batch_size` defaults to 1000 on CUDA and `CPU_BATCH` on the CPU; `done(n)` is told of every batch of
    `n` images once it is queued (a progress bar).
    """
    precision = precision or default_precision(device)
    if batch_size is None:
        batch_size = 1000 if device.type == "cuda" else CPU_BATCH
    model.eval()
    batches = (
        (images[start : start + batch_size] for start in range(0, len(images), batch_size))
        if isinstance(images, torch.Tensor)
        else (batch for batch, _ in images.batches(batch_size, device))
    )
    outputs = []
    for uint8_batch in batches:
        batch = normalize(uint8_batch.to(device, non_blocking=True), mean, std, uses_channels_last(device, precision))
        with autocast(device, precision):
            out = pooled_features(model, batch) if features else model(batch)
        outputs.append(out.float())
        if done is not None:
            done(len(batch))
    return torch.cat(outputs) if outputs else torch.empty(0)


def check_classes(test_set: AnySplit | SplitClasses, meta: CheckpointMeta, model_path: Path | str) -> None:
    """Data whose classes are not the model's would be scored (or trained on) under the wrong labels: their
    count must match, and so must their names, in label order, where the checkpoint records them."""
    if test_set.num_classes != meta.num_classes:
        raise DfkdError(
            f"{model_path} predicts {meta.num_classes} classes but {test_set.source} has {test_set.num_classes}: "
            "evaluate on the dataset the model was trained for"
        )
    if meta.class_names is not None and tuple(test_set.classes) != meta.class_names:
        label, ours, theirs = next(
            (i, a, b) for i, (a, b) in enumerate(zip(meta.class_names, test_set.classes)) if a != b
        )
        raise DfkdError(
            f"{model_path} calls class {label} {ours!r} but {test_set.source} calls it {theirs!r}: use the data the "
            "model was trained for, its classes named and ordered as the checkpoint's (dfkd checkpoint info lists them)"
        )


def evaluate_on(
    model: nn.Module,
    test_set: AnySplit,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    show_progress: bool = False,
    precision: Precision | None = None,
) -> dict[str, Any]:
    """Table-5 metrics of `model` on `test_set`, resident or streamed (accuracy, per-class P/R/F1, Cohen's
    kappa, confusion)."""
    with make_progress(show_progress) as progress:
        task = progress.add_task(f"evaluate on {len(test_set)} test images", total=len(test_set), info="")
        logits = predict_logits(
            model,
            test_set,
            mean,
            std,
            device,
            done=lambda n: progress.update(task, advance=n),
            precision=precision,
        )
    return classification_metrics(logits.argmax(1).cpu(), test_set.labels, test_set.num_classes, test_set.classes)


def evaluate_checkpoint(
    checkpoint: Path, data: Path, device: torch.device, show_progress: bool = False
) -> dict[str, Any]:
    """Load a checkpoint and evaluate it on the test split of `data` at the model's input size (with a progress
    bar and ETA if asked), streamed from disk when too big to hold decoded."""
    model, meta = load_checkpoint(checkpoint)
    test_set = load_split(data, "test", meta.input_size, stream=True)
    check_classes(test_set, meta, checkpoint)
    precision = default_precision(device)
    model = prepare_model(model, device, precision)
    metrics = evaluate_on(model, test_set, meta.mean, meta.std, device, show_progress, precision)
    metrics["compute_precision"] = precision  # bf16 or fp32
    metrics["model"] = {"path": str(checkpoint), "arch": meta.arch, "num_classes": meta.num_classes}
    metrics["data"] = test_set.source
    return metrics
