"""`dfkd export`: a student (or any checkpoint) as one deployable file, checked in its own runtime.

    onnx              torch.onnx (dynamo, opset 18), run by onnxruntime; `--quantize dynamic` gives int8 weights
    torchscript       torch.jit.trace, run by torch.jit.load (any libtorch, no Python model code)
    exported-program  torch.export, a `.pt2` run by torch.export.load

Every file takes float32 RGB images in [0, 1], (N, 3, S, S) with any N, and returns logits: the checkpoint's
normalisation is folded into the graph, so a deployment cannot feed it other statistics. Its metadata names
the architecture, classes, normalisation, the source's sha256 and dfkd's version. A file is accepted only
after it was loaded back in its runtime and matched the PyTorch model at two batch sizes; until then it
lives under a temporary name beside the destination, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from torch import Tensor, nn

from dfkd.checkpoints import CheckpointMeta, load_checkpoint
from dfkd.data import AnySplit, load_split
from dfkd.device import resolve_device
from dfkd.errors import DfkdError, first_line
from dfkd.files import atomic_path, ensure_writable, package_versions, sha256_file
from dfkd.manifest import MANIFEST_FILE, ExportEntry
from dfkd.rundir import STUDENT_FILE, RunDir
from dfkd.stages.evaluate import CPU_BATCH, check_classes
from dfkd.synthetic_set import SyntheticSet

SUFFIXES: dict[str, str] = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
STAGE = "export"
ONNX_INSTALL = "pip install 'dfkd[onnx]'"  # the extra that brings onnx, onnxruntime and onnxscript
EXPORT_DIR = "export"
OPSET = 18
# fp32 kernels of two runtimes differ by rounding only (~1e-6 on the logits); more is a wrong graph.
TOLERANCE = 1e-3
INPUT_CONTRACT = "float32 RGB in [0,1], NCHW"
METADATA_FILE = "dfkd.json"  # the metadata inside a TorchScript or .pt2 archive
CHECK_IMAGES = 16  # images the check runs without --data
DATA_BATCH = 64  # test images the check runs with --data

Predict = Callable[[Tensor], Tensor]


class NormalizedClassifier(nn.Module):
    """`model` behind `(x - mean) / std`, so the exported graph takes images in [0, 1] and its users need not
    know, or get wrong, the statistics the model was trained with."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.model((images - self.mean) / self.std)


@dataclass
class Source:
    """What is exported: the model, its metadata, the file it came from and, for a run's student, the run."""

    path: Path
    model: nn.Module
    meta: CheckpointMeta
    sha256: str
    run: RunDir | None = None


def export_metadata(meta: CheckpointMeta, source_sha256: str) -> dict[str, str]:
    """What the file says about itself, as strings (ONNX metadata holds nothing else): enough to feed it the
    right images and name its outputs without the checkpoint."""
    recorded = {
        "arch": meta.arch,
        "num_classes": str(meta.num_classes),
        "input_size": str(meta.input_size),
        "mean": json.dumps(list(meta.mean)),
        "std": json.dumps(list(meta.std)),
        "dataset": meta.dataset,
        "source_sha256": source_sha256,
        "dfkd_version": package_versions()["dfkd"],
        "input": INPUT_CONTRACT,
        "output": f"logits (N, {meta.num_classes})",
    }
    if meta.class_names is not None:
        recorded["class_names"] = json.dumps(list(meta.class_names), ensure_ascii=False)
    return recorded


