"""The interleaved mode (`[run] mode = "interleaved"`): student-aware synthesis and distillation in rounds.

Round r of R = ceil(num_images / batch_size):
  generation   batch r is synthesised against the current student (the method's student-aware term:
               CMI's and Fast-DFKD's adversarial term, DeepInversion's competition), written as shard r
               of the run's synthetic set with the synthesizer's state after it, and appended to the
               pool on the device. `distill.holdout` of every batch is set aside and never trained on:
               the student's agreement with the teacher on those images is the data-free quality figure.
  compression  from round `warmup_rounds` on, `kd_steps` distillation steps on batches drawn uniformly
               from the pool (every trainable image made so far), KD loss with a τ per batch; then the
               student's state after round r is saved.
The student takes part in synthesis once it has trained (rounds after the warm-up). The whole is one
ledger record, stage `interleaved`, metered in the phases `generation` and `compression`, so the report
splits its energy as it splits a two-stage run's. The set it leaves is an ordinary synthetic set:
`dfkd distill --run RUN` can distil another student from it two-stage.

Resume: shard r and the student state after round r are each written atomically and entered in the
manifest with their hashes. A rerun continues after the last round whose student state is recorded;
where shard r exists but not the state after round r (killed during round r's distillation), that
distillation is done again from the state before it. Round r's synthesis is seeded with (seed, r), and
the distillation's draws, augmentation and τ come from generators saved in the state, so a resumed run
ends with the same student as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.flops import supervised_step_flops
from dfkd.carbon.meter import recover_pending
from dfkd.checkpoints import CheckpointMeta, save_checkpoint
from dfkd.config.overrides import config_dict
from dfkd.config.recipe import Recipe
from dfkd.data import AnySplit, ImageSet, load_split
from dfkd.device import Precision, compiled, prepare_model, seed_everything
from dfkd.errors import DfkdError
from dfkd.files import atomic_write_bytes, utc_now
from dfkd.losses import get_loss
from dfkd.manifest import distillation_of, synthesis_of
from dfkd.models import create_model
from dfkd.optim import sgd_with_cosine
from dfkd.progress import make_progress
from dfkd.rundir import STUDENT_FILE, RunDir
from dfkd.stages.distill import (
    RESUME_ROLE,
    check_same_distillation,
    kd_batch_loss,
    load_resume,
    publish_student,
    resolved_data,
    resume_state,
    save_resume,
    student_checkpoint_meta,
    student_figures,
    trial_dir,
)
from dfkd.stages.evaluate import check_classes, predict_logits
from dfkd.stages.runner import FlopsPerUnit, Phase, StageReport, finished_record, run_metered_in_phases
from dfkd.stages.synthesis import (
    TARGETS_NOTE,
    PreparedSynthesis,
    adopt_recorded_precision,
    batch_targets,
    build_synthesizer,
    check_memory,
    check_same_synthesis,
    load_synthesizer_state,
    prepare_synthesis,
    quality_figures,
    synthesis_step_flops,
    teacher_ref,
    write_batch,
    write_preview,
)
from dfkd.stages.training import check_loss, train_step
from dfkd.synthetic_set import SyntheticSet
from dfkd.tau import make_sampler
from synthesizers import get_synthesizer

STAGE = "interleaved"
# Distillation settings that do not change what an interleaved student learns from or how. The teacher
# enters as its sha256, not its path.
_NOT_IDENTITY = ("eval_data", "eval_every", "device", "compile", "epochs", "teacher")


@dataclass
class PreparedInterleaved:
    """Everything validated before any work starts."""

    recipe: Recipe
    synthesis: PreparedSynthesis
    test_set: AnySplit | None

    @property
    def set_hash(self) -> str:
        """What makes two interleaved sets the same: the method and all its settings (the student-aware
        ones too), the scale, the seed, the teacher, and the student and schedule the images are made against."""
        method = {
            k: v for k, v in config_dict(self.synthesis.method_config).items() if k not in ("compile", "log_every")
        }
        distill = {k: v for k, v in config_dict(self.recipe.distill).items() if k not in _NOT_IDENTITY}
        identity = {
            "mode": STAGE,
            "method": self.recipe.synthesis.method,
            "method_config": method,
            "num_images": self.recipe.synthesis.num_images,
            "batch_size": self.recipe.synthesis.batch_size,
            "seed": self.recipe.synthesis.seed,
            "teacher_sha256": self.synthesis.teacher_sha256,
            "distill": distill,
            "interleave": config_dict(self.recipe.interleave),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @property
    def source(self) -> str:
        return f"interleaved rounds {self.set_hash}; teacher {self.synthesis.teacher_sha256}"

    @property
    def identity(self) -> str:
        return self.recipe.distill.identity(self.source)

    @property
    def trial(self) -> str:
        return f"tau={self.recipe.distill.tau}"

    @property
    def rounds(self) -> int:
        return self.recipe.rounds

    def held_out(self, index: int) -> torch.Tensor:
        """Positions of round `index`'s batch set aside from training (the same on every run and resume)."""
        count = self.synthesis.batch_count(index)
        cut = max(1, round(count * self.recipe.distill.holdout)) if count > 1 else 0
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.recipe.synthesis.seed + index))
        return order[:cut]

    def pool_bytes(self) -> int:
        size = self.synthesis.teacher_meta.input_size
        return self.recipe.synthesis.num_images * (3 * size * size + 8)  # uint8 pixels and an int64 target


