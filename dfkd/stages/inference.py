"""The inference benchmark: what a teacher and its student cost to run, as one metered stage of a run.

A distilled student is worth its carbon only if running it saves more than making it cost. This stage
measures both models the same way, on the same device, precision and synthetic images: parameters, FLOPs
per image, file size, batch-1 latency (p50/p95), throughput at a batch, and, where given, the same through
an ONNX export on onnxruntime's CPU provider and test accuracy on real data.

It is one ledger record (stage `inference-benchmark`) metered in two phases, `teacher-inference` and
`student-inference`, each wrapping only that model's PyTorch throughput loop over the same `images`
images: a phase's energy over `images` is that model's energy per inference, which the read side
(`dfkd.report.payback`) and the audit derive from the record. No energy figure is stored in the result,
so nothing in it can disagree with the phases. Everything else (warm-up, latency, ONNX, accuracy) runs
inside the stage but outside the phases, billed to `outside phases`.

Every input is checked by `prepare_benchmark` before a run dir is made or anything is metered.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.flops import count_flops
from dfkd.checkpoints import CheckpointMeta, load_checkpoint
from dfkd.config.overrides import config_dict
from dfkd.data import AnySplit, load_split, normalize
from dfkd.device import Precision, autocast, default_precision, prepare_model, uses_channels_last
from dfkd.errors import DfkdError
from dfkd.files import sha256_file
from dfkd.manifest import MANIFEST_FILE, synthesis_of
from dfkd.progress import make_progress
from dfkd.report.payback import BENCHMARK, STUDENT_PHASE, TEACHER_PHASE
from dfkd.rundir import STUDENT_FILE, RunDir, default_run_dir
from dfkd.stages.evaluate import check_classes, evaluate_on
from dfkd.stages.export import ONNX_INSTALL
from dfkd.stages.runner import FlopsPerUnit, Phase, StageReport, run_metered_in_phases

# The names the read side derives the energy per inference from (`dfkd.report.payback`).
STAGE = BENCHMARK
PHASES = {"teacher": TEACHER_PHASE, "student": STUDENT_PHASE}
# Batch-1 latency: forwards run untimed first (lazy kernel selection, caches), then the timed ones.
WARMUP_RUNS, TIMED_RUNS = 10, 30
# Defaults that take seconds per model yet keep a small student's phase well over the meter's resolution
# (codecarbon measures at most every 50 ms: a shorter phase reads no energy, its share lands after it).
DEFAULT_BATCH = {"cuda": 256, "cpu": 64}
DEFAULT_IMAGES = {"cuda": 20_000, "cpu": 2_048}


@dataclass(frozen=True)
class OnnxExport:
    """An ONNX export of a model, loaded in onnxruntime and checked against its checkpoint."""

    path: Path
    session: Any  # an onnxruntime InferenceSession on the CPU provider
    file_bytes: int  # the .onnx file and the external data files it names (torch writes big weights beside it)


@dataclass(frozen=True)
class BenchModel:
    """One model to benchmark: its checkpoint, loaded, with what was counted of it before the stage."""

    path: Path
    model: nn.Module
    meta: CheckpointMeta
    sha256: str
    flops_per_image: int
    onnx: OnnxExport | None


@dataclass(frozen=True)
class PreparedBenchmark:
    """Everything the stage needs, checked: nothing has been written when this exists."""

    teacher: BenchModel
    student: BenchModel
    run_root: Path
    device: torch.device
    precision: Precision
    images: int
    batch_size: int
    test_set: AnySplit | None


def prepare_benchmark(
    teacher: Path,
    student: Path,
    run: Path | None,
    device: torch.device,
    data: Path | None = None,
    images: int | None = None,
    batch_size: int | None = None,
    onnx_teacher: Path | None = None,
    onnx_student: Path | None = None,
) -> PreparedBenchmark:
    """Load and check both models, their ONNX files and the test data; nothing is written.

    `student` is a `.safetensors` checkpoint or a run dir, whose intact `student/student.safetensors` is
    used, with the fp32 ONNX export its manifest lists (unless `onnx_student` is given). `run` defaults
    to that run dir, or to `runs/inference-<time>` for a checkpoint. `images` and `batch_size` default
    to `DEFAULT_IMAGES` and `DEFAULT_BATCH` for the device.
    """
    batch_size = DEFAULT_BATCH[device.type] if batch_size is None else batch_size
    images = DEFAULT_IMAGES[device.type] if images is None else images
    if batch_size < 1:
        raise DfkdError(f"--batch-size {batch_size} is not a batch: give 1 or more")
    if images < batch_size:
        raise DfkdError(
            f"--images {images} is fewer than --batch-size {batch_size}: the throughput is timed over whole batches, "
            "so give at least one batch of images or a smaller batch"
        )
    student_run = RunDir(student) if student.is_dir() else None
    if student_run is not None:
        student = student_run.root / STUDENT_FILE
        if not student_run.artifact_intact(student):
            raise DfkdError(
                f"run dir {student_run.root} has no intact student ({STUDENT_FILE}, as its "
                "manifest lists it): finish its distillation first, or pass a student .safetensors"
            )
        onnx_student = onnx_student or _listed_onnx(student_run, sha256_file(student))
    loaded = {"teacher": _load(teacher, onnx_teacher), "student": _load(student, onnx_student)}
    first, second = loaded["teacher"], loaded["student"]
    if (first.meta.num_classes, first.meta.input_size) != (second.meta.num_classes, second.meta.input_size):
        raise DfkdError(
            f"teacher {teacher} predicts {first.meta.num_classes} classes at {first.meta.input_size} px but student "
            f"{student} {second.meta.num_classes} at {second.meta.input_size} px: pair a student with its own teacher"
        )
    test_set = None
    if data is not None:
        test_set = load_split(data, "test", first.meta.input_size, stream=True)
        for bench in loaded.values():
            check_classes(test_set, bench.meta, bench.path)
    root = run or (student_run.root if student_run is not None else default_run_dir("inference"))
    check_run_models(root, first, second)
    return PreparedBenchmark(first, second, root, device, default_precision(device), images, batch_size, test_set)


def check_run_models(root: Path, teacher: BenchModel, student: BenchModel) -> None:
    """A run dir's benchmark must time that run's own teacher and student (the report prices what its student
    saves against the teacher it replaces): another model of either is refused, before anything is written."""
    if not (root / MANIFEST_FILE).is_file():
        return
    manifest = RunDir(root).read_manifest()
    student_entry = manifest["artifacts"].get(STUDENT_FILE)
    recorded = {
        "teacher": synthesis_of(manifest).get("teacher", {}).get("sha256"),
        "student": None if student_entry is None else student_entry["sha256"],
    }
    for role, bench in (("teacher", teacher), ("student", student)):
        own = recorded[role]
        if own is not None and own != bench.sha256:
            raise DfkdError(
                f"{bench.path} is not the {role} of run dir {root} (sha256 {bench.sha256[:12]}…, the run's is "
                f"{own[:12]}…): benchmark the run's own {role}, or record this pair in another --run"
            )


def _listed_onnx(run: RunDir, student_sha256: str) -> Path | None:
    """The run's fp32 ONNX export of this student (the latest, if several), as `dfkd export` lists it in the
    manifest's `exports`; None if none. An export of an earlier student of the run is not this one's."""
    fp32 = [
        name
        for name, entry in run.read_manifest().get("exports", {}).items()
        if entry.get("format") == "onnx"
        and entry.get("quantize") is None
        and entry.get("source_sha256") == student_sha256
    ]
    if not fp32:
        return None
    path = run.root / fp32[-1]
    if not run.artifact_intact(path):
        raise DfkdError(
            f"run dir {run.root} lists the ONNX export {fp32[-1]}, which is missing or altered: export it again "
            "(dfkd export) or pass --onnx-student"
        )
    return path


def _load(path: Path, onnx_path: Path | None) -> BenchModel:
    """A checkpoint with its FLOPs per image (counted in fp32 on the CPU, as `dfkd models` does) and its ONNX
    session, checked to take the checkpoint's input size."""
    model, meta = load_checkpoint(path)
    size = meta.input_size
    with torch.no_grad():
        flops = count_flops(lambda: model(torch.zeros(1, 3, size, size)))
    digest = sha256_file(path)
    onnx = None if onnx_path is None else _onnx_export(onnx_path, meta, path, digest)
    return BenchModel(path, model, meta, digest, flops, onnx)


