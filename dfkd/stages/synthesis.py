"""Stage 1, `dfkd synthesize`: invert the teacher into the run's synthetic set (`dfkd.synthetic_set`).

One shard is one synthesis batch. Resume continues after the last shard whose sha256 matches the
manifest; a half-written shard never has a manifest entry, so it is never counted. Batch `b` is
seeded with (seed, b), so a resumed run makes the same images as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torchvision.utils import save_image

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.flops import count_flops
from dfkd.carbon.meter import recover_pending
from dfkd.checkpoints import CheckpointMeta, load_checkpoint
from dfkd.collective import agree, all_sum, barrier, broadcast_object, from_primary, gather_objects
from dfkd.config.overrides import apply_overrides, config_dict
from dfkd.config.synthesis import SynthesisConfig
from dfkd.device import (
    Precision,
    default_precision,
    free_memory_bytes,
    legacy_precision,
    prepare_model,
    resolve_device,
)
from dfkd.distributed import current_world
from dfkd.errors import DfkdError
from dfkd.files import atomic_path, sha256_file
from dfkd.manifest import MANIFEST_FILE, SynthesisSection, TeacherRef, synthesis_of
from dfkd.progress import make_progress
from dfkd.rundir import RunDir
from dfkd.stages.evaluate import predict_logits
from dfkd.stages.runner import FlopsPerUnit, StageReport, finished_record, run_metered
from dfkd.synthetic_set import SyntheticSet
from synthesizers import get_synthesizer, list_synthesizers, method_config_class
from synthesizers.base import SynthesisBatch, Synthesizer
from synthesizers.bn_stats import batchnorm_layers

TARGETS_NOTE = "balanced: batch b holds classes (b*B + i) mod C, so every class gets N/C images (±1)"


@dataclass
class PreparedSynthesis:
    """Everything validated before any work starts."""

    config: SynthesisConfig
    method_config: Any
    teacher: torch.nn.Module
    teacher_meta: CheckpointMeta
    teacher_sha256: str
    device: torch.device
    # bf16 when the method's `amp` asks and the device computes bf16 natively; a resumed stage keeps
    # the precision it began in (`adopt_recorded_precision`).
    precision: Precision = "fp32"

    @property
    def config_hash(self) -> str:
        """What makes two runs' shards interchangeable: the method, its settings, the teacher, the seed.

        `compile` and `log_every` change how fast and how often, not which images, so they may differ;
        nor do the settings of a student-aware term (`student_only`), since no student takes part here.
        """
        ignored = ("compile", "log_every", *getattr(self.method_config, "student_only", ()))
        settings = {k: v for k, v in config_dict(self.method_config).items() if k not in ignored}
        identity = {
            "method": self.config.method,
            "method_config": settings,
            "batch_size": self.config.batch_size,
            "seed": self.config.seed,
            "teacher_sha256": self.teacher_sha256,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @property
    def num_batches(self) -> int:
        return math.ceil(self.config.num_images / self.config.batch_size)

    def batch_count(self, index: int) -> int:
        """Images in batch `index`: the batch size, fewer in the last batch."""
        return min(self.config.batch_size, self.config.num_images - index * self.config.batch_size)


def prepare_synthesis(
    config: SynthesisConfig, iterations: int | None = None, check_fit: bool = True
) -> PreparedSynthesis:
    """Validate the method, its settings and the teacher before any file is written, and with `check_fit` that
    the method's state and one batch fit the device (the interleaved mode checks them beside its pool itself)."""
    try:
        config_class = method_config_class(config.method)
    except ValueError:
        raise DfkdError(f"unknown method {config.method!r}: choose one of {', '.join(list_synthesizers())}") from None
    settings: dict[str, Any] = dict(config.method_settings)
    if iterations is not None:
        settings["iterations"] = iterations
    method_config = apply_overrides(config_class(), settings, f"{config.method} setting")
    teacher_path = Path(config.teacher)
    teacher, meta = load_checkpoint(teacher_path)
    if not batchnorm_layers(teacher):
        raise DfkdError(
            f"teacher {teacher_path} ({meta.arch}) has no BatchNorm layers with running statistics: model inversion "
            "matches BN statistics, so use a teacher with BatchNorm"
        )
    device = resolve_device(config.device)
    precision: Precision = default_precision(device) if method_config.amp else "fp32"
    prepared = PreparedSynthesis(config, method_config, teacher, meta, sha256_file(teacher_path), device, precision)
    if check_fit:
        needed, what = get_synthesizer(config.method).persistent_memory(method_config, teacher)
        check_memory(prepared, needed, what, f"lower the {config.method} setting that sets its size")
    return prepared


