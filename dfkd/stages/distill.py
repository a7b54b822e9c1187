"""Stage 2, `dfkd distill`: train a student on the synthetic shards (or real data) with a KD loss.

The temperature is stochastic (a new τ ~ U[2, 20] per batch, Rafat et al. 2023), fixed, or tuned by a
grid of full trials. Output under `<run>/student/`:
    <trial>/resume-eNNNN.safetensors  the state after the last epoch (model, optimiser, schedule, τ sampler,
                                 data order); `resume.safetensors` in runs made before per-epoch names
    <trial>/metrics.jsonl        one JSON line per epoch (loss, lr, img/s, τ histogram, agreement, accuracy)
    <trial>/student.safetensors  the trial's final student
    student.safetensors          the run's student (the winner, for a grid)
A trial is `tau=stochastic`, `tau=4` ...; each is metered as its own ledger record by the caller.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.flops import supervised_step_flops
from dfkd.carbon.meter import recover_pending
from dfkd.checkpoints import CheckpointMeta, load_checkpoint, load_state_into, save_checkpoint
from dfkd.collective import agree, data_parallel, from_primary
from dfkd.config.distill import DistillConfig
from dfkd.config.overrides import config_dict
from dfkd.config.tau import TauSpec
from dfkd.data import AnySplit, ImageSet, load_split, stratified_subset
from dfkd.device import (
    Precision,
    compiled,
    default_precision,
    legacy_precision,
    prepare_model,
    resolve_device,
    seed_everything,
)
from dfkd.distributed import current_world, job_error
from dfkd.errors import DfkdError
from dfkd.files import atomic_path, atomic_write_bytes, sha256_file, utc_now
from dfkd.losses import get_loss
from dfkd.manifest import DistillationSection, distillation_of, synthesis_of
from dfkd.metrics import top1_agreement
from dfkd.models import create_model
from dfkd.optim import load_optimizer_tensors, optimizer_tensors, sgd_with_cosine
from dfkd.rundir import STUDENT_DIR, STUDENT_FILE, RunDir
from dfkd.stages.evaluate import check_classes, evaluate_on, predict_logits
from dfkd.stages.runner import FlopsPerUnit, StageReport, finished_record, run_metered
from dfkd.stages.training import BatchLoss, EpochStats, train_epochs
from dfkd.synthetic_set import SyntheticSet
from dfkd.tau import TauSampler, make_sampler
from dfkd.tensor_files import safetensors_bytes

TAU_BINS = 18


@dataclass
class DistillData:
    """Training images (uint8, on device), their labels, the held-out slice and the validation slice."""

    train: ImageSet
    holdout: ImageSet
    real_labels: bool
    teacher_holdout_logits: torch.Tensor
    validation: ImageSet | None = None


@dataclass
class PreparedDistill:
    config: DistillConfig
    teacher: torch.nn.Module
    teacher_meta: CheckpointMeta
    teacher_sha256: str
    device: torch.device
    data: DistillData
    test_set: AnySplit | None = None
    trials: list[str] = field(default_factory=list)
    source: str = ""
    precision: Precision = "fp32"
    identity: str = ""
    identity_teacher_path: str | None = None  # the path a legacy identity hashes (`recorded_identity`)


def _split_holdout(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(round(len(images) * fraction)))
    return images.subset(order[cut:]), images.subset(order[:cut])


def _resolve_teacher(config: DistillConfig, run: RunDir) -> tuple[Path, str]:
    """The teacher to distil from: `--teacher`, or the synthesis teacher checked against its recorded hash."""
    recorded = synthesis_of(run.read_manifest()).get("teacher", {})
    if config.teacher:
        path = Path(config.teacher)
    elif recorded.get("path"):
        path = Path(recorded["path"])
    else:
        raise DfkdError(f"run dir {run.root} records no teacher: pass --teacher or synthesize into this run first")
    if not path.is_file():
        raise DfkdError(
            f"teacher {path} does not exist: pass --teacher with the checkpoint the synthetic set was made from"
        )
    digest = sha256_file(path)
    if not config.teacher and recorded.get("sha256") not in (None, digest):
        raise DfkdError(
            f"teacher {path} changed since the synthesis (sha256 {digest[:12]} vs recorded {recorded['sha256'][:12]}): "
            "restore it or pass --teacher explicitly"
        )
    return path, digest


def distillation_precision(run: RunDir, device: torch.device, fresh: bool) -> Precision:
    """bf16 where the device computes it natively, unless the run's distillation began in another
    precision: it goes on in that one (a distillation begun before dfkd recorded it, in the legacy one),
    so a resumed student is the one an uninterrupted run trains. `fresh`: it is about to be discarded."""
    manifest = run.read_manifest()
    if not fresh:
        recorded = distillation_of(manifest).get("precision")
        if recorded is not None:
            return cast(Precision, recorded)
        if any(entry["stage"] == "distillation" for entry in manifest["artifacts"].values()):
            return legacy_precision(device)
    return default_precision(device)


def prepare_distill(config: DistillConfig, run: RunDir, fresh: bool = False) -> PreparedDistill:
    """Validate everything and load the data before any training starts (`fresh`: the run's distillation
    will be discarded first, as `--overwrite` does)."""
    device = resolve_device(config.device)
    precision = distillation_precision(run, device, fresh)
    get_loss(config.loss)
    spec = config.tau_spec
    teacher_path, teacher_sha = _resolve_teacher(config, run)
    teacher, meta = load_checkpoint(teacher_path)
    if config.data:
        real = load_split(Path(config.data), "train", meta.input_size)
        check_classes(real, meta, teacher_path)
        source, real_labels = real, True
    else:
        shards = SyntheticSet(run).load_complete()
        if int(shards["targets"].max()) >= meta.num_classes:
            raise DfkdError(
                f"the synthetic set has classes up to {int(shards['targets'].max())} but teacher {teacher_path} has "
                f"{meta.num_classes}: distill from the teacher that made the set"
            )
        source = ImageSet(
            shards["images"],
            shards["targets"],
            [str(c) for c in range(meta.num_classes)],
            f"synthetic shards of {run.root}",
        )
        real_labels = False
    validation = None
    if config.val_data:
        val_source = (
            real
            if config.data and Path(config.val_data).resolve() == Path(config.data).resolve()
            else load_split(Path(config.val_data), "train", meta.input_size)
        )
        check_classes(val_source, meta, teacher_path)
        rest, validation = _split_holdout(val_source, config.val_size / len(val_source), config.seed)
        if val_source is source:
            source = rest
    if config.train_subset:
        source = source.subset(stratified_subset(source.labels, config.train_subset, config.seed))
    train, holdout = _split_holdout(source, config.holdout, config.seed)
    if len(train) < config.batch_size:
        raise DfkdError(
            f"only {len(train)} training images for a batch of {config.batch_size}: "
            "lower --batch-size or make more images"
        )
    test_set = None
    if config.eval_data:
        test_set = load_split(Path(config.eval_data), "test", meta.input_size, stream=True)
        check_classes(test_set, meta, teacher_path)
    teacher = prepare_model(teacher, device, precision).eval()
    teacher.requires_grad_(False)
    holdout_logits = predict_logits(teacher, holdout.images, meta.mean, meta.std, device, precision=precision).cpu()
    data = DistillData(train.to(device), holdout, real_labels, holdout_logits, validation)
    trials = [f"tau={v:g}" for v in spec.grid] if spec.mode == "grid" else [f"tau={config.tau}"]
    # The images and the teacher a student learns from: a new synthetic set or teacher means a new student.
    identity_source = student_source(config, synthesis_of(run.read_manifest()).get("config_hash", ""), teacher_sha)
    identity, hashed_path = recorded_identity(config, identity_source, distillation_of(run.read_manifest()))
    return PreparedDistill(
        config,
        teacher,
        meta,
        teacher_sha,
        device,
        data,
        test_set,
        trials,
        identity_source,
        precision,
        identity,
        hashed_path,
    )


def recorded_identity(config: DistillConfig, source: str, recorded: DistillationSection) -> tuple[str, str | None]:
    """The student's identity, and the teacher path it hashes (None: it hashes none).

    A distillation recorded when the identity hashed the teacher's path keeps its recorded identity
    whenever every other setting and the source match, so such runs still resume.
    """
    identity = config.identity(source)
    old_path = recorded.get("config", {}).get("teacher")
    if recorded.get("identity") not in (None, identity) and isinstance(old_path, str):
        if config.identity(source, teacher_path=old_path) == recorded["identity"]:
            return recorded["identity"], old_path
    return identity, None


def resolved_data(path: str) -> str:
    """A data path as results record it: absolute, so a later step can tell whether it is the same data."""
    return str(Path(path).expanduser().resolve())


def student_source(config: DistillConfig, synthesis_hash: str, teacher_sha256: str) -> str:
    """The images and the teacher a student learns from: a new synthetic set or teacher means a new student."""
    origin = f"data {Path(config.data).resolve()}" if config.data else f"synthesis {synthesis_hash}"
    return f"{origin}; teacher {teacher_sha256}"


def check_same_distillation(run: RunDir, identity: str) -> None:
    """A run that holds a distillation with another identity is refused (before anything is written)."""
    existing = distillation_of(run.read_manifest())
    if existing and existing.get("identity") != identity:
        raise DfkdError(
            f"run dir {run.root} already holds a distillation with other settings: pass --overwrite to replace it "
            "or use another --run"
        )


def trial_dir(run: RunDir, trial: str) -> Path:
    return run.root / STUDENT_DIR / trial


def _sampler_for(prepared: PreparedDistill, trial: str) -> TauSampler:
    config = prepared.config
    spec = config.tau_spec
    if spec.mode == "grid":
        spec = TauSpec("fixed", value=float(trial.removeprefix("tau=")))
    return make_sampler(spec, (config.tau_range[0], config.tau_range[1]), config.seed, config.tau_per == "sample")


RESUME_ROLE = "resume-state"


def resume_state(run: RunDir, folder: Path) -> Path | None:
    """The trial's resume state the manifest records, checked against its hash; None to start afresh.

    A state file the manifest does not record was being written when the process was killed: it is
    removed. A recorded one that no longer matches its hash is refused, never loaded.
    """
    prefix = f"{run.relative(folder)}/"
    recorded = [
        run.root / key
        for key, entry in run.read_manifest()["artifacts"].items()
        if key.startswith(prefix) and entry.get("role") == RESUME_ROLE
    ]
    for path in [*folder.glob("resume*.safetensors"), *folder.glob(".resume*.tmp")]:
        if path not in recorded:
            path.unlink()
    if not recorded:
        return None
    path = max(recorded)
    if not run.artifact_intact(path):
        raise DfkdError(
            f"{run.relative(path)} is missing or does not match its manifest hash (damaged since it was saved): "
            f"restore the file, or distill again from the start with `dfkd distill --run {run.root} --overwrite`"
        )
    return path


def save_resume(
    path: Path,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sampler: TauSampler,
    generator: torch.Generator,
    epoch: int,
    log: list[dict[str, Any]],
    identity: str,
) -> str:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    tensors.update(optimizer_tensors(optimizer, "optim"))
    tensors["data.generator"] = generator.get_state()
    scalars = {
        "epoch": epoch,
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "log": log,
        "identity": identity,
    }
    return atomic_write_bytes(path, safetensors_bytes(tensors, {"state": json.dumps(scalars)}))


# Resume files written before the optimiser state was shared with CMI kept SGD's momentum as
# `optim.momentum.<index>` and no schedule functions (`lr_lambdas: null`); they still resume.
_LEGACY_MOMENTUM = "optim.momentum."


def load_resume(
    path: Path,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sampler: TauSampler,
    generator: torch.Generator,
    identity: str,
) -> tuple[int, list[dict[str, Any]]]:
    with safe_open(str(path), framework="pt") as f:
        scalars = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if scalars["identity"] != identity:
        raise DfkdError(f"{path} was made with other distillation settings: pass --overwrite or use another --run")
    load_state_into(
        student, {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}, str(path)
    )
    tensors = {
        f"optim.{k.removeprefix(_LEGACY_MOMENTUM)}.momentum_buffer" if k.startswith(_LEGACY_MOMENTUM) else k: v
        for k, v in tensors.items()
    }
    load_optimizer_tensors(optimizer, tensors, "optim")
    schedule = scalars["scheduler"]
    if schedule.get("lr_lambdas") is None:
        schedule["lr_lambdas"] = [None] * len(optimizer.param_groups)
    scheduler.load_state_dict(schedule)
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    sampler.load_state_dict(scalars["sampler"])
    generator.set_state(tensors["data.generator"])
    return scalars["epoch"], scalars["log"]


def _tau_summary(drawn: list[float | torch.Tensor], tau_range: tuple[float, ...]) -> dict[str, Any]:
    """Histogram and moments of the τ values drawn in one epoch (what the report shows)."""
    values = torch.cat([torch.as_tensor(v, dtype=torch.float32).flatten().cpu() for v in drawn])
    # A fixed tau may lie outside the stochastic range; widen the bins so it is still counted.
    low, high = min(tau_range[0], float(values.min())), max(tau_range[1], float(values.max()))
    return {
        "count": len(values),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "max": float(values.max()),
        "histogram": torch.histc(values, bins=TAU_BINS, min=low, max=high).int().tolist(),
        "bins": [low, high, TAU_BINS],
    }


def _evaluation_figures(prepared: PreparedDistill, student: torch.nn.Module, with_test: bool) -> dict[str, Any]:
    data = prepared.data
    test_set = prepared.test_set if with_test else None
    meta, device = prepared.teacher_meta, prepared.device
    return student_figures(
        student,
        meta,
        device,
        prepared.precision,
        data.holdout,
        data.teacher_holdout_logits,
        data.validation,
        test_set,
    )


def student_figures(
    student: torch.nn.Module,
    meta: CheckpointMeta,
    device: torch.device,
    precision: Precision,
    holdout: ImageSet,
    teacher_holdout_logits: torch.Tensor,
    validation: ImageSet | None,
    test_set: AnySplit | None,
) -> dict[str, Any]:
    """Agreement with the teacher on held-out synthetic images; validation / test accuracy where that data was given."""
    figures: dict[str, Any] = {
        "holdout_agreement": top1_agreement(
            predict_logits(student, holdout.images, meta.mean, meta.std, device, precision=precision).cpu(),
            teacher_holdout_logits,
        )
    }
    if validation is not None:
        figures["val_acc"] = evaluate_on(student, validation, meta.mean, meta.std, device, precision=precision)[
            "accuracy"
        ]
    if test_set is not None:
        figures["test_metrics"] = evaluate_on(student, test_set, meta.mean, meta.std, device, precision=precision)
        figures["test_acc"] = figures["test_metrics"]["accuracy"]
    return figures


def student_checkpoint_meta(
    arch: str, teacher: CheckpointMeta, test_acc: float | None, extra: dict[str, str]
) -> CheckpointMeta:
    """A student's checkpoint metadata: its architecture, the teacher's classes (and their names), normalisation
    and input size."""
    return CheckpointMeta(
        arch=arch,
        num_classes=teacher.num_classes,
        mean=teacher.mean,
        std=teacher.std,
        dataset=teacher.dataset,
        input_size=teacher.input_size,
        test_acc=test_acc,
        extra=extra,
        class_names=teacher.class_names,
    )


def kd_batch_loss(
    config: DistillConfig,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    sampler: TauSampler,
    drawn: list[float | torch.Tensor],
    real_labels: bool,
) -> BatchLoss:
    """The KD loss of one augmented batch: the teacher's logits (no grad), a τ from `sampler` (appended to
    `drawn` for the epoch's summary), and as hard targets the labels on real data, else the teacher's argmax.

    Under DDP a rank holds rows rank, rank + ranks, ... of the batch; a τ per image is drawn for the whole
    batch and sliced the same way, so the batch has as many τ values as images, as in one process.
    """
    loss_fn = get_loss(config.loss)
    rank, ranks = current_world().rank, current_world().size

    def batch_loss(x: torch.Tensor, labels: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x)
        tau = sampler.sample(len(x) * ranks)
        if isinstance(tau, torch.Tensor) and ranks > 1:
            tau = tau[rank::ranks]
        drawn.append(tau)
        if isinstance(tau, torch.Tensor):
            tau = tau.to(x.device, non_blocking=True)
        targets = labels if real_labels else teacher_logits.argmax(1)
        return loss_fn(student(x), teacher_logits, targets, tau, config.alpha)

    return batch_loss


def distill_trial(prepared: PreparedDistill, run: RunDir, trial: str, show_progress: bool = True) -> StageReport:
    """Train one student (one τ setting) to the end, resuming from its last completed epoch.

    Under torchrun every rank trains the same student under DistributedDataParallel on its part of every
    batch (`train_step`'s shard), with the same data order, augmentation and τ stream; rank 0 alone saves
    the resume states and the student and measures its figures.
    """
    config, device, meta, data = prepared.config, prepared.device, prepared.teacher_meta, prepared.data
    world = current_world()
    folder = trial_dir(run, trial)
    folder.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    student = prepare_model(create_model(config.student, meta.num_classes), device, prepared.precision)
    steps_per_epoch = len(data.train) // config.batch_size
    optimizer, scheduler = sgd_with_cosine(
        student, config.scaled_lr, config.epochs * steps_per_epoch, config.weight_decay, nesterov=False
    )
    sampler = _sampler_for(prepared, trial)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    resume_path = from_primary(lambda: resume_state(run, folder))
    start_epoch, log = 0, list[dict[str, Any]]()
    if resume_path is not None:
        start_epoch, log = load_resume(
            resume_path, student, optimizer, scheduler, sampler, generator, prepared.identity
        )
    teacher = compiled(prepared.teacher, config.compile, device)
    drawn: list[float | torch.Tensor] = []
    trained = data_parallel(student, device)
    batch_loss = kd_batch_loss(
        config, teacher, compiled(trained, config.compile, device), sampler, drawn, data.real_labels
    )

    def after_epoch(stats: EpochStats) -> None:
        entry: dict[str, Any] = {
            "epoch": stats.epoch,
            "loss": stats.loss,
            "lr": stats.lr,
            "images_per_s": stats.images_per_s,
            "seconds": stats.seconds,
            "tau": _tau_summary(drawn, config.tau_range),
            "utc": utc_now(),
        }
        drawn.clear()
        if not world.primary:
            log.append(entry)
            return
        if config.eval_every and stats.epoch % config.eval_every == 0 and stats.epoch < config.epochs:
            entry.update(
                {k: v for k, v in _evaluation_figures(prepared, student, with_test=True).items() if k != "test_metrics"}
            )
        log.append(entry)
        nonlocal resume_path
        previous, resume_path = resume_path, folder / f"resume-e{stats.epoch:04d}.safetensors"
        digest = save_resume(
            resume_path, student, optimizer, scheduler, sampler, generator, stats.epoch, log, prepared.identity
        )
        metrics_digest = atomic_write_bytes(
            folder / "metrics.jsonl", "".join(json.dumps(e) + "\n" for e in log).encode()
        )
        # The new state and the forgetting of the one before it are one manifest write: a kill at any
        # point leaves exactly one recorded, intact state to resume from.
        run.update_manifest(
            forget=(previous,) if previous is not None else (),
            artifacts={
                **run.artifact_entry(resume_path, "distillation", RESUME_ROLE, digest),
                **run.artifact_entry(folder / "metrics.jsonl", "distillation", "metrics", metrics_digest),
            },
        )
        if previous is not None:
            previous.unlink(missing_ok=True)

    def last_tau() -> str:
        if not drawn:
            return ""
        last = drawn[-1]
        return f"tau {last:.2f}" if isinstance(last, float) else f"tau mean {float(last.mean()):.2f}"

    train_epochs(
        student,
        optimizer,
        scheduler,
        data.train.images,
        data.train.labels,
        batch_loss,
        epochs=config.epochs,
        start_epoch=start_epoch,
        batch_size=config.batch_size,
        mean=meta.mean,
        std=meta.std,
        generator=generator,
        precision=prepared.precision,
        after_epoch=after_epoch,
        description=f"distill {config.student} {trial}",
        show_progress=show_progress and world.primary,
        batch_info=last_tau,
        shard=(world.rank, world.size),
    )
    images_seen = (config.epochs - start_epoch) * steps_per_epoch * config.batch_size
    work = {
        "epochs": config.epochs,
        "resumed_from_epoch": start_epoch,
        "images": images_seen,
        "images_per_s": log[-1]["images_per_s"] if log else None,
        **({"world_size": world.size} if world.several else {}),
    }
    result = from_primary(lambda: save_trial_student(prepared, run, trial, student))
    return StageReport(result=result, work=work, flops_units=images_seen)


def save_trial_student(prepared: PreparedDistill, run: RunDir, trial: str, student: torch.nn.Module) -> dict[str, Any]:
    """The trained student's figures, and its checkpoint saved and recorded; returns the trial's result."""
    config, meta, data = prepared.config, prepared.teacher_meta, prepared.data
    figures = _evaluation_figures(prepared, student, with_test=True)
    if "test_acc" in figures:
        figures["test_data"] = resolved_data(config.eval_data)
    student_meta = student_checkpoint_meta(
        config.student,
        meta,
        figures.get("test_acc"),
        {
            "tau_mode": config.tau_spec.mode,
            "tau": trial.removeprefix("tau="),
            "tau_per": config.tau_per,
            "loss": config.loss,
            "alpha": str(config.alpha),
            "epochs": str(config.epochs),
            "teacher_sha256": prepared.teacher_sha256,
            "holdout_agreement": f"{figures['holdout_agreement']:.2f}",
            "source": "real data" if data.real_labels else "synthetic",
        },
    )
    student_path = trial_dir(run, trial) / "student.safetensors"
    digest = save_checkpoint(student_path, student, student_meta)
    run.record_artifact(student_path, "distillation", role="student", sha256=digest)
    return {"trial": trial, **figures, "student": run.relative(student_path)}


def trial_done(prepared: PreparedDistill, run: RunDir, trial: str) -> dict[str, Any] | None:
    """The result of a finished trial, else None: finished means its student file still matches the
    manifest and the ledger holds the trial's complete record (the stage's last step)."""
    if not run.artifact_intact(trial_dir(run, trial) / "student.safetensors"):
        return None
    record = finished_record(
        run,
        lambda r: (
            r.get("info", {}).get("trial") == trial
            # Records written before the identity was recorded match on the trial alone.
            and r.get("info", {}).get("identity", prepared.identity) == prepared.identity
        ),
    )
    if record is None:
        return None
    recorded = distillation_of(run.read_manifest()).get("trials", {}).get(trial)
    if recorded is None:  # killed between the ledger record and the manifest entry
        recorded = {k: v for k, v in record["result"].items() if k != "test_metrics"}
        record_trial(run, trial, recorded)
    return recorded


def selection_criterion(prepared: PreparedDistill) -> str:
    """What picks the grid winner: validation accuracy with --val-data, else held-out teacher agreement."""
    return "val_acc" if prepared.data.validation is not None else "holdout_agreement"


def select_winner(prepared: PreparedDistill, run: RunDir, results: dict[str, dict[str, Any]]) -> StageReport:
    """Pick the best trial by the data-free (or validation) criterion and make it the run's student.

    Never selects on the test split: the test accuracy is reported, not used.
    """
    criterion = selection_criterion(prepared)
    scores = {trial: result[criterion] for trial, result in results.items()}
    winner = max(scores, key=lambda t: (scores[t], -prepared.trials.index(t)))
    if current_world().primary:
        publish_student(run, winner)
    return StageReport(
        result={"criterion": criterion, "scores": scores, "winner": winner, **results[winner]},
        work={"trials": len(results)},
    )


def publish_student(run: RunDir, trial: str) -> Path:
    """Make a trial's student the run's student (`student/student.safetensors`), atomically."""
    final = run.root / STUDENT_FILE
    with atomic_path(final) as tmp:
        shutil.copyfile(trial_dir(run, trial) / "student.safetensors", tmp)
    run.record_artifact(final, "distillation", role="student")
    return final


def record_config(prepared: PreparedDistill, run: RunDir) -> None:
    """Record the resolved config; a run that holds a different distillation must be overwritten first."""
    identity = prepared.identity
    check_same_distillation(run, identity)
    run.update_manifest(
        stages={
            "distillation": {
                # As hashed: a legacy identity hashed the teacher's path as then given (the audit re-derives it).
                "config": {**config_dict(prepared.config), "teacher": prepared.identity_teacher_path}
                if prepared.identity_teacher_path is not None
                else config_dict(prepared.config),
                "identity": identity,
                "identity_source": prepared.source,
                "trials_planned": prepared.trials,
                "teacher": {"sha256": prepared.teacher_sha256, "arch": prepared.teacher_meta.arch},
                "train_images": len(prepared.data.train),
                "holdout_images": len(prepared.data.holdout),
                "source": prepared.data.train.source,
                "selection": selection_criterion(prepared),
                "precision": prepared.precision,
            }
        }
    )


def record_trial(run: RunDir, trial: str, result: dict[str, Any]) -> None:
    manifest = run.read_manifest()
    trials = manifest["stages"].setdefault("distillation", {}).setdefault("trials", {})
    trials[trial] = {k: v for k, v in result.items() if k != "test_metrics"}
    run.write_manifest(manifest)


def finished_result(run: RunDir) -> dict[str, Any] | None:
    """The recorded result when this run's distillation already finished and its student is intact.

    Rerunning a finished command then does no work and meters nothing (no duplicate ledger records).
    """
    stage = distillation_of(run.read_manifest())
    if "result" in stage and run.artifact_intact(run.root / STUDENT_FILE):
        return stage["result"]
    return None


def run_distillation(
    prepared: PreparedDistill,
    run: RunDir,
    metered: Callable[[str, dict[str, Any], Callable[[], StageReport]], StageReport],
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run every trial (each through `metered`, one ledger record each), then the grid selection.

    `metered(stage_name, info, work)` is the caller's wrapper around `dfkd.stages.runner.run_metered`.
    """
    config = prepared.config
    primary = current_world().primary  # under torchrun rank 0 alone reads and writes the manifest

    def recorded() -> tuple[dict[str, Any] | None, dict[str, dict[str, Any] | None]]:
        record_config(prepared, run)
        finished = finished_result(run)
        if finished is not None:
            return finished, {}
        done = {trial: trial_done(prepared, run, trial) for trial in prepared.trials}
        for trial in prepared.trials:
            if done[trial] is None:  # every damaged state is refused before the first trial's meter starts
                resume_state(run, trial_dir(run, trial))
        return None, done

    finished, done = from_primary(recorded)
    if finished is not None:
        return finished
    results: dict[str, dict[str, Any]] = {}
    grid = config.tau_spec.mode == "grid"
    for trial in prepared.trials:
        finished_trial = done[trial]
        if finished_trial is not None:
            results[trial] = finished_trial
            continue
        stage = f"distillation[{trial}]" if grid else "distillation"
        info = {
            "student": config.student,
            "loss": config.loss,
            "tau_mode": config.tau_spec.mode,
            "trial": trial,
            "tau_per": config.tau_per,
            "identity": prepared.identity,
            "precision": prepared.precision,
        }
        report = metered(stage, info, partial(distill_trial, prepared, run, trial, show_progress))
        results[trial] = report.result
        if primary:
            record_trial(run, trial, report.result)
    if grid:
        selection = metered(
            "selection", {"criterion": selection_criterion(prepared)}, lambda: select_winner(prepared, run, results)
        )
        summary = selection.result
    else:
        if primary:
            publish_student(run, prepared.trials[0])
        summary = results[prepared.trials[0]]
    if primary:
        run.update_manifest(
            stages={
                "distillation": {
                    "result": {k: v for k, v in summary.items() if k != "test_metrics"},
                    "finished_utc": utc_now(),
                }
            }
        )
    return summary