def _onnx_export(path: Path, meta: CheckpointMeta, checkpoint: Path, checkpoint_sha256: str) -> OnnxExport:
    """`path` in an onnxruntime CPU session, refused unless it takes a dynamic batch of 3 x size x size images,
    gives the checkpoint's number of classes and, where `dfkd export` recorded its source, was made from this
    very checkpoint (an export of another model of the same shape would be timed as this one's)."""
    if not path.is_file():
        raise DfkdError(f"ONNX file {path} does not exist: pass the path of an .onnx file")
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise DfkdError(f"timing {path} needs onnx and onnxruntime, not installed here: {ONNX_INSTALL}") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings would interleave with the progress bars
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail ...) derive from Exception only
        raise DfkdError(f"ONNX file {path} does not load in onnxruntime ({exc}): export it again") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = inputs[0].shape if len(inputs) == 1 else []
    wanted = [3, meta.input_size, meta.input_size]
    if len(shape) != 4 or [d if isinstance(d, int) else wanted[i] for i, d in enumerate(shape[1:])] != wanted:
        raise DfkdError(
            f"ONNX file {path} takes input {shape} but {checkpoint} takes [batch, {', '.join(map(str, wanted))}]: "
            "pass the export of this checkpoint"
        )
    if isinstance(shape[0], int):
        raise DfkdError(f"ONNX file {path} has a fixed batch of {shape[0]}: export it with a dynamic batch dimension")
    classes = outputs[0].shape[-1] if outputs and outputs[0].shape else None
    if isinstance(classes, int) and classes != meta.num_classes:
        raise DfkdError(
            f"ONNX file {path} predicts {classes} classes but {checkpoint} {meta.num_classes}: "
            "pass the export of this checkpoint"
        )
    proto = onnx.load(str(path), load_external_data=False)
    source = {prop.key: prop.value for prop in proto.metadata_props}.get("source_sha256")
    if source is not None and source != checkpoint_sha256:
        raise DfkdError(
            f"ONNX file {path} was exported from another checkpoint (source sha256 {source[:12]}…) than {checkpoint} "
            f"({checkpoint_sha256[:12]}…): pass the export of this checkpoint "
            f"(dfkd export {checkpoint} --format onnx --out FILE.onnx)"
        )
    graph = proto.graph
    external = {
        entry.value
        for tensor in graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    size = path.stat().st_size + sum((path.parent / name).stat().st_size for name in external)
    return OnnxExport(path, session, size)


def benchmark_run(
    prepared: PreparedBenchmark, run: RunDir, carbon: CarbonConfig, show_progress: bool
) -> dict[str, Any]:
    """Benchmark both models as one metered stage of `run` (module docstring); returns the stage's result.

    The caller holds the run's lock.
    """
    device, precision, images = prepared.device, prepared.precision, prepared.images
    models = {"teacher": prepared.teacher, "student": prepared.student}
    generator = torch.Generator().manual_seed(0)
    size = prepared.teacher.meta.input_size
    # Made once, before the stage: every model reads the same images, and making them is not inference.
    pool_cpu = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=generator)
    pool = pool_cpu.to(device)

    def work(phase: Phase) -> StageReport:
        figures = {
            role: _benchmark_model(bench, pool, pool_cpu.numpy(), prepared, phase(PHASES[role]), role, show_progress)
            for role, bench in models.items()
        }
        result = {"images": images, "batch_size": prepared.batch_size, "models": figures}
        units = dict.fromkeys(PHASES.values(), images)
        return StageReport(result=result, work={"images": 2 * images}, phase_units=units)

    run.update_manifest(carbon=config_dict(carbon))
    info = {
        **{role: {"path": str(b.path), "sha256": b.sha256, "arch": b.meta.arch} for role, b in models.items()},
        "images": images,
        "batch_size": prepared.batch_size,
        "precision": precision,
    }
    flops = {PHASES[role]: FlopsPerUnit(float(b.flops_per_image), "image") for role, b in models.items()}
    report = run_metered_in_phases(run, STAGE, carbon, device, info, work, flops)
    return {"run": str(run.root), "device": str(device), "precision": precision, **report.result}