def check_memory(
    prepared: PreparedSynthesis, reserved: int, reserved_for: str, reserved_fix: str, student: nn.Module | None = None
) -> None:
    """Refuse, before any file is written, what would not fit in the device's free memory: `reserved` bytes
    kept for the whole stage (`reserved_for`, lowered by `reserved_fix`), then one synthesis batch beside
    them (the method's estimate per image, `Synthesizer.bytes_per_image`, with `student` when the batch is
    made against one). A batch too large is refused with the batch size that would fit."""
    config, device = prepared.config, prepared.device
    free = free_memory_bytes(device)
    if reserved > free:
        raise DfkdError(
            f"{reserved_for} needs {reserved / 2**30:.3g} GiB, more than the {free / 2**30:.3g} GiB "
            f"free on {device}: {reserved_fix}"
        )
    size = prepared.teacher_meta.input_size
    per_image = get_synthesizer(config.method).bytes_per_image(
        prepared.method_config, prepared.teacher, size, prepared.precision, student
    )
    needed = config.batch_size * per_image
    if reserved + needed <= free:
        return
    fits = (free - reserved) // per_image
    fix = (
        f"set the synthesis batch size to {fits} or less (--batch-size, or synthesize.batch_size in a recipe)"
        if fits
        else "not one image fits: use a device with more memory or a teacher with a smaller input size"
    )
    beside = f" beside {reserved / 2**30:.3g} GiB for {reserved_for}" if reserved else ""
    raise DfkdError(
        f"a synthesis batch of {config.batch_size} {size}x{size} images needs about {needed / 2**30:.3g} GiB "
        f"({config.method} inverting {prepared.teacher_meta.arch} in {prepared.precision}){beside}, more than the "
        f"{free / 2**30:.3g} GiB free on {device}: {fix}"
    )


def adopt_recorded_precision(prepared: PreparedSynthesis, recorded: SynthesisSection) -> None:
    """A synthesis that already made shards goes on in the precision it began in, so a resumed set holds the
    images an uninterrupted run makes; one begun before dfkd recorded it computed in the legacy precision."""
    legacy = legacy_precision(prepared.device) if prepared.method_config.amp else "fp32"
    prepared.precision = cast(Precision, recorded.get("precision", legacy))


def teacher_ref(prepared: PreparedSynthesis) -> TeacherRef:
    """The teacher as the manifest records it: file, hash, architecture, classes and its own test accuracy."""
    meta = prepared.teacher_meta
    return {
        "path": prepared.config.teacher,
        "sha256": prepared.teacher_sha256,
        "arch": meta.arch,
        "num_classes": meta.num_classes,
        "test_acc": meta.test_acc,
        "dataset": meta.dataset,
        **({"class_names": list(meta.class_names)} if meta.class_names is not None else {}),
    }


def batch_targets(batch_index: int, batch_size: int, count: int, num_classes: int) -> torch.Tensor:
    """Balanced targets: round-robin over the classes, continuing across batches."""
    return (torch.arange(count) + batch_index * batch_size) % num_classes


def check_same_synthesis(run: RunDir, config_hash: str) -> None:
    """A run that holds synthetic data made with other settings is refused (before anything is written)."""
    existing = synthesis_of(run.read_manifest())
    if existing and existing.get("config_hash") != config_hash:
        raise DfkdError(
            f"run dir {run.root} holds synthetic data made with other settings (method, settings, batch size, seed "
            "or teacher): pass --overwrite to start over or use another --run"
        )