def prepare_interleaved(recipe: Recipe) -> PreparedInterleaved:
    """Validate the method, teacher, student, test data and the pool's memory before any file is written."""
    synthesis = prepare_synthesis(recipe.synthesis, check_fit=False)
    meta = synthesis.teacher_meta
    get_loss(recipe.distill.loss)
    student = create_model(recipe.distill.student, meta.num_classes).eval()  # as a synthesis step sees it
    test_set = None
    if recipe.evaluate.data:
        test_set = load_split(recipe.evaluate.data, "test", meta.input_size, stream=True)
        check_classes(test_set, meta, recipe.synthesis.teacher)
    prepared = PreparedInterleaved(recipe, synthesis, test_set)
    needed, _ = get_synthesizer(recipe.synthesis.method).persistent_memory(synthesis.method_config, synthesis.teacher)
    pool = prepared.pool_bytes()
    check_memory(
        synthesis,
        pool + needed,
        f"the interleaved pool of {recipe.synthesis.num_images} images ({pool / 2**30:.3g} GiB) "
        f"and the method's own {needed / 2**30:.3g} GiB",
        "lower synthesize.num_images",
        student=student,
    )
    return prepared


def check_same_interleaved(run: RunDir, prepared: PreparedInterleaved) -> None:
    """A run dir holding a set or a student made with other settings is refused before anything is written."""
    check_same_synthesis(run, prepared.set_hash)
    check_same_distillation(run, prepared.identity)


def finished_result(run: RunDir, prepared: PreparedInterleaved) -> dict[str, Any] | None:
    """The recorded result once the ledger holds the stage's complete record (the stage's last step), else None.

    A run killed between that record and publishing the student is finished here, from the record.
    """
    record = finished_record(
        run, lambda r: r.get("stage") == STAGE and r.get("info", {}).get("identity") == prepared.identity
    )
    if record is None or not run.artifact_intact(run.root / record["result"]["student"]):
        return None
    if not run.artifact_intact(run.root / STUDENT_FILE) or "result" not in distillation_of(run.read_manifest()):
        _publish(run, prepared, record["result"], record["work"])
    return distillation_of(run.read_manifest())["result"]


def _publish(run: RunDir, prepared: PreparedInterleaved, result: dict[str, Any], work: dict[str, Any]) -> None:
    """Make the trial's student the run's and record the result (after the ledger record vouches for it)."""
    publish_student(run, prepared.trial)
    result = {k: v for k, v in result.items() if k != "test_metrics"}
    run.update_manifest(
        stages={
            "distillation": {
                "trials": {prepared.trial: result},
                "result": result,
                "train_images": work["train_images"],
                "holdout_images": work["holdout_images"],
                "finished_utc": utc_now(),
            }
        }
    )