def _benchmark_model(
    bench: BenchModel,
    pool: torch.Tensor,
    pool_np: np.ndarray,
    prepared: PreparedBenchmark,
    phase: AbstractContextManager[None],
    role: str,
    show_progress: bool,
) -> dict[str, Any]:
    """One model's figures; only its throughput loop runs inside `phase` (entered here, once)."""
    device, precision, batch_size = prepared.device, prepared.precision, prepared.batch_size
    meta = bench.meta
    model = prepare_model(bench.model, device, precision)
    channels_last = uses_channels_last(device, precision)

    def forward(lo: int, hi: int) -> None:
        with torch.inference_mode(), autocast(device, precision):
            model(normalize(pool[lo:hi], meta.mean, meta.std, channels_last))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    latency = _latency(lambda: forward(0, 1), sync)
    forward(0, batch_size)  # warm-up at the timed batch (oneDNN primitives, cuDNN's algorithm search)
    sync()
    with make_progress(show_progress) as progress:
        task = progress.add_task(f"{role} {meta.arch} at batch {batch_size}", total=len(pool), info="")
        with phase:
            throughput = _throughput(forward, len(pool), batch_size, sync, lambda n: progress.update(task, advance=n))
    onnx = None if bench.onnx is None else _onnx_figures(bench.onnx, pool_np, batch_size)
    test_acc = None
    if prepared.test_set is not None:
        metrics = evaluate_on(model, prepared.test_set, meta.mean, meta.std, device, show_progress, precision)
        test_acc = metrics["accuracy"]
    return {
        "arch": meta.arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_image": bench.flops_per_image,
        "file_bytes": bench.path.stat().st_size,
        "latency_ms": latency,
        "throughput_images_per_s": throughput,
        "onnx": onnx,
        "test_acc": test_acc,
    }