def check_request(fmt: str, out: Path | None, quantize: str | None) -> None:
    """Refuse, before any work, a request that cannot succeed: a wrong suffix, a quantization the format does
    not have, a destination folder that is missing, or a runtime that is not installed."""
    if fmt not in SUFFIXES:
        raise DfkdError(f"unknown export format {fmt!r}: use {', '.join(SUFFIXES)}")
    if quantize not in (None, "dynamic"):
        raise DfkdError(f"unknown quantization {quantize!r}: use dynamic (int8 weights)")
    if quantize is not None and fmt != "onnx":
        raise DfkdError(f"--quantize {quantize} needs --format onnx (onnxruntime quantizes it), not {fmt}")
    if out is not None and out.suffix != SUFFIXES[fmt]:
        raise DfkdError(f"--out {out} must end in {SUFFIXES[fmt]} for --format {fmt}")
    if out is not None and not out.parent.is_dir():
        raise DfkdError(f"--out {out}: folder {out.parent} does not exist: create it or choose another")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401  # torch.onnx's dynamo exporter translates through it
        except ImportError as exc:
            raise DfkdError(
                f"--format onnx needs {exc.name or 'onnx'}, which is not installed here: {ONNX_INSTALL}"
            ) from None


def run_student(run: RunDir) -> Source:
    """The run's student, which must match its manifest (a half-written or replaced one is not exported)."""
    student = run.root / STUDENT_FILE
    if not run.artifact_intact(student):
        raise DfkdError(
            f"run dir {run.root} has no intact student ({STUDENT_FILE}): finish its distillation "
            f"first (`dfkd distill --run {run.root}`), or export a .safetensors checkpoint"
        )
    model, meta = load_checkpoint(student)
    return Source(student, model, meta, sha256_file(student), run)


def default_out(run: RunDir, fmt: str, quantize: str | None) -> Path:
    """`RUN/export/student.onnx` (`.int8.onnx` when quantized), `.pt` or `.pt2`."""
    return run.root / EXPORT_DIR / f"student{'.int8' if quantize else ''}{SUFFIXES[fmt]}"


def _unit(images: Tensor) -> Tensor:
    """uint8 images as the exported model takes them: float32 in [0, 1]."""
    return images.to(torch.float32).div_(255)