def _rounds_done(run: RunDir, prepared: PreparedInterleaved) -> tuple[int, int]:
    """(rounds whose student state is recorded, shards made): the second equals the first or one more."""
    synthetic = SyntheticSet(run)
    shards = synthetic.valid_shards()[: prepared.rounds]
    made = next(
        (i for i, path in enumerate(shards) if synthetic.shard_count(path) != prepared.synthesis.batch_count(i)),
        len(shards),
    )
    state = resume_state(run, trial_dir(run, prepared.trial))
    trained = 0 if state is None else int(state.stem.removeprefix("resume-r"))
    if not trained <= made <= trained + 1:
        raise DfkdError(
            f"run dir {run.root} holds {made} intact shards but the student's state after round {trained}: a shard "
            "was damaged or removed; restore it (see `dfkd audit`) or pass --overwrite to start over"
        )
    if made and not synthetic.state_intact(made - 1) and build_synthesizer(prepared.synthesis).state_dict()["tensors"]:
        raise DfkdError(
            f"{prepared.recipe.synthesis.method} cannot continue after shard {made - 1} of {run.root}: its state "
            "is missing or does not match its manifest hash; restore it or pass --overwrite to start over"
        )
    synthetic.prune(keep=made)
    if made:
        adopt_recorded_precision(prepared.synthesis, synthesis_of(run.read_manifest()))
    return trained, made


def _record_sections(run: RunDir, prepared: PreparedInterleaved) -> None:
    recipe, synthesis = prepared.recipe, prepared.synthesis
    meta = synthesis.teacher_meta
    distill = {k: v for k, v in config_dict(recipe.distill).items() if k != "epochs"}
    run.update_manifest(
        stages={
            "synthesis": {
                "config": config_dict(recipe.synthesis),
                "method_config": config_dict(synthesis.method_config),
                "config_hash": prepared.set_hash,
                "teacher": teacher_ref(synthesis),
                "targets": TARGETS_NOTE,
                "device": str(synthesis.device),
                "precision": synthesis.precision,
                "mode": STAGE,
            },
            "distillation": {
                "config": distill,
                "identity": prepared.identity,
                "identity_source": prepared.source,
                "trials_planned": [prepared.trial],
                "teacher": {"sha256": synthesis.teacher_sha256, "arch": meta.arch},
                "source": f"interleaved rounds of {run.root}",
                "selection": "holdout_agreement",
                "interleave": config_dict(recipe.interleave),
                "precision": synthesis.precision,
            },
        }
    )


class _Pool:
    """The trainable images made so far, resident on the device and grown in place; held-out ones on the host."""

    def __init__(self, prepared: PreparedInterleaved) -> None:
        size, device = prepared.synthesis.teacher_meta.input_size, prepared.synthesis.device
        capacity = prepared.recipe.synthesis.num_images
        self.prepared = prepared
        self.images = torch.empty(capacity, 3, size, size, dtype=torch.uint8, device=device)
        self.targets = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.count = 0
        self.held_images: list[torch.Tensor] = []
        self.held_targets: list[torch.Tensor] = []

    def add(self, index: int, images: torch.Tensor, targets: torch.Tensor) -> None:
        """Append round `index`'s batch: its held-out positions to the host, the rest to the device pool
        (by index, not by mask, so no device sync)."""
        held = self.prepared.held_out(index)
        kept = torch.ones(len(images), dtype=torch.bool)
        kept[held] = False
        trainable = kept.nonzero().flatten()
        self.held_images.append(images.index_select(0, held.to(images.device)).cpu())
        self.held_targets.append(targets.cpu().index_select(0, held))
        end = self.count + len(trainable)
        self.images[self.count : end] = images.index_select(0, trainable.to(images.device)).to(self.images.device)
        self.targets[self.count : end] = targets.index_select(0, trainable.to(targets.device)).to(self.targets.device)
        self.count = end

    def holdout(self, num_classes: int) -> ImageSet:
        labels = torch.cat(self.held_targets)
        return ImageSet(torch.cat(self.held_images), labels, [str(c) for c in range(num_classes)], "held-out rounds")