def _onnx_figures(export: OnnxExport, pool: np.ndarray, batch_size: int) -> dict[str, Any]:
    """Latency and throughput through onnxruntime's CPU provider, on the same images as float32 RGB in [0, 1]
    (the exports fold the normalisation in), converted batch by batch as a caller would."""
    name = export.session.get_inputs()[0].name

    def forward(lo: int, hi: int) -> None:
        export.session.run(None, {name: pool[lo:hi].astype(np.float32) / np.float32(255)})

    latency = _latency(lambda: forward(0, 1), lambda: None)
    forward(0, batch_size)
    throughput = _throughput(forward, len(pool), batch_size, lambda: None, lambda n: None)
    return {
        "path": str(export.path),
        "file_bytes": export.file_bytes,
        "provider": "CPUExecutionProvider",
        "latency_ms": latency,
        "throughput_images_per_s": throughput,
    }


def _latency(forward: Callable[[], None], sync: Callable[[], None]) -> dict[str, float]:
    """p50 and p95 in ms of `TIMED_RUNS` single-image forwards after `WARMUP_RUNS`, each synchronised."""
    for _ in range(WARMUP_RUNS):
        forward()
    sync()
    times = []
    for _ in range(TIMED_RUNS):
        started = time.perf_counter()
        forward()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return {"p50": statistics.median(times), "p95": statistics.quantiles(times, n=20, method="inclusive")[18]}


def _throughput(
    forward: Callable[[int, int], None],
    images: int,
    batch_size: int,
    sync: Callable[[], None],
    done: Callable[[int], None],
) -> float:
    """Images per second of `forward` over `images` images in batches; `sync` once at the end, never inside
    (on a GPU the batches queue, so the device never waits for the host)."""
    started = time.perf_counter()
    for lo in range(0, images, batch_size):
        hi = min(lo + batch_size, images)
        forward(lo, hi)
        done(hi - lo)
    sync()
    return images / (time.perf_counter() - started)
