"""The Python API: what a notebook needs, the same functions the CLI calls.

    import dfkd
    teacher, meta = dfkd.load_model("checkpoints/wrn40_2_cifar10.safetensors")
    dfkd.synthesize("runs/nb", method="fast", num_images=2_000, batch_size=200, iterations=10)
    result = dfkd.distill("runs/nb", epochs=60, batch_size=64, eval_data="~/data/cifar10-jpeg")
    dfkd.carbon_report("runs/nb")["runs"][0]["headline"]

Every stage is metered into the run dir's ledger exactly as `dfkd synthesize` / `dfkd distill` /
`dfkd run` do it, resumes where an earlier call stopped, and raises `DfkdError` (a one-line message
naming the problem and the fix) on bad input before any work starts. Keyword arguments are the CLI's
options and the recipe keys; `settings` takes a method's own settings (`{"nz": 256}`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd.carbon.config import CarbonConfig
from dfkd.checkpoints import CheckpointMeta, load_checkpoint
from dfkd.collective import agree, from_primary, job_lock, joined, use_local_gpu
from dfkd.config.distill import DistillConfig
from dfkd.config.overrides import apply_overrides
from dfkd.config.recipe import EMBEDDED_TEACHER_PATH, load_recipe
from dfkd.config.synthesis import SynthesisConfig
from dfkd.config.tau import parse_tau_range
from dfkd.device import resolve_device
from dfkd.distributed import current_world, world_from_env, world_of
from dfkd.errors import DfkdError, TooCostly
from dfkd.report.audit import audit_run
from dfkd.report.build import build_report
from dfkd.report.format import duration
from dfkd.report.render import render
from dfkd.rundir import RunDir
from dfkd.stages.distill import PreparedDistill, distill_run
from dfkd.stages.estimate import distillation_seconds, estimate_recipe, synthesis_seconds
from dfkd.stages.evaluate import evaluate_checkpoint
from dfkd.stages.export import export_source
from dfkd.stages.inference import benchmark_run, prepare_benchmark
from dfkd.stages.pipeline import check_inputs, record_estimate, run_recipe
from dfkd.stages.synthesis import batches_left, prepare_synthesis, run_synthesis

PathLike = str | Path


def _check_cpu_cost(device: torch.device, limit_s: float | None, what: str, seconds: Callable[[], float]) -> None:
    """On a CPU, refuse (`TooCostly`) a job whose measured estimate exceeds `limit_s` (None: no check)."""
    if limit_s is None or device.type != "cpu":
        return
    estimate = seconds()
    if estimate > limit_s:
        raise TooCostly(
            f"{what} would take about {duration(estimate)} on this CPU (measured on a short probe): start it anyway "
            "with --yes (API: cpu_limit_s=None), or lower its scale, or run it on a GPU"
        )


def load_model(path: PathLike) -> tuple[nn.Module, CheckpointMeta]:
    """A `.safetensors` checkpoint as (model in eval mode, its validated metadata): arch, classes, mean/std."""
    return load_checkpoint(Path(path).expanduser())


def synthesize(
    run: PathLike,
    *,
    num_images: int,
    method: str = "cmi",
    teacher: PathLike = EMBEDDED_TEACHER_PATH,
    batch_size: int = 256,
    iterations: int | None = None,
    seed: int = 0,
    device: str = "auto",
    settings: dict[str, Any] | None = None,
    carbon: CarbonConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    cpu_limit_s: float | None = None,
) -> dict[str, Any]:
    """Stage 1 into `run`: invert `teacher` into `num_images` synthetic images (`iterations` steps a batch,
    default the method's published setting); metered as stage `synthesis`. Returns its quality figures,
    preview path, shard count and `work`. With `cpu_limit_s`, a CPU job estimated to take longer raises
    `TooCostly` before anything is written."""
    config = apply_overrides(
        SynthesisConfig(),
        {
            "method": method,
            "teacher": str(Path(teacher).expanduser()),
            "num_images": num_images,
            "batch_size": batch_size,
            "seed": seed,
            "device": device,
            "method_settings": {key: str(value) for key, value in (settings or {}).items()},
        },
        "synthesis setting",
    )
    with world_of(world_from_env()):
        root = Path(run).expanduser()
        return _synthesize_in_world(config, iterations, root, carbon, overwrite, progress, cpu_limit_s)


def _synthesize_in_world(
    config: SynthesisConfig,
    iterations: int | None,
    root: Path,
    carbon: CarbonConfig | None,
    overwrite: bool,
    progress: bool,
    cpu_limit_s: float | None,
) -> dict[str, Any]:
    """`synthesize` in this process's world: one process, or a rank of a torchrun job (each makes its share)."""
    use_local_gpu()  # under torchrun, before `auto` resolves
    with joined(resolve_device(config.device)):
        prepared = agree(lambda: prepare_synthesis(config, iterations))
        ranks = current_world().size

        def check_cost() -> None:
            if prepared.num_batches < ranks:
                raise DfkdError(
                    f"{config.num_images} images in batches of {config.batch_size} make {prepared.num_batches} "
                    f"batches, fewer than the job's {ranks} ranks (each makes whole batches): lower --batch-size "
                    "or launch fewer processes"
                )
            # A rerun costs only what is left, and under torchrun each rank makes its share of it.
            left = prepared.num_batches if overwrite else batches_left(root, prepared)
            seconds = partial(synthesis_seconds, prepared, math.ceil(left / ranks))
            _check_cpu_cost(prepared.device, cpu_limit_s, "this synthesis", seconds)

        from_primary(check_cost)
        with job_lock(root) as run_dir:
            result, work = run_synthesis(prepared, run_dir, carbon or CarbonConfig(), overwrite, show_progress=progress)
    return {"run": str(run_dir.root), **result, "work": work}


def distill(
    run: PathLike,
    *,
    epochs: int,
    student: str = "wrn16_1",
    tau: str = "stochastic",
    tau_range: str | tuple[float, float] = (2.0, 20.0),
    batch_size: int = 256,
    teacher: PathLike | None = None,
    data: PathLike | None = None,
    eval_data: PathLike | None = None,
    carbon: CarbonConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    cpu_limit_s: float | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Stage 2 in `run`: train `student` on the run's synthetic set (or real `data`: the data-driven
    baseline) with τ `stochastic`, a number, or `grid`; metered as stage `distillation`. `options` are the
    other `DistillConfig` fields (lr, alpha, loss, tau_per, seed, device, val_data, eval_every, compile,
    train_subset, holdout, weight_decay). Returns the student's figures (held-out agreement, test
    accuracy with `eval_data`, the grid winner for `grid`) and its path. With `cpu_limit_s`, a CPU job
    estimated to take longer raises `TooCostly` before anything is written."""
    spans = parse_tau_range(tau_range) if isinstance(tau_range, str) else tuple(tau_range)
    paths = {"teacher": teacher, "data": data, "eval_data": eval_data, "val_data": options.pop("val_data", None)}
    config = apply_overrides(
        DistillConfig(),
        {
            "student": student,
            "tau": tau,
            "tau_range": spans,
            "epochs": epochs,
            "batch_size": batch_size,
            **{key: str(Path(value).expanduser()) if value else "" for key, value in paths.items()},
            **options,
        },
        "distillation setting",
    )

    def check(prepared: PreparedDistill) -> None:
        images = len(prepared.data.train) + len(prepared.data.holdout)
        seconds = partial(distillation_seconds, prepared.config, prepared.teacher, prepared.teacher_meta, images)
        # Under torchrun each rank trains on its part of every batch (this runs on rank 0 alone: `ranks` is the job's).
        _check_cpu_cost(prepared.device, cpu_limit_s, "this distillation", lambda: seconds() / ranks)

    with world_of(world_from_env()):
        ranks = current_world().size
        use_local_gpu()  # under torchrun, before `auto` resolves
        root = Path(run).expanduser()
        with joined(resolve_device(config.device)), job_lock(root, create=data is not None) as run_dir:
            summary = distill_run(config, run_dir, carbon or CarbonConfig(), overwrite, progress, check)
    return {"run": str(run_dir.root), **summary}


def evaluate(model: PathLike, data: PathLike, *, device: str = "auto", progress: bool = False) -> dict[str, Any]:
    """The paper's Table-5 metrics of a checkpoint on the test split of `data` (shares in %, `units` says so)."""
    return evaluate_checkpoint(Path(model).expanduser(), Path(data).expanduser(), resolve_device(device), progress)