def check_images(source: Source, split: AnySplit | None) -> tuple[Tensor, str]:
    """The images the export is checked on, and what they are: the first test images of `split`; else the first
    synthetic images of the source's run (images the student was trained on, not noise); else random ones."""
    if split is not None:
        images, _ = next(iter(split.batches(DATA_BATCH, "cpu")))  # the dropped generator ends a stream's workers
        return _unit(images), f"{len(images)} test images of {split.source}"
    size = source.meta.input_size
    if source.run is not None and (shards := SyntheticSet(source.run).valid_shards()):
        with safe_open(str(shards[0]), framework="pt") as f:
            images = f.get_slice("images")[:CHECK_IMAGES]
        if tuple(images.shape[1:]) == (3, size, size):
            return _unit(images), f"{len(images)} synthetic images of {source.run.root}"
    generator = torch.Generator().manual_seed(0)
    return torch.rand(CHECK_IMAGES, 3, size, size, generator=generator), f"{CHECK_IMAGES} random images"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence what the exporters print on stdout (it would corrupt `--json`), TorchScript's deprecation
    warning (the user asked for TorchScript) and onnxruntime's quantization advice on the root logger."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _write(fmt: str, model: nn.Module, sample: Tensor, path: Path, metadata: dict[str, str]) -> None:
    """Export `model` (traced on `sample`, batch dimension dynamic) to `path` in `fmt`, metadata included."""
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet():
            if fmt == "onnx":
                import onnx

                torch.onnx.export(
                    model,
                    (sample,),
                    str(path),
                    dynamo=True,
                    opset_version=OPSET,
                    input_names=["images"],
                    output_names=["logits"],
                    dynamic_shapes={"images": {0: batch}},
                    external_data=False,  # one self-contained file
                    verbose=False,
                )
                proto = onnx.load(str(path))
                onnx.helper.set_model_props(proto, metadata)
                onnx.save(proto, str(path))
            elif fmt == "torchscript":
                traced = torch.jit.trace(model, sample)
                torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})
            else:
                program = torch.export.export(model, (sample,), dynamic_shapes={"images": {0: batch}})
                torch.export.save(program, str(path), extra_files={METADATA_FILE: json.dumps(metadata)})
    except (DfkdError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - an exporter refuses an unsupported model with any exception type
        reason = first_line(exc)
        raise DfkdError(f"{metadata['arch']} cannot be exported as {fmt} ({reason}): try another --format") from None


def load_exported(fmt: str, path: Path, device: torch.device) -> tuple[Predict, dict[str, str]]:
    """The file at `path` loaded in its own runtime (onnxruntime on the CPU, torch.jit, torch.export): a function
    from float images to fp32 CPU logits, and the metadata the file records."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_session(images: Tensor) -> Tensor:
            return torch.from_numpy(session.run(None, {name: images.cpu().numpy()})[0])

        return run_session, dict(session.get_modelmeta().custom_metadata_map)
    files = {METADATA_FILE: ""}
    with _quiet():
        if fmt == "torchscript":
            module = torch.jit.load(str(path), map_location=device, _extra_files=files)
        else:
            module = torch.export.load(str(path), extra_files=files).module()

    @torch.no_grad()
    def run_module(images: Tensor) -> Tensor:
        return module(images.to(device)).float().cpu()

    return run_module, json.loads(files[METADATA_FILE])


def compare(
    fmt: str, path: Path, reference: Predict, images: Tensor, metadata: dict[str, str], device: torch.device
) -> tuple[Predict, float, list[int]]:
    """Load the written file and run it on `images` and on a batch of another size (the batch must be dynamic);
    returns its predict function, the largest absolute difference from `reference`'s logits (NaN if it gives
    NaN), and the batch sizes run. A file whose metadata does not read back is refused."""
    predict, found = load_exported(fmt, path, device)
    if {key: found.get(key) for key in metadata} != metadata:
        raise DfkdError(f"the {fmt} file's metadata did not read back as written: not keeping {path.name}")
    other = images[:1] if len(images) > 1 else images.repeat(2, 1, 1, 1)
    diffs = []
    for batch in (images, other):
        got, want = predict(batch), reference(batch)
        if got.shape != want.shape:
            raise DfkdError(
                f"the {fmt} file returns {tuple(got.shape)} for a batch of {len(batch)}, not {tuple(want.shape)}"
            )
        diffs.append((got - want).abs().max())
    return predict, float(torch.stack(diffs).max()), [len(images), len(other)]


def _accuracy(split: AnySplit, models: dict[str, Predict]) -> dict[str, float]:
    """Top-1 accuracy in % of each of `models` on the whole of `split`, read once."""
    correct = dict.fromkeys(models, 0)
    for images, labels in split.batches(CPU_BATCH, "cpu"):
        batch = _unit(images)
        for name, predict in models.items():
            correct[name] += int((predict(batch).argmax(1) == labels).sum())
    return {name: 100.0 * count / len(split) for name, count in correct.items()}


def export_model(
    source: Source,
    fmt: str,
    out: Path,
    quantize: str | None = None,
    split: AnySplit | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Export `source` to `out`, written atomically once it matches the PyTorch model within `TOLERANCE` (for
    `quantize`, once its fp32 export does, the int8 file being measured, not held to it); returns what was
    written and how it was checked."""
    device = torch.device("cpu") if fmt == "onnx" or device is None else device  # onnxruntime runs on the CPU
    model = NormalizedClassifier(source.model, source.meta.mean, source.meta.std).to(device).eval()

    @torch.no_grad()
    def reference(images: Tensor) -> Tensor:
        return model(images.to(device)).float().cpu()

    images, checked_on = check_images(source, split)
    sample = images[:2] if len(images) > 1 else images.repeat(2, 1, 1, 1)
    metadata = export_metadata(source.meta, source.sha256)
    quantized: dict[str, Any] = {}
    with atomic_path(out) as tmp:
        fp32 = tmp.with_name(f"{tmp.name}.fp32") if quantize else tmp
        try:
            _write(fmt, model, sample.to(device), fp32, metadata)
            fp32_predict, diff, sizes = compare(fmt, fp32, reference, images, metadata, device)
            if not diff <= TOLERANCE:  # also refuses NaN
                raise DfkdError(
                    f"the {fmt} export of {source.meta.arch} differs from the PyTorch model by {diff:.3g} "
                    f"(over {TOLERANCE:g}) on {checked_on}: not written; try another --format"
                )
            if quantize:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                with _quiet():
                    quantize_dynamic(fp32, tmp, weight_type=QuantType.QInt8)
                quantized["fp32_max_abs_diff"] = diff
                int8_predict, diff, sizes = compare(fmt, tmp, reference, images, metadata, device)
                agreement = (int8_predict(images).argmax(1) == fp32_predict(images).argmax(1)).float().mean()
                quantized["top1_agreement"] = 100.0 * float(agreement)
                if split is not None:
                    measured = _accuracy(split, {"fp32": fp32_predict, "int8": int8_predict})
                    quantized["accuracy"] = {
                        "data": split.source,
                        "images": len(split),
                        **measured,
                        "change_pp": measured["int8"] - measured["fp32"],
                    }
        finally:
            if quantize:
                fp32.unlink(missing_ok=True)
    return {
        "path": str(out),
        "format": fmt,
        "sha256": sha256_file(out),
        "bytes": out.stat().st_size,
        **({"opset": OPSET} if fmt == "onnx" else {}),
        "quantize": quantize,
        "max_abs_diff": diff,
        "checked_on": checked_on,
        "batch_sizes_checked": sizes,
        **quantized,
        "source": str(source.path),
        "source_sha256": source.sha256,
    }


