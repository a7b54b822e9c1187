"""`dfkd benchmark inference` on tiny models: one phased ledger record that audits, the figures, ONNX, bad input.

The models are the tiny CNN and randomly initialised Wide-ResNets (the figures measured do not depend on the
weights); the images are few, so each benchmark takes a second or two on the CPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import cli_fails, image_folder
from torch import nn
from typer.testing import CliRunner

from dfkd.carbon.ledger import read_ledger
from dfkd.carbon.meter import OUTSIDE_PHASES
from dfkd.checkpoints import CheckpointMeta, load_checkpoint, save_checkpoint
from dfkd.cli import app
from dfkd.config.recipe import EMBEDDED_TEACHER_PATH
from dfkd.models import create_model
from dfkd.models.describe import describe_model
from dfkd.models.zoo import CIFAR10_MEAN, CIFAR10_STD
from dfkd.report.audit import audit_run
from dfkd.report.build import build_report
from dfkd.rundir import STUDENT_DIR, RunDir
from dfkd.stages.inference import STAGE

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PHASE_NAMES = ["teacher-inference", "student-inference", OUTSIDE_PHASES]
ON_CPU = ("--device", "cpu", "--grid-intensity", "400")


def save_model(path: Path, arch: str, num_classes: int = 10, input_size: int = 32) -> Path:
    torch.manual_seed(0)
    meta = CheckpointMeta(arch, num_classes, CIFAR10_MEAN, CIFAR10_STD, "test", input_size)
    save_checkpoint(path, create_model(arch, num_classes).eval(), meta)
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WRN-16-1, the paper's student."""
    return save_model(tmp_path_factory.mktemp("student") / "wrn16_1.safetensors", "wrn16_1")


class _Normalised(nn.Module):
    """A model that takes RGB in [0, 1], its normalisation folded in, as `dfkd export` writes it."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def export_onnx(checkpoint: Path, path: Path) -> Path:
    model, meta = load_checkpoint(checkpoint)
    size = meta.input_size
    torch.onnx.export(
        _Normalised(model, meta.mean, meta.std).eval(),
        (torch.rand(2, 3, size, size),),
        str(path),
        dynamo=True,
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        input_names=["images"],
        verbose=False,
    )
    return path


def benchmark(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["benchmark", "inference", *args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_one_record_in_two_metered_phases_that_audits(student: Path, tmp_path: Path) -> None:
    """The embedded WRN-40-2 teacher and a WRN-16-1 over 512 images: each phase runs well over codecarbon's
    50 ms between measurements (a shorter phase would read no energy; its share lands outside it)."""
    run = tmp_path / "bench"
    summary = benchmark(str(EMBEDDED_TEACHER_PATH), str(student), "--run", str(run), *ON_CPU, "--images", "512")

    (record,) = read_ledger(run / "carbon.jsonl")
    assert (record["stage"], record["status"]) == (STAGE, "complete")
    info = record["info"]
    assert info == {
        "teacher": {"path": str(EMBEDDED_TEACHER_PATH), "sha256": info["teacher"]["sha256"], "arch": "wrn40_2"},
        "student": {"path": str(student), "sha256": info["student"]["sha256"], "arch": "wrn16_1"},
        "images": 512,
        "batch_size": 64,
        "precision": summary["precision"],
    }
    phases = record["phases"]
    assert list(phases) == PHASE_NAMES
    for name in PHASE_NAMES[:2]:
        assert phases[name]["duration_s"] > 0.05 and phases[name]["energy_kwh"]["total"] > 0, name
    for part in ("cpu", "gpu", "ram", "total"):
        assert sum(p["energy_kwh"][part] for p in phases.values()) == pytest.approx(record["energy_kwh"][part])
    assert sum(p["duration_s"] for p in phases.values()) == pytest.approx(record["duration_s"])
    # FLOPs per image as `dfkd models` counts them (0.655 and 0.0533 GFLOPs), times the images of each phase.
    flops = {role: figures["flops_per_image"] for role, figures in summary["models"].items()}
    assert flops == {"teacher": 655_198_720, "student": 53_314_816}
    assert flops["teacher"] == describe_model("wrn40_2", 10)["forward_flops_per_image"]
    assert flops["student"] == describe_model("wrn16_1", 10)["forward_flops_per_image"]
    assert phases["teacher-inference"]["flops"] == flops["teacher"] * 512
    assert phases["student-inference"]["flops"] == flops["student"] * 512
    assert phases[OUTSIDE_PHASES]["flops"] == 0
    assert audit_run(run) == []

    # The result is the record's, figures only: energy per inference is the read side's, from the phases.
    assert summary == {"run": str(run), "device": "cpu", "precision": summary["precision"], **record["result"]}
    assert "energy" not in json.dumps(record["result"])
    assert (summary["images"], summary["batch_size"]) == (512, 64)
    teacher, wrn = summary["models"]["teacher"], summary["models"]["student"]
    assert (teacher["parameters"], wrn["parameters"]) == (2_243_546, 175_066)
    for figures, path in ((teacher, EMBEDDED_TEACHER_PATH), (wrn, student)):
        assert figures["file_bytes"] == path.stat().st_size
        assert 0 < figures["latency_ms"]["p50"] <= figures["latency_ms"]["p95"]
        assert figures["throughput_images_per_s"] > 0
        assert figures["onnx"] is None and figures["test_acc"] is None
    assert RunDir(run).read_manifest()["carbon"]["grid_g_per_kwh"] == 400

    (row,) = build_report([run])["runs"][0]["rows"]
    assert row["phase"] == "inference" and set(row["parts"]) == set(PHASE_NAMES)


@pytest.fixture(scope="module")
def student_run(student: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir with an intact student and the fp32 ONNX export of it that its manifest lists, as `dfkd export`
    leaves them; listed beside it, a quantized export and one of an earlier student, neither of them timed."""
    run = RunDir.open(tmp_path_factory.mktemp("runs") / "distilled")
    path = run.root / STUDENT_DIR / "student.safetensors"
    path.parent.mkdir()
    shutil.copyfile(student, path)
    digest = run.record_artifact(path, "distillation")
    exported = export_onnx(path, run.root / "student.onnx")
    fp32 = {"format": "onnx", "quantize": None, "source_sha256": digest}
    entries = {
        "student.onnx": fp32,
        "student-int8.onnx": {**fp32, "quantize": "dynamic"},
        "earlier.onnx": {**fp32, "source_sha256": "0" * 64},
    }
    for name, entry in entries.items():  # each a hashed artifact, as `dfkd export` records it (the audit checks)
        target = run.root / name
        if target != exported:
            shutil.copyfile(exported, target)
        entry["sha256"] = run.record_artifact(target, "export")
    run.update_manifest(exports=entries)
    return run.root