def interleave_rounds(
    prepared: PreparedInterleaved, run: RunDir, phase: Phase, trained: int, made: int, show_progress: bool = True
) -> StageReport:
    """Rounds `trained` .. R−1 (see the module docstring), then the set's and the student's figures."""
    recipe, synthesis = prepared.recipe, prepared.synthesis
    distill, interleave, meta, device = recipe.distill, recipe.interleave, synthesis.teacher_meta, synthesis.device
    precision = synthesis.precision  # the student learns in the precision the images are made in
    folder = trial_dir(run, prepared.trial)
    folder.mkdir(parents=True, exist_ok=True)
    seed_everything(distill.seed)
    student = prepare_model(create_model(distill.student, meta.num_classes), device, precision)
    total_steps = (prepared.rounds - interleave.warmup_rounds) * interleave.kd_steps
    optimizer, scheduler = sgd_with_cosine(
        student, distill.scaled_lr, total_steps, distill.weight_decay, nesterov=False
    )
    spec = distill.tau_spec
    sampler = make_sampler(
        spec, (distill.tau_range[0], distill.tau_range[1]), distill.seed, distill.tau_per == "sample"
    )
    generator = torch.Generator(device=device).manual_seed(distill.seed)
    log: list[dict[str, Any]] = []
    state_path = resume_state(run, folder)
    if state_path is not None:
        _, log = load_resume(state_path, student, optimizer, scheduler, sampler, generator, prepared.identity)
    synthesizer = build_synthesizer(synthesis)
    synthetic = SyntheticSet(run)
    if made:
        load_synthesizer_state(synthetic, synthesizer, made - 1)
    pool = _Pool(prepared)
    for index, path in enumerate(synthetic.valid_shards()[:made]):
        shard = load_file(str(path))
        pool.add(index, shard["images"], shard["targets"])
    teacher = prepare_model(synthesis.teacher, device, precision).eval().requires_grad_(False)
    drawn: list[float | torch.Tensor] = []
    forward = compiled(student, distill.compile, device)
    batch_loss = kd_batch_loss(distill, compiled(teacher, distill.compile, device), forward, sampler, drawn, False)

    config = recipe.synthesis
    made_now = image_steps = kd_images = 0
    with make_progress(show_progress) as progress:
        task = progress.add_task(
            f"interleave {config.method} -> {distill.student}", total=prepared.rounds, completed=trained, info=""
        )
        for index in range(trained, prepared.rounds):
            entry: dict[str, Any] = {"round": index + 1}
            synthesis_loss: torch.Tensor | None = None
            started = time.perf_counter()
            if index >= made:
                with phase("generation"):
                    count = synthesis.batch_count(index)
                    torch.manual_seed(config.seed * 1_000_003 + index)
                    targets = batch_targets(index, config.batch_size, count, meta.num_classes)
                    aware = student if index > interleave.warmup_rounds else None
                    batch = synthesizer.synthesize(targets, student=aware)
                    images = write_batch(synthetic, synthesis, synthesizer, index, batch, targets, prepared.set_hash)
                    pool.add(index, images, targets)
                    synthesis_loss = batch.losses.mean()  # read with the round's other figures, at its end
                    made_now += count
                    image_steps += count * synthesis.method_config.iterations
            entry["generation_s"] = time.perf_counter() - started
            started = time.perf_counter()
            with phase("compression"):
                if index >= interleave.warmup_rounds:
                    student.train()
                    loss_sum = torch.zeros((), device=device)
                    for _ in range(interleave.kd_steps):
                        indices = torch.randint(pool.count, (distill.batch_size,), device=device, generator=generator)
                        loss_sum += train_step(
                            optimizer,
                            scheduler,
                            pool.images,
                            pool.targets,
                            indices,
                            batch_loss,
                            meta.mean,
                            meta.std,
                            generator,
                            precision,
                        )
                    entry["loss"] = (loss_sum / interleave.kd_steps).item()
                    check_loss(entry["loss"], f"round {index + 1}", "round")
                    kd_images += interleave.kd_steps * distill.batch_size
                    entry["tau_mean"] = float(
                        torch.cat([torch.as_tensor(t, dtype=torch.float32).flatten() for t in drawn]).mean()
                    )
                    drawn.clear()
                if synthesis_loss is not None:
                    entry["synthesis_loss"] = float(synthesis_loss)
                entry.update(lr=optimizer.param_groups[0]["lr"], pool=pool.count, utc=utc_now())
                every = recipe.evaluate.every
                if every and (index + 1) % every == 0 and index + 1 < prepared.rounds and prepared.test_set is not None:
                    figures = student_figures(
                        student,
                        meta,
                        device,
                        precision,
                        pool.holdout(meta.num_classes),
                        _teacher_logits(teacher, pool, meta, device, precision),
                        None,
                        prepared.test_set,
                    )
                    entry.update(holdout_agreement=figures["holdout_agreement"], test_acc=figures["test_acc"])
                entry["compression_s"] = time.perf_counter() - started
                log.append(entry)
                _save_round(
                    run, folder, index + 1, student, optimizer, scheduler, sampler, generator, log, prepared.identity
                )
            progress.update(
                task, completed=index + 1, info=f"pool {pool.count}  kd loss {entry.get('loss', float('nan')):.3f}"
            )
    with phase("generation"):
        data = synthetic.load()
        preview = write_preview(run, data["images"], data["targets"], meta.num_classes)
        quality = quality_figures(
            data["images"], data["targets"], teacher, meta, device, config.quality_sample, precision
        )
        run.update_manifest(
            stages={"synthesis": {"quality": quality, "shards": prepared.rounds, "images": len(data["images"])}}
        )
    with phase("compression"):
        holdout = pool.holdout(meta.num_classes)
        teacher_logits = _teacher_logits(teacher, pool, meta, device, precision)
        figures = student_figures(student, meta, device, precision, holdout, teacher_logits, None, prepared.test_set)
        if "test_acc" in figures:
            figures["test_data"] = resolved_data(recipe.evaluate.data)
        student_path = _save_student(run, prepared, student, figures)
    result = {
        "quality": quality,
        "preview": run.relative(preview),
        "shards": prepared.rounds,
        "trial": prepared.trial,
        **figures,
        "student": run.relative(student_path),
    }
    work = {
        "rounds": prepared.rounds,
        "resumed_after_round": trained,
        "kd_steps": interleave.kd_steps,
        "iterations": synthesis.method_config.iterations,
        "images_made": made_now,
        "images_total": len(data["images"]),
        "image_steps": image_steps,
        "images": kd_images,
        "train_images": pool.count,
        "holdout_images": len(holdout),
    }
    return StageReport(result, work, phase_units={"generation": image_steps, "compression": kd_images})


