"""What a recipe will cost before it runs (`dfkd run RECIPE --dry-run`): each stage's work and FLOPs,
and its time, energy and CO2eq on this device, from a short probe of the stage's own step.

The probe runs the real step at the recipe's batch size and precision: one synthesis batch of
`PROBE_STEPS` steps (student-aware in the interleaved mode) and `PROBE_STEPS` KD steps. Each probe
runs once untimed (kernel selection, allocations), then once timed inside the stage meters (NVML,
codecarbon). Seconds per unit x units is the stage's time; the probe's measured power x that time
its energy; CO2eq follows the recipe's [carbon]. Not included: torch.compile's one-off compile,
loading data, writing files, and evaluation on real test data (one student forward per test image).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.flops import supervised_step_flops
from dfkd.carbon.sources import EnergyMeters
from dfkd.checkpoints import CheckpointMeta
from dfkd.config.distill import DistillConfig
from dfkd.config.recipe import Recipe
from dfkd.config.tau import TauSpec
from dfkd.data import split_size
from dfkd.device import Precision, default_precision, prepare_model, resolve_device
from dfkd.models import create_model
from dfkd.optim import sgd_with_cosine
from dfkd.stages.distill import kd_batch_loss
from dfkd.stages.synthesis import (
    PreparedSynthesis,
    batch_targets,
    build_synthesizer,
    prepare_synthesis,
    synthesis_step_flops,
)
from dfkd.stages.training import train_step
from dfkd.tau import make_sampler

PROBE_STEPS = 2


@dataclass(frozen=True)
class Probe:
    """One timed, metered probe: `units` of work in `seconds`, drawing `watts` (with PUE) at `g_per_kwh`."""

    units: int
    seconds: float
    watts_with_pue: float | None
    g_per_kwh: float

    @property
    def seconds_per_unit(self) -> float:
        return self.seconds / self.units


def _timed(step: Callable[[], int], device: torch.device) -> tuple[int, float]:
    started = time.perf_counter()
    units = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return units, time.perf_counter() - started


def metered_probe(carbon: CarbonConfig, device: torch.device, step: Callable[[], int]) -> Probe:
    """Run `step` (it returns its units of work) once to warm up, then once timed inside the meters."""
    step()
    meters = EnergyMeters(carbon, device, threading.Event())
    meters.start()
    window = time.perf_counter()
    units, seconds = _timed(step, device)
    section = meters.stop()
    window = time.perf_counter() - window  # the meters' span: power is their energy over it
    energy = section["energy_kwh_with_pue"]["total"]
    watts = None if energy is None else energy * 3.6e6 / window
    return Probe(units, seconds, watts, section["carbon_intensity_g_per_kwh"])


def seconds_per_unit(step: Callable[[], int], device: torch.device) -> float:
    """Unmetered: `step` once to warm up, then once timed (the quick look before a long job starts)."""
    step()
    units, seconds = _timed(step, device)
    return seconds / units


def synthesis_probe(
    prepared: PreparedSynthesis, student: torch.nn.Module | None = None, batch_size: int | None = None
) -> Callable[[], int]:
    """One batch of `PROBE_STEPS` steps of the recipe's method, at its batch size or `batch_size` (against
    `student`)."""
    short = dataclasses.replace(
        prepared, method_config=dataclasses.replace(prepared.method_config, iterations=PROBE_STEPS)
    )
    synthesizer = build_synthesizer(short)
    count = min(batch_size or prepared.config.batch_size, prepared.config.num_images)
    targets = batch_targets(0, count, count, prepared.teacher_meta.num_classes)

    def step() -> int:
        synthesizer.synthesize(targets, student=student)
        return count * PROBE_STEPS

    return step


def kd_probe(
    distill: DistillConfig,
    teacher: torch.nn.Module,
    meta: CheckpointMeta,
    device: torch.device,
    precision: Precision,
    batch_size: int,
) -> Callable[[], int]:
    """`PROBE_STEPS` KD steps of the recipe's student on random images, as the distillation runs them."""
    student = prepare_model(create_model(distill.student, meta.num_classes), device, precision)
    frozen = prepare_model(copy.deepcopy(teacher), device, precision).eval().requires_grad_(False)
    optimizer, scheduler = sgd_with_cosine(student, distill.scaled_lr, 1_000, distill.weight_decay, nesterov=False)
    spec = distill.tau_spec
    if spec.mode == "grid":  # every grid trial costs the same: probe one
        spec = TauSpec("fixed", value=spec.grid[0])
    sampler = make_sampler(
        spec, (distill.tau_range[0], distill.tau_range[1]), distill.seed, distill.tau_per == "sample"
    )
    size = meta.input_size
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    everything = torch.arange(batch_size, device=device)
    batch_loss = kd_batch_loss(distill, frozen, student, sampler, [], bool(distill.data))

    def step() -> int:
        student.train()
        for _ in range(PROBE_STEPS):
            train_step(
                optimizer, scheduler, images, labels, everything, batch_loss, meta.mean, meta.std, None, precision
            )
        return batch_size * PROBE_STEPS

    return step