def benchmark_inference(
    teacher: PathLike,
    student: PathLike,
    *,
    run: PathLike | None = None,
    device: str = "auto",
    data: PathLike | None = None,
    images: int | None = None,
    batch_size: int | None = None,
    onnx_teacher: PathLike | None = None,
    onnx_student: PathLike | None = None,
    carbon: CarbonConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Time a teacher and its student (a checkpoint, or a run dir's student and its fp32 ONNX export) on the
    same synthetic images: parameters, FLOPs and file size, batch-1 latency, throughput at `batch_size` over
    `images` (the device's defaults when None), the ONNX files' figures on onnxruntime's CPU provider, and
    test accuracy on `data`. Metered as stage `inference-benchmark` in `run` (default: the student's run
    dir, else runs/inference-<time>), one phase per model's throughput loop, from which the report derives
    energy per inference. Returns the stage's result; bad input raises `DfkdError` before anything is written."""

    def optional(path: PathLike | None) -> Path | None:
        return None if path is None else Path(path).expanduser()

    prepared = prepare_benchmark(
        Path(teacher).expanduser(),
        Path(student).expanduser(),
        optional(run),
        resolve_device(device),
        data=optional(data),
        images=images,
        batch_size=batch_size,
        onnx_teacher=optional(onnx_teacher),
        onnx_student=optional(onnx_student),
    )
    run_dir = RunDir.open(prepared.run_root)
    with run_dir.locked():
        return benchmark_run(prepared, run_dir, carbon or CarbonConfig(), progress)


def export(
    source: PathLike,
    *,
    format: str,
    out: PathLike | None = None,
    quantize: str | None = None,
    data: PathLike | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """A run dir's student (to `RUN/export/`, recorded in its manifest) or a checkpoint (to `out`) as one
    deployable file, `format` onnx, torchscript or exported-program, taking float RGB in [0, 1]: kept only once
    it matches the PyTorch model within 1e-3 at two batch sizes (`quantize="dynamic"`: int8 ONNX, measured)."""
    return export_source(
        Path(source).expanduser(),
        format,
        None if out is None else Path(out).expanduser(),
        quantize,
        None if data is None else Path(data).expanduser(),
        device,
    )


def run(
    recipe: PathLike, run_dir: PathLike, *, overrides: list[str] | None = None, progress: bool = True
) -> dict[str, Any]:
    """A recipe end to end in `run_dir` (synthesize, distill, evaluate; or the interleaved rounds), each stage
    metered, resuming where an earlier call stopped; `overrides` are `section.key=value` strings."""
    loaded = load_recipe(Path(recipe).expanduser(), overrides)
    with world_of(world_from_env()):
        return run_recipe(loaded, Path(run_dir).expanduser(), progress)


def estimate(
    recipe: PathLike, *, overrides: list[str] | None = None, run_dir: PathLike | None = None
) -> dict[str, Any]:
    """What the recipe will cost on this device, stage by stage, from a short measured probe (runs nothing);
    with `run_dir`, kept there so the report shows estimate vs actual."""
    loaded = load_recipe(Path(recipe).expanduser(), overrides)
    check_inputs(loaded)
    found = estimate_recipe(loaded)
    if run_dir is not None:
        record_estimate(RunDir.open(Path(run_dir).expanduser()), loaded, found)
    return found


def carbon_report(*runs: PathLike, format: str = "json") -> Any:
    """The carbon report of run dirs: the JSON dict (`format="json"`), or text as `table`, `markdown`, `html`."""
    built = build_report([Path(r).expanduser() for r in runs])
    return built if format == "json" else render(built, format)


def audit(run_dir: PathLike) -> list[str]:
    """Every problem `dfkd audit` finds in a run dir (artifacts re-hashed, ledger chain, sums); [] when clean."""
    return audit_run(Path(run_dir).expanduser())