def prepare_run_dir(run: RunDir, prepared: PreparedSynthesis, overwrite: bool) -> int:
    """Make the run dir ready; returns how many complete shards are already there to resume after.

    A shard counts only while it also holds the images this run's batch of that index would (an
    earlier, smaller --num-images leaves a short last shard), so the final count is exact. Nothing is
    deleted before the run is known to be resumable.
    """
    if overwrite:
        run.discard("synthesis", "distillation")
    check_same_synthesis(run, prepared.config_hash)
    synthetic = SyntheticSet(run)
    shards = synthetic.valid_shards()[: prepared.num_batches]
    done = next(
        (i for i, path in enumerate(shards) if synthetic.shard_count(path) != prepared.batch_count(i)), len(shards)
    )
    if done and not synthetic.state_intact(done - 1) and build_synthesizer(prepared).state_dict()["tensors"]:
        state = synthetic.state_path(done - 1)
        if run.relative(state) in run.read_manifest()["artifacts"]:  # every shard is fine: the state is not
            raise DfkdError(
                f"{prepared.config.method} cannot continue after shard {done - 1} of {run.root}: its state "
                f"{run.relative(state)} is missing or does not match its manifest hash; restore that file or pass "
                "--overwrite to start over"
            )
        raise DfkdError(
            f"{prepared.config.method} cannot continue after shard {done - 1} of {run.root}: only its state after the "
            f"last shard is kept, and shard {done} is damaged or holds another number of images; restore that shard "
            "or pass --overwrite to start over"
        )
    synthetic.prune(keep=done)
    if done:
        adopt_recorded_precision(prepared, synthesis_of(run.read_manifest()))
    return done


def batches_left(root: Path, prepared: PreparedSynthesis) -> int:
    """How many batches a run of `prepared` in `root` still has to make (read-only: a quick look, before the
    lock is taken; `prepare_run_dir` decides): all of them for a new run dir or one made with other settings."""
    if not (root / MANIFEST_FILE).is_file():
        return prepared.num_batches
    run = RunDir.open(root, create=False)
    if synthesis_of(run.read_manifest()).get("config_hash") != prepared.config_hash:
        return prepared.num_batches
    synthetic = SyntheticSet(run)
    shards = synthetic.valid_shards()[: prepared.num_batches]
    done = next(
        (i for i, path in enumerate(shards) if synthetic.shard_count(path) != prepared.batch_count(i)), len(shards)
    )
    return prepared.num_batches - done


def write_batch(
    synthetic: SyntheticSet,
    prepared: PreparedSynthesis,
    synthesizer: Synthesizer,
    index: int,
    batch: SynthesisBatch,
    targets: torch.Tensor,
    config_hash: str | None = None,
) -> torch.Tensor:
    """Write `batch` as shard `index` with the synthesizer's state after it, both recorded; returns the uint8
    images. A non-finite loss stops the run with the shards before it kept."""
    tensors, shard_meta = shard_tensors(prepared, index, batch, targets, config_hash)
    synthetic.write_shard(index, tensors, shard_meta, synthesizer.state_dict())
    return tensors["images"]