def test_onnx_exports_and_test_accuracy(tiny_teacher: Path, student_run: Path, tmp_path: Path) -> None:
    """A run-dir student: the record goes to that run, its listed fp32 export is timed; the teacher's export
    is given; and with --data both models are scored on the test split."""
    teacher_onnx = export_onnx(tiny_teacher, tmp_path / "teacher.onnx")
    data = image_folder(tmp_path / "data", classes=10)
    summary = benchmark(
        str(tiny_teacher), str(student_run), "--onnx-teacher", str(teacher_onnx), "--data", str(data), *ON_CPU,
        "--images", "16", "--batch-size", "8",
    )  # fmt: skip
    assert summary["run"] == str(student_run)
    (record,) = read_ledger(student_run / "carbon.jsonl")
    assert record["info"]["student"]["path"] == str(student_run / STUDENT_DIR / "student.safetensors")
    for role, onnx_file in (("teacher", teacher_onnx), ("student", student_run / "student.onnx")):
        figures = summary["models"][role]
        onnx = figures["onnx"]
        # torch's exporter writes the weights to an external data file beside the .onnx: both count
        files = [onnx_file, onnx_file.with_name(f"{onnx_file.name}.data")]
        assert (onnx["path"], onnx["file_bytes"]) == (str(onnx_file), sum(f.stat().st_size for f in files))
        assert onnx["provider"] == "CPUExecutionProvider"
        assert 0 < onnx["latency_ms"]["p50"] <= onnx["latency_ms"]["p95"] and onnx["throughput_images_per_s"] > 0
        assert 0 <= figures["test_acc"] <= 100
    assert audit_run(student_run) == []