def _teacher_logits(
    teacher: torch.nn.Module, pool: _Pool, meta: CheckpointMeta, device: torch.device, precision: Precision
) -> torch.Tensor:
    images = pool.holdout(meta.num_classes).images
    return predict_logits(teacher, images, meta.mean, meta.std, device, precision=precision).cpu()


def _save_round(
    run: RunDir,
    folder: Path,
    rounds: int,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sampler: Any,
    generator: torch.Generator,
    log: list[dict[str, Any]],
    identity: str,
) -> None:
    """The student's state after `rounds` rounds and the metrics so far; the state before it is forgotten
    in the same manifest write, so exactly one recorded state is there to resume from."""
    previous = resume_state(run, folder)
    path = folder / f"resume-r{rounds:05d}.safetensors"
    digest = save_resume(path, student, optimizer, scheduler, sampler, generator, rounds, log, identity)
    metrics = folder / "metrics.jsonl"
    metrics_digest = atomic_write_bytes(metrics, "".join(json.dumps(e) + "\n" for e in log).encode())
    run.update_manifest(
        forget=(previous,) if previous is not None else (),
        artifacts={
            **run.artifact_entry(path, "distillation", RESUME_ROLE, digest),
            **run.artifact_entry(metrics, "distillation", "metrics", metrics_digest),
        },
    )
    if previous is not None:
        previous.unlink(missing_ok=True)