def _record(run: RunDir, out: Path, result: dict[str, Any]) -> None:
    """Enter a file written inside the run dir in its manifest, as an artifact (which `dfkd audit` re-hashes)
    and in `exports` with how it was checked, in one atomic write."""
    entry = cast(ExportEntry, {key: result[key] for key in ExportEntry.__annotations__ if key in result})
    exports = {**run.read_manifest().get("exports", {}), run.relative(out): entry}
    run.update_manifest(
        artifacts=run.artifact_entry(out, STAGE, "deployable student", result["sha256"]), exports=exports
    )


def _export_checked(
    source: Source, fmt: str, out: Path, quantize: str | None, data: Path | None, device: torch.device
) -> dict[str, Any]:
    """The checks that need the source (a writable destination, test data with the model's classes), then
    the export; a file inside the source's run dir is recorded in its manifest."""
    ensure_writable(out)
    split = None
    if data is not None:
        split = load_split(data, "test", source.meta.input_size, stream=True)
        check_classes(split, source.meta, source.path)
    result = export_model(source, fmt, out, quantize, split, device)
    if source.run is not None and out.resolve().is_relative_to(source.run.root.resolve()):
        _record(source.run, out, result)
    return result


def export_source(
    source: Path,
    fmt: str,
    out: Path | None = None,
    quantize: str | None = None,
    data: Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Export a run dir's student (to `RUN/export/` by default, recorded in its manifest; the run locked
    meanwhile) or a `.safetensors` checkpoint (to `out`, required) as `fmt`; bad input is a `DfkdError`
    raised before anything is written."""
    check_request(fmt, out, quantize)
    torch_device = resolve_device(device)
    if source.is_dir():
        if not (source / MANIFEST_FILE).is_file():  # checked first: locking would leave a .lock in any folder
            raise DfkdError(f"{source} is not a dfkd run dir (no {MANIFEST_FILE}): pass a run dir or a checkpoint")
        run = RunDir.open(source, create=False)
        with run.locked():
            return _export_checked(
                run_student(run), fmt, out or default_out(run, fmt, quantize), quantize, data, torch_device
            )
    if out is None:
        raise DfkdError(f"exporting the checkpoint {source} needs --out FILE{SUFFIXES[fmt]}")
    if not source.exists():
        raise DfkdError(f"{source} does not exist: pass a run dir or a .safetensors checkpoint")
    model, meta = load_checkpoint(source)
    return _export_checked(Source(source, model, meta, sha256_file(source)), fmt, out, quantize, data, torch_device)