def test_the_table_names_both_models(tiny_teacher: Path, student: Path, tmp_path: Path) -> None:
    run = tmp_path / "bench"
    args = ["benchmark", "inference", str(tiny_teacher), str(student), "--run", str(run), "--images", "64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "teacher" in result.stdout and "wrn16_1" in result.stdout and "images/s, batch 64" in result.stdout
    assert f"dfkd report {run}" in result.stdout
    assert "teacher tiny at batch 64" in result.stderr  # the progress bar, at the CPU's default batch


def _onnx_of_size(path: Path, size: int) -> Path:
    """An ONNX classifier of 3 x size x size images (global pool, then a 3 -> 10 matmul), built directly."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((3, 10), dtype=np.float32), "weight")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weight"], ["logits"]),
        ],
        "sized",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_bad_input_is_one_line_and_writes_nothing(
    tiny_teacher: Path, student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "never"
    pair = (str(tiny_teacher), str(student))
    five = save_model(tmp_path / "five.safetensors", "tiny", num_classes=5)
    big = save_model(tmp_path / "big.safetensors", "tiny", input_size=48)
    RunDir.open(tmp_path / "undistilled")
    altered = RunDir.open(tmp_path / "altered")
    (altered.root / STUDENT_DIR).mkdir()
    shutil.copyfile(student, altered.root / STUDENT_DIR / "student.safetensors")
    altered.record_artifact(altered.root / STUDENT_DIR / "student.safetensors", "distillation")
    shutil.copyfile(five, altered.root / STUDENT_DIR / "student.safetensors")
    sized = _onnx_of_size(tmp_path / "sized.onnx", 48)
    export_altered = RunDir.open(tmp_path / "export-altered")
    (export_altered.root / STUDENT_DIR).mkdir()
    copied = shutil.copyfile(student, export_altered.root / STUDENT_DIR / "student.safetensors")
    digest = export_altered.record_artifact(copied, "distillation")
    export_altered.record_artifact(shutil.copyfile(sized, export_altered.root / "student.onnx"), "export")
    export_altered.update_manifest(exports={"student.onnx": {"format": "onnx", "source_sha256": digest}})
    (export_altered.root / "student.onnx").write_bytes(b"not the file exported")
    # An export of the teacher, offered as the student's: same shape, another model (its metadata says so).
    teachers_export = tmp_path / "teacher.onnx"
    assert (
        CliRunner()
        .invoke(app, ["export", str(tiny_teacher), "--format", "onnx", "--out", str(teachers_export), "--json"])
        .exit_code
        == 0
    )
    cases = {
        "export of another checkpoint": (
            (*pair, "--onnx-student", str(teachers_export)),
            "was exported from another checkpoint",
        ),
        "checkpoint missing": ((str(tmp_path / "nope.safetensors"), str(student)), "does not exist"),
        "classes differ": ((str(tiny_teacher), str(five)), "predicts 10 classes at 32 px but student"),
        "sizes differ": ((str(tiny_teacher), str(big)), "10 at 48 px: pair a student with its own teacher"),
        "no student": ((str(tiny_teacher), str(tmp_path / "undistilled")), "has no intact student"),
        "student altered": ((str(tiny_teacher), str(altered.root)), "has no intact student"),
        "export altered": ((str(tiny_teacher), str(export_altered.root)), "student.onnx, which is missing or altered"),
        "onnx missing": ((*pair, "--onnx-teacher", str(tmp_path / "nope.onnx")), "does not exist"),
        "onnx of another size": ((*pair, "--onnx-student", str(sized)), "takes input ['batch', 3, 48, 48]"),
        "classes of the data": (
            (*pair, "--data", str(image_folder(tmp_path / "three", classes=3))),
            "predicts 10 classes but imagefolder",
        ),
        "fewer images than a batch": ((*pair, "--images", "8", "--batch-size", "16"), "fewer than --batch-size 16"),
    }
    for name, (args, expected) in cases.items():
        message = cli_fails("benchmark", "inference", *args, "--run", str(run), "--device", "cpu")
        assert expected in message, (name, message)
        assert not run.exists(), name
    assert not (tmp_path / "altered" / "carbon.jsonl").exists()

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    message = cli_fails("benchmark", "inference", *pair, "--onnx-teacher", str(sized), "--run", str(run))
    assert "needs onnx and onnxruntime" in message and "pip install 'dfkd[onnx]'" in message
    assert not run.exists()