def _save_student(
    run: RunDir, prepared: PreparedInterleaved, student: torch.nn.Module, figures: dict[str, Any]
) -> Path:
    recipe, meta = prepared.recipe, prepared.synthesis.teacher_meta
    distill = recipe.distill
    student_meta = student_checkpoint_meta(
        distill.student,
        meta,
        figures.get("test_acc"),
        {
            "mode": STAGE,
            "method": recipe.synthesis.method,
            "tau_mode": distill.tau_spec.mode,
            "tau": distill.tau,
            "tau_per": distill.tau_per,
            "loss": distill.loss,
            "alpha": str(distill.alpha),
            "rounds": str(prepared.rounds),
            "kd_steps": str(recipe.interleave.kd_steps),
            "teacher_sha256": prepared.synthesis.teacher_sha256,
            "holdout_agreement": f"{figures['holdout_agreement']:.2f}",
            "source": "synthetic (interleaved)",
        },
    )
    path = trial_dir(run, prepared.trial) / "student.safetensors"
    digest = save_checkpoint(path, student, student_meta)
    run.record_artifact(path, "distillation", role="student", sha256=digest)
    return path


def run_interleaved(
    prepared: PreparedInterleaved, run: RunDir, carbon: CarbonConfig, show_progress: bool = True
) -> dict[str, Any]:
    """The interleaved mode as `dfkd run` does it: one metered stage, resumed where it stopped.

    A finished run returns its recorded result and meters nothing. The caller holds the run's lock and
    has checked the run dir (`check_same_interleaved`).
    """
    recover_pending(run.ledger_path)  # a killed attempt's energy is recorded before any shortcut
    finished = finished_result(run, prepared)
    if finished is not None:
        return finished
    trained, made = _rounds_done(run, prepared)
    _record_sections(run, prepared)
    run.update_manifest(carbon=config_dict(carbon))
    recipe, synthesis = prepared.recipe, prepared.synthesis
    meta = synthesis.teacher_meta
    # Counted before the meter starts, so the probes are not billed to the stage.
    probe_student = create_model(recipe.distill.student, meta.num_classes)
    flops = {
        "generation": FlopsPerUnit(synthesis_step_flops(synthesis, student=probe_student), "image-step"),
        "compression": FlopsPerUnit(
            supervised_step_flops(probe_student, meta.input_size, meta.num_classes, teacher=synthesis.teacher),
            "training image",
        ),
    }
    info = {
        "method": recipe.synthesis.method,
        "num_images": recipe.synthesis.num_images,
        "batch_size": recipe.synthesis.batch_size,
        "config_hash": prepared.set_hash,
        "student": recipe.distill.student,
        "loss": recipe.distill.loss,
        "tau_mode": recipe.distill.tau_spec.mode,
        "trial": prepared.trial,
        "tau_per": recipe.distill.tau_per,
        "identity": prepared.identity,
        "kd_steps": recipe.interleave.kd_steps,
        "rounds": prepared.rounds,
        "resumed_after_round": trained,
        "precision": synthesis.precision,
    }
    report = run_metered_in_phases(
        run,
        STAGE,
        carbon,
        synthesis.device,
        info,
        lambda phase: interleave_rounds(prepared, run, phase, trained, made, show_progress),
        flops,
    )
    _publish(run, prepared, report.result, report.work)
    return distillation_of(run.read_manifest())["result"]