def stage_estimate(name: str, units: int, unit: str, flops_per_unit: float, probe: Probe) -> dict[str, Any]:
    seconds = units * probe.seconds_per_unit
    kwh = None if probe.watts_with_pue is None else probe.watts_with_pue * seconds / 3.6e6
    return {
        "stage": name,
        "units": units,
        "unit": unit,
        "flops": units * flops_per_unit,
        "seconds": seconds,
        "energy_kwh_with_pue": kwh,
        "co2eq_g": None if kwh is None else kwh * probe.g_per_kwh,
        "probe": {"units": probe.units, "seconds": probe.seconds, "watts_with_pue": probe.watts_with_pue},
    }


def _training_images(recipe: Recipe) -> int:
    """Images one distillation epoch trains on: the synthetic set (or real data) less its held-out slice."""
    distill = recipe.distill
    images = split_size(distill.data, "train") if distill.data else recipe.synthesis.num_images
    if distill.val_data and Path(distill.val_data).resolve() == Path(distill.data or "/").resolve():
        images -= distill.val_size
    if distill.train_subset:
        images = min(images, distill.train_subset)
    return images - max(1, round(images * distill.holdout))


# The quick look before a long job probes a small batch: a few seconds on a CPU, where a paper-sized
# batch would take minutes. It only has to tell an hour from a day.
QUICK_BATCH = 32


def synthesis_seconds(prepared: PreparedSynthesis, batches: int) -> float:
    """About how long `batches` synthesis batches will take on the device, from a small probe batch."""
    if batches <= 0:
        return 0.0
    units = min(prepared.config.num_images, batches * prepared.config.batch_size) * prepared.method_config.iterations
    return units * seconds_per_unit(synthesis_probe(prepared, batch_size=QUICK_BATCH), prepared.device)


def distillation_seconds(config: DistillConfig, teacher: torch.nn.Module, meta: CheckpointMeta, images: int) -> float:
    """About how long every trial of a distillation on `images` source images will take, from a small probe."""
    device = resolve_device(config.device)
    trials = len(config.tau_spec.grid) if config.tau_spec.mode == "grid" else 1
    train = images - max(1, round(images * config.holdout))
    units = trials * config.epochs * (train // config.batch_size) * config.batch_size
    step = kd_probe(config, teacher, meta, device, default_precision(device), min(config.batch_size, QUICK_BATCH))
    return units * seconds_per_unit(step, device)


def estimate_recipe(recipe: Recipe) -> dict[str, Any]:
    """Every stage of `recipe`: its work, FLOPs and (from probes on this device) time, energy and CO2eq."""
    prepared = prepare_synthesis(recipe.synthesis)
    meta, device, distill = prepared.teacher_meta, prepared.device, recipe.distill
    synthesis = recipe.synthesis
    stages = []
    if recipe.interleaved:
        probe_student = prepare_model(create_model(distill.student, meta.num_classes), device, prepared.precision)
        generation = metered_probe(recipe.carbon, device, synthesis_probe(prepared, probe_student))
        image_steps = synthesis.num_images * prepared.method_config.iterations
        flops = synthesis_step_flops(prepared, student=create_model(distill.student, meta.num_classes))
        stages.append(stage_estimate("interleaved: generation", image_steps, "image-step", flops, generation))
        kd_images = (recipe.rounds - recipe.interleave.warmup_rounds) * recipe.interleave.kd_steps * distill.batch_size
    else:
        generation = metered_probe(recipe.carbon, device, synthesis_probe(prepared))
        image_steps = synthesis.num_images * prepared.method_config.iterations
        stages.append(
            stage_estimate("synthesis", image_steps, "image-step", synthesis_step_flops(prepared), generation)
        )
        trials = len(distill.tau_spec.grid) if distill.tau_spec.mode == "grid" else 1
        kd_images = trials * distill.epochs * (_training_images(recipe) // distill.batch_size) * distill.batch_size
    kd_precision = prepared.precision if recipe.interleaved else default_precision(device)
    compression = metered_probe(
        recipe.carbon, device, kd_probe(distill, prepared.teacher, meta, device, kd_precision, distill.batch_size)
    )
    student = create_model(distill.student, meta.num_classes)
    kd_flops = supervised_step_flops(student, meta.input_size, meta.num_classes, teacher=prepared.teacher)
    name = "interleaved: compression" if recipe.interleaved else "distillation"
    stages.append(stage_estimate(name, kd_images, "training image", kd_flops, compression))
    known = [s for s in stages if s["energy_kwh_with_pue"] is not None]
    return {
        "recipe": recipe.name,
        "device": str(device),
        "precision": {"synthesis": prepared.precision, "distillation": kd_precision},
        "stages": stages,
        "total": {
            "flops": sum(s["flops"] for s in stages),
            "seconds": sum(s["seconds"] for s in stages),
            "energy_kwh_with_pue": sum(s["energy_kwh_with_pue"] for s in known) if len(known) == len(stages) else None,
            "co2eq_g": sum(s["co2eq_g"] for s in known) if len(known) == len(stages) else None,
        },
        "not_included": "torch.compile's compile, data loading, file writes, evaluation on real test data",
    }
