"""`dfkd export`: each format round-trips (checked here in its own runtime, independently of the exporter's own
check), int8 quantization is measured, and every bad input is one line that leaves no file behind."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import pytest
import torch
from conftest import cli_fails, image_folder
from typer.testing import CliRunner

from dfkd import api
from dfkd.checkpoints import CheckpointMeta, load_checkpoint, save_checkpoint
from dfkd.cli import app
from dfkd.data import normalize
from dfkd.files import sha256_file
from dfkd.models import create_model
from dfkd.rundir import RunDir
from dfkd.stages import export as export_stage
from dfkd.synthetic_set import SyntheticSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = tuple(f"class{i}" for i in range(10))  # the names `image_folder` gives its class folders
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}


def named_checkpoint(path: Path, arch: str) -> Path:
    """A 10-class `arch` with class names, and BN running statistics that are not the initial 0 / 1 (so a
    normalisation folded in the wrong way shows in the logits)."""
    torch.manual_seed(0)
    model = create_model(arch, 10).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 3, 32, 32))
    meta = CheckpointMeta(arch, 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), "test", class_names=CLASSES)
    save_checkpoint(path, model.eval(), meta)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {
        "tiny": named_checkpoint(folder / "tiny.safetensors", "tiny"),
        "wrn16_1": named_checkpoint(folder / "wrn16_1.safetensors", "wrn16_1"),
        "unnamed": tiny_teacher,  # records no class names
    }


def run_with_student(root: Path, checkpoint: Path, shard_images: int = 0) -> Path:
    """A run dir whose student is `checkpoint`, recorded as distillation records it; with `shard_images`, also
    a synthetic shard of that many images (what the export is then checked on)."""
    run = RunDir.open(root)
    student = root / "student" / "student.safetensors"
    student.parent.mkdir()
    student.write_bytes(checkpoint.read_bytes())
    run.record_artifact(student, "distillation", role="student")
    if shard_images:
        images = torch.randint(0, 256, (shard_images, 3, 32, 32), dtype=torch.uint8)
        state = {"tensors": {}, "scalars": {}}
        SyntheticSet(run).write_shard(0, {"images": images}, {"count": str(shard_images)}, state)
    return root


def export_json(*args: str) -> dict[str, Any]:
    """`dfkd export ... --json` in process: stdout must be the JSON alone (no exporter chatter)."""
    result = CliRunner().invoke(app, ["export", *args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def in_runtime(fmt: str, path: Path) -> tuple[Any, dict[str, str]]:
    """The file loaded as a deployment would load it: a function of float images, and its metadata."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        metadata = {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}
        return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0]), metadata
    files = {"dfkd.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, and what is tested here
        module = (
            torch.jit.load(str(path), _extra_files=files)
            if fmt == "torchscript"
            else torch.export.load(str(path), extra_files=files).module()
        )
    return module, json.loads(files["dfkd.json"])


def assert_faithful(fmt: str, path: Path, checkpoint: Path, tolerance: float = 1e-3) -> dict[str, str]:
    """The file's logits on uint8 images scaled to [0, 1] equal the checkpoint's on the same images normalised
    by dfkd, at two batch sizes the exporter did not use; returns the file's metadata."""
    model, meta = load_checkpoint(checkpoint)
    predict, metadata = in_runtime(fmt, path)
    generator = torch.Generator().manual_seed(1)
    for n in (5, 3):
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
        with torch.no_grad():
            want = model(normalize(images, meta.mean, meta.std))
            got = predict(images.float() / 255)
        assert got.shape == (n, 10)
        assert (got - want).abs().max() <= tolerance
    return metadata


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported-program"])
@pytest.mark.parametrize("arch", ["tiny", "wrn16_1"])
def test_a_run_students_export_round_trips_and_is_hashed_in_the_manifest(
    tmp_path: Path, checkpoints: dict[str, Path], arch: str, fmt: str
) -> None:
    root = run_with_student(tmp_path / "run", checkpoints[arch], shard_images=8)
    result = export_json(str(root), "--format", fmt)
    path = root / "export" / f"student{SUFFIX[fmt]}"
    assert result["path"] == str(path) and result["format"] == fmt and result["quantize"] is None
    assert result["sha256"] == sha256_file(path) and result["bytes"] == path.stat().st_size
    assert result["checked_on"] == f"8 synthetic images of {root}" and result["batch_sizes_checked"] == [8, 1]
    assert result["max_abs_diff"] <= 1e-3 and ("opset" in result) == (fmt == "onnx")
    metadata = assert_faithful(fmt, path, checkpoints[arch])
    student_sha = sha256_file(root / "student" / "student.safetensors")
    assert json.loads(metadata["class_names"]) == list(CLASSES)
    assert {key: metadata[key] for key in ("arch", "num_classes", "input_size", "source_sha256", "input")} == {
        "arch": arch,
        "num_classes": "10",
        "input_size": "32",
        "source_sha256": student_sha,
        "input": "float32 RGB in [0,1], NCHW",
    }
    assert json.loads(metadata["mean"]) == [0.49, 0.48, 0.45] and metadata["dfkd_version"]
    manifest = RunDir(root).read_manifest()
    assert manifest["artifacts"]["export/" + path.name] == {
        "sha256": result["sha256"],
        "bytes": result["bytes"],
        "stage": "export",
        "role": "deployable student",
    }
    entry = manifest["exports"]["export/" + path.name]
    assert entry["format"] == fmt and entry["sha256"] == result["sha256"] and entry["source_sha256"] == student_sha
    assert entry.get("opset") == (18 if fmt == "onnx" else None) and entry["max_abs_diff"] == result["max_abs_diff"]
    assert not [problem for problem in api.audit(root) if "export" in problem]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_a_checkpoint_exports_to_out_checked_on_test_images(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    data = image_folder(tmp_path / "data", 10)
    out = tmp_path / "deploy" / "wrn.pt2"
    out.parent.mkdir()
    result = api.export(checkpoints["wrn16_1"], format="exported-program", out=out, data=data)
    assert result["checked_on"] == f"20 test images of imagefolder {data} (test)"
    assert result["batch_sizes_checked"] == [20, 1]
    assert result["source_sha256"] == sha256_file(checkpoints["wrn16_1"]) and "accuracy" not in result
    assert_faithful("exported-program", out, checkpoints["wrn16_1"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["wrn.pt2"]
    # A second export replaces the file (atomically), and a checkpoint without class names exports too.
    again = export_json(str(checkpoints["unnamed"]), "--format", "exported-program", "--out", str(out))
    assert again["checked_on"] == "16 random images" and again["sha256"] == sha256_file(out) != result["sha256"]
    assert "class_names" not in assert_faithful("exported-program", out, checkpoints["unnamed"])


def test_int8_dynamic_quantization_is_measured_against_fp32(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    root = run_with_student(tmp_path / "run", checkpoints["wrn16_1"])
    data = image_folder(tmp_path / "data", 10)
    result = export_json(str(root), "--format", "onnx", "--quantize", "dynamic", "--data", str(data))
    path = root / "export" / "student.int8.onnx"
    assert result["path"] == str(path) and result["quantize"] == "dynamic" and result["opset"] == 18
    assert result["fp32_max_abs_diff"] <= 1e-3 and result["max_abs_diff"] > result["fp32_max_abs_diff"]
    assert 0 <= result["top1_agreement"] <= 100
    assert result["checked_on"] == f"20 test images of imagefolder {data} (test)"
    accuracy = result["accuracy"]
    assert accuracy["images"] == 20 and accuracy["data"] == f"imagefolder {data} (test)"
    assert accuracy["change_pp"] == pytest.approx(accuracy["int8"] - accuracy["fp32"])
    assert {accuracy["fp32"] % 5, accuracy["int8"] % 5} == {0}  # whole images out of 20
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "ConvInteger" in ops  # the weights are int8
    assert_faithful("onnx", path, checkpoints["wrn16_1"], tolerance=1.0)
    assert RunDir(root).read_manifest()["exports"]["export/student.int8.onnx"]["accuracy"] == accuracy
    assert sorted(p.name for p in path.parent.iterdir()) == ["student.int8.onnx"]  # the fp32 step is gone


def test_an_export_that_does_not_match_is_refused_and_removed(
    tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_stage, "TOLERANCE", -1.0)  # every export now "differs"
    root = run_with_student(tmp_path / "run", checkpoints["tiny"])
    message = cli_fails("export", str(root), "--format", "torchscript")
    assert "differs from the PyTorch model by" in message and "not written" in message, message
    assert not (root / "export").exists() or not list((root / "export").iterdir())
    assert "exports" not in RunDir(root).read_manifest()


def bad_inputs(tmp_path: Path, checkpoints: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """Each bad input: the command line, and what its one-line error must say."""
    tiny = str(checkpoints["tiny"])
    empty = RunDir.open(tmp_path / "empty")
    empty.update_manifest()  # a run dir (it has a manifest) whose distillation has not run
    no_student = empty.root
    damaged = run_with_student(tmp_path / "damaged", checkpoints["tiny"])
    with open(damaged / "student" / "student.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00")
    three_classes = image_folder(tmp_path / "three", 3)
    renamed = image_folder(tmp_path / "renamed", 10)
    (renamed / "train" / "class0").rename(renamed / "train" / "aaa")
    (renamed / "test" / "class0").rename(renamed / "test" / "aaa")
    out = str(tmp_path / "out.onnx")
    return {
        "missing folder": ([tiny, "--format", "onnx", "--out", str(tmp_path / "no" / "x.onnx")], "does not exist"),
        "read-only folder": ([tiny, "--format", "onnx", "--out", "/proc/x.onnx"], "cannot write /proc/x.onnx"),
        "wrong suffix": ([tiny, "--format", "torchscript", "--out", out], "must end in .pt for --format torchscript"),
        "no --out": ([tiny, "--format", "onnx"], "needs --out"),
        "no source": ([str(tmp_path / "nothing"), "--format", "onnx", "--out", out], "does not exist"),
        "no student": ([str(no_student), "--format", "onnx"], "has no intact student"),
        "damaged student": ([str(damaged), "--format", "onnx"], "finish its distillation"),
        "quantize torchscript": (
            [tiny, "--format", "torchscript", "--quantize", "dynamic", "--out", str(tmp_path / "x.pt")],
            "needs --format onnx",
        ),
        "class count": ([tiny, "--format", "onnx", "--out", out, "--data", str(three_classes)], "predicts 10 classes"),
        "class names": ([tiny, "--format", "onnx", "--out", out, "--data", str(renamed)], "calls class 0"),
    }


def test_every_bad_input_is_one_line_and_leaves_nothing(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    cases = bad_inputs(tmp_path, checkpoints)

    def files() -> list[Path]:  # but a run's lock file, which every command that locks a run leaves
        return sorted(path for path in tmp_path.rglob("*") if path.name != ".lock")

    before = files()
    for name, (args, expected) in cases.items():
        message = cli_fails("export", *args)
        assert expected in message, (name, message)
        assert files() == before, name  # no file, temporary or not, and no folder
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    assert "is not a dfkd run dir (no manifest.json)" in cli_fails("export", str(folder), "--format", "onnx")
    assert list(folder.iterdir()) == [], "not even a lock file in a folder that is not a run dir"


def test_the_audit_checks_the_exports_the_manifest_lists(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    from dfkd.report.audit import audit_run

    run = run_with_student(tmp_path / "run", checkpoints["tiny"])
    assert CliRunner().invoke(app, ["export", str(run), "--format", "torchscript", "--json"]).exit_code == 0
    ledgerless = audit_run(run)  # the test's run dir has a student but no ledger; nothing about the export
    assert not any("export" in problem for problem in ledgerless), ledgerless
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["exports"]["export/student.pt"]["sha256"] = "0" * 64
    (run / "manifest.json").write_text(json.dumps(manifest))
    found = [problem for problem in audit_run(run) if problem not in ledgerless]
    assert len(found) == 1 and "export export/student.pt records sha256 '000000" in found[0], found


def test_an_unknown_format_is_one_line_listing_the_formats(
    tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The format is a choice of the command line, so `dfkd`'s entry point answers (CliRunner would show click's
    boxed usage message instead)."""
    from dfkd.cli import main

    args = ["dfkd", "export", str(checkpoints["tiny"]), "--format", "tflite", "--out", str(tmp_path / "x.onnx")]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: ") and "'tflite' is not one of 'onnx', 'torchscript', 'exported-program'" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_onnx_without_its_packages_says_how_to_install_them(
    tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # `import onnxruntime` now fails
    out = tmp_path / "x.onnx"
    message = cli_fails("export", str(checkpoints["tiny"]), "--format", "onnx", "--out", str(out))
    assert f"needs {missing}" in message and "pip install 'dfkd[onnx]'" in message, message
    assert list(tmp_path.iterdir()) == []