def shard_tensors(
    prepared: PreparedSynthesis,
    index: int,
    batch: SynthesisBatch,
    targets: torch.Tensor,
    config_hash: str | None = None,
    kept: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Shard `index`'s tensors (uint8 images, targets, logits, losses) and metadata; a non-finite loss is refused
    (the message names the `kept` shards recorded before it: all before `index` in one process)."""
    images = (batch.images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    tensors = {
        "images": images.cpu().contiguous(),
        "targets": targets.to(torch.int64).cpu().contiguous(),
        "logits": batch.logits.detach().float().cpu().contiguous(),
        "losses": batch.losses.detach().float().cpu().contiguous(),
    }
    if not torch.isfinite(tensors["losses"]).all():
        raise DfkdError(
            f"synthesis batch {index} produced a non-finite loss: the {index if kept is None else kept} shards before "
            "it are kept; "
            "lower the method's lr with --set lr=..."
        )
    shard_meta = {
        "method": prepared.config.method,
        "config_hash": config_hash or prepared.config_hash,
        "teacher_sha256": prepared.teacher_sha256,
        "index": str(index),
        "count": str(len(targets)),
    }
    return tensors, shard_meta


def finished_result(run: RunDir, prepared: PreparedSynthesis, done: int) -> dict[str, Any] | None:
    """The recorded result when every shard is made, the quality figures are recorded and the ledger
    holds the stage's complete record, else None.

    The ledger record is the last step of the stage: a run killed after the manifest's figures but
    before the record is not finished, and its rerun writes the record. Rerunning a finished synthesis
    does no work and meters nothing (no empty ledger records).
    """
    stage = synthesis_of(run.read_manifest())
    preview = SyntheticSet(run).preview_path
    if done < prepared.num_batches or "quality" not in stage or stage.get("images") != prepared.config.num_images:
        return None
    if not preview.exists():
        return None
    record = finished_record(
        run,
        lambda r: (
            r.get("stage") == "synthesis"
            # Records written before the config hash was recorded match on their figures alone.
            and r.get("info", {}).get("config_hash", prepared.config_hash) == prepared.config_hash
            and r.get("result", {}).get("quality") == stage["quality"]
        ),
    )
    if record is None:
        return None
    return {"quality": stage["quality"], "preview": run.relative(preview), "shards": stage["shards"]}


def load_synthesizer_state(synthetic: SyntheticSet, synthesizer: Synthesizer, index: int) -> None:
    """Restore the state saved with shard `index`, checked against its manifest hash.

    A method that keeps nothing across batches (DeepInversion) needs no state, so it can re-make any
    shard, also one before the last.
    """
    state = synthetic.read_state(index)
    if state is None:
        if synthesizer.state_dict()["tensors"]:
            raise DfkdError(
                f"{synthetic.state_path(index)} is missing or does not match the manifest: "
                "pass --overwrite to start the synthesis over"
            )
        return
    synthesizer.load_state_dict(state)


def quality_figures(
    images: torch.Tensor,
    targets: torch.Tensor,
    teacher: torch.nn.Module,
    meta: Any,
    device: torch.device,
    sample: int,
    precision: Precision,
) -> dict[str, Any]:
    """How good the synthetic set is, by the teacher's own judgement.

    target_agreement: % of images the teacher classifies as their target; mean_confidence: mean max
    softmax; class_histogram: counts of teacher predictions; diversity: mean pairwise cosine similarity
    of the teacher's penultimate features over a random sample (lower = more diverse).
    """
    logits = predict_logits(teacher, images, meta.mean, meta.std, device, precision=precision).cpu()
    predictions = logits.argmax(1)
    picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:sample]
    features = predict_logits(
        teacher, images[picked], meta.mean, meta.std, device, features=True, precision=precision
    ).cpu()
    unit = torch.nn.functional.normalize(features, dim=1)
    similarity = unit @ unit.T
    n = len(unit)
    off_diagonal = (
        (similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1)) if n > 1 else torch.tensor(float("nan"))
    )
    return {
        "images": len(images),
        "target_agreement": float((predictions == targets).float().mean() * 100),
        "mean_confidence": float(logits.softmax(1).max(1).values.mean()),
        "class_histogram": torch.bincount(predictions, minlength=meta.num_classes).tolist(),
        "target_histogram": torch.bincount(targets, minlength=meta.num_classes).tolist(),
        "diversity_mean_cosine": float(off_diagonal),
        "diversity_sample": n,
    }


def write_preview(
    run: RunDir, images: torch.Tensor, targets: torch.Tensor, num_classes: int, per_class: int = 10
) -> Path:
    """A class-sorted grid: one row per class, the first `per_class` images of that class."""
    rows = []
    for c in range(num_classes):
        chosen = images[targets == c][:per_class]
        if len(chosen) < per_class:
            chosen = torch.cat([chosen, torch.zeros(per_class - len(chosen), *images.shape[1:], dtype=images.dtype)])
        rows.append(chosen)
    grid = torch.cat(rows).float() / 255
    path = SyntheticSet(run).preview_path
    with atomic_path(path) as tmp:
        save_image(grid, tmp, nrow=per_class, padding=1, format="png")
    run.record_artifact(path, "synthesis", role="preview")
    return path


def synthesize_stage(
    prepared: PreparedSynthesis, run: RunDir, start_shard: int, show_progress: bool = True
) -> StageReport:
    """Make the remaining shards, then the preview and the quality figures; record all in the manifest.

    Under torchrun the batches go round the ranks: in each round rank r makes batch `first + r`, seeded as a
    single process seeds it, and writes its shard; the ranks then merge the method's state (`merge_round`:
    nothing for DeepInversion, CMI's bank and head, the fast generator) and rank 0 records the round's
    shards and the state after them in one manifest write. Rank 0 alone makes the preview and the figures.
    """
    config, device = prepared.config, prepared.device
    meta = prepared.teacher_meta
    world = current_world()
    synthesizer = build_synthesizer(prepared)
    synthetic = SyntheticSet(run)
    if start_shard:
        load_synthesizer_state(synthetic, synthesizer, start_shard - 1)
    barrier()  # every rank has read the state's manifest entry before rank 0 rewrites the manifest
    if world.primary:
        run.update_manifest(
            stages={
                "synthesis": {
                    "config": config_dict(config),
                    "method_config": config_dict(prepared.method_config),
                    "config_hash": prepared.config_hash,
                    "teacher": teacher_ref(prepared),
                    "targets": TARGETS_NOTE,
                    "device": str(device),
                    "precision": prepared.precision,
                }
            }
        )
    iterations = prepared.method_config.iterations
    made = 0
    started = time.perf_counter()
    with make_progress(show_progress and world.primary) as progress:
        done_images = min(start_shard * config.batch_size, config.num_images)
        task = progress.add_task(f"synthesize {config.method}", total=config.num_images, completed=done_images, info="")

        def report_step(step: int, loss: torch.Tensor) -> None:
            seconds = max(time.perf_counter() - started, 1e-9)
            rate = world.size * (made * iterations + step * count) / seconds
            progress.update(
                task,
                info=f"step {step}/{iterations} loss {loss.item():.3f}  "
                f"{world.size * made / seconds:,.1f} images/s  {rate:,.0f} img-steps/s",
            )

        def make_batch(index: int, count: int, kept: int) -> tuple[int, str, int] | None:
            """Batch `index` (`count` images; none past the last batch) as a written shard: (index, sha256, count)."""
            if not count:
                return None
            torch.manual_seed(config.seed * 1_000_003 + index)
            targets = batch_targets(index, config.batch_size, count, meta.num_classes)
            step_report = report_step if show_progress and world.primary else None
            batch = synthesizer.synthesize(targets, progress=step_report)
            tensors, shard_meta = shard_tensors(prepared, index, batch, targets, kept=kept)
            return index, synthetic.write_shard_file(index, tensors, shard_meta), count

        for first in range(start_shard, prepared.num_batches, world.size):
            index = first + world.rank
            count = prepared.batch_count(index) if index < prepared.num_batches else 0
            # A rank's refusal (a non-finite loss) stops every rank, not only its own.
            written = agree(partial(make_batch, index, count, first))
            made += count
            synthesizer.merge_round(made=written is not None)
            round_shards = [entry for entry in gather_objects(written) if entry is not None]
            if world.primary:
                synthetic.record_shards([(i, digest) for i, digest, _ in round_shards], synthesizer.state_dict())
            progress.update(task, advance=sum(entry[2] for entry in round_shards))
    made = all_sum(made, device)

    def finish() -> tuple[dict[str, Any], int]:
        data = synthetic.load()
        preview = write_preview(run, data["images"], data["targets"], meta.num_classes)
        quality = quality_figures(
            data["images"],
            data["targets"],
            prepare_model(prepared.teacher, device, prepared.precision),
            meta,
            device,
            config.quality_sample,
            prepared.precision,
        )
        shards = synthetic.valid_shards()
        run.update_manifest(
            stages={"synthesis": {"quality": quality, "shards": len(shards), "images": len(data["images"])}}
        )
        return {"quality": quality, "preview": run.relative(preview), "shards": len(shards)}, len(data["images"])

    # Rank 0 makes the preview and the figures while the others wait inside the stage, metered as its part.
    result, images_total = from_primary(finish)
    work = {
        "images_made": made,
        "images_total": images_total,
        "iterations": iterations,
        "image_steps": made * iterations,
        "seconds_in_loop": time.perf_counter() - started,
        **({"world_size": world.size} if world.several else {}),
    }
    return StageReport(result=result, work=work, flops_units=made * iterations)


def build_synthesizer(prepared: PreparedSynthesis) -> Synthesizer:
    """The method's synthesizer; what it draws when built (CMI's head) comes from the run's seed, not
    from whatever the process drew before, so two runs with one seed make the same images."""
    meta = prepared.teacher_meta
    torch.manual_seed(prepared.config.seed)
    return get_synthesizer(prepared.config.method)(
        prepared.teacher,
        prepared.method_config,
        prepared.device,
        meta.mean,
        meta.std,
        meta.num_classes,
        meta.input_size,
        prepared.precision,
    )


def synthesis_step_flops(prepared: PreparedSynthesis, student: torch.nn.Module | None = None) -> float:
    """FLOPs of one image-step of the method: the difference between 2- and 1-iteration runs on 2 images, on CPU.

    With a `student` (the interleaved mode) its forward and backward passes of the student-aware term
    are counted too, with any warm-up that would leave the term out set to none.
    """
    method_class = get_synthesizer(prepared.config.method)
    meta = prepared.teacher_meta
    targets = torch.arange(2) % meta.num_classes
    probe: dict[str, Any] = {"compile": False, "amp": False}
    if student is not None and hasattr(prepared.method_config, "warmup_batches"):
        probe["warmup_batches"] = 0

    def run(iterations: int) -> float:
        config = apply_overrides(prepared.method_config, {**probe, "iterations": iterations})
        synthesizer = method_class(
            prepared.teacher, config, torch.device("cpu"), meta.mean, meta.std, meta.num_classes, meta.input_size
        )
        return count_flops(lambda: synthesizer.synthesize(targets, student=student))

    return (run(2) - run(1)) / 2


def run_synthesis(
    prepared: PreparedSynthesis, run: RunDir, carbon: CarbonConfig, overwrite: bool = False, show_progress: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage 1 as `dfkd synthesize` and `dfkd run` do it: resume or start, metered; returns (result, work).

    A finished synthesis returns its recorded result and meters nothing. The caller holds the run's lock
    (under torchrun: rank 0 holds it, and every rank calls this; rank 0 alone reads and writes the manifest).
    """
    world = current_world()

    def prepare() -> tuple[int, dict[str, Any] | None, Precision]:
        recover_pending(run.ledger_path)  # a killed attempt's energy is recorded before any shortcut
        start = prepare_run_dir(run, prepared, overwrite)
        result = finished_result(run, prepared, start)
        if result is None:
            run.update_manifest(carbon=config_dict(carbon))
        return start, result, prepared.precision

    start, result, prepared.precision = from_primary(prepare)
    if result is not None:
        return result, {"images_made": 0, "already_finished": True}
    config = prepared.config
    info = {
        "method": config.method,
        "num_images": config.num_images,
        "batch_size": config.batch_size,
        "resumed_after_shard": start,
        "config_hash": prepared.config_hash,
        "precision": prepared.precision,
    }
    # Counted by rank 0 alone, which writes the record (a CPU probe: the other ranks need not wait on it).
    flops = FlopsPerUnit(synthesis_step_flops(prepared), "image-step") if world.primary else None
    report = run_metered(
        run,
        "synthesis",
        carbon,
        prepared.device,
        info,
        lambda: synthesize_stage(prepared, run, start, show_progress=show_progress),
        flops,
    )
    return broadcast_object((report.result, report.work))  # rank 0's figures, the job's, on every rank