def distill_run(
    config: DistillConfig,
    run: RunDir,
    carbon: CarbonConfig,
    overwrite: bool = False,
    show_progress: bool = True,
    check: Callable[[PreparedDistill], None] | None = None,
) -> dict[str, Any]:
    """Stage 2 as `dfkd distill` and `dfkd run` do it: every trial metered, resumed where it stopped.

    `check(prepared)` runs once everything is validated and loaded, before anything is written (a cost
    guard). The caller holds the run's lock (under torchrun: rank 0 holds it, and every rank calls this).
    """
    world = current_world()
    if config.batch_size % world.size:
        raise job_error(
            f"a distillation batch of {config.batch_size} does not split evenly over {world.size} ranks (each trains "
            f"on its part of every batch): use a --batch-size that {world.size} divides"
        )
    prepared = agree(lambda: prepare_distill(config, run, fresh=overwrite))

    def setup() -> None:
        if check is not None and (overwrite or finished_result(run) is None):
            check(prepared)
        recover_pending(run.ledger_path)  # a killed attempt's energy is recorded before any shortcut
        if overwrite:  # only once the new settings are known to work, so bad input loses nothing
            run.discard("distillation")
        run.update_manifest(carbon=config_dict(carbon))

    from_primary(setup)
    meta = prepared.teacher_meta

    @cache
    def flops_per_image() -> FlopsPerUnit:
        # Counted once, before the first trial's meter starts: the probe is not billed to the trial.
        student = create_model(prepared.config.student, meta.num_classes)
        flops = supervised_step_flops(student, meta.input_size, meta.num_classes, teacher=prepared.teacher)
        return FlopsPerUnit(flops, "training image")

    def metered(stage: str, info: dict[str, Any], work: Callable[[], StageReport]) -> StageReport:
        # Rank 0 writes the record, so it alone counts (the others need not wait on the CPU probe).
        flops = None if stage == "selection" or not world.primary else flops_per_image()
        return run_metered(run, stage, carbon, prepared.device, info, work, flops)

    return run_distillation(prepared, run, metered, show_progress=show_progress)
