"""The `dfkd` command through typer's CliRunner: teacher training, checkpoint info/import, evaluate, bad input.

Bad input must end in exit code 2 and exactly one stderr line starting with "error:" (no traceback),
with nothing half-written left behind.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_teacher
from PIL import Image
from typer.testing import CliRunner, Result

from dfkd.carbon.ledger import read_ledger, verify_ledger
from dfkd.checkpoints import load_checkpoint, read_meta
from dfkd.cli import Method, app
from dfkd.config.recipe import EMBEDDED_TEACHER_PATH
from dfkd.data import load_split, stratified_subset
from dfkd.errors import DfkdError
from dfkd.files import sha256_file
from dfkd.models import create_model, list_models, model_spec
from dfkd.models.zoo import CIFAR10_MEAN, CIFAR10_STD
from synthesizers import list_synthesizers

runner = CliRunner()


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def make_image_folder(root: Path, classes: dict[str, list[str]], per_class: int = 4) -> Path:
    """An ImageFolder root of random 32x32 PNGs: `classes` maps each split to its class folders."""
    rng = np.random.default_rng(0)
    for split, names in classes.items():
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def assert_user_error(result: Result, *words: str) -> str:
    """Exit 2, nothing on stdout, one line on stderr starting with 'error:' that contains `words`."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0]
    return lines[0]


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")} if folder.exists() else set()


@pytest.fixture
def toy_data(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "toy", {"train": ["ant", "bee", "cat"], "test": ["ant", "bee", "cat"]})


@pytest.fixture
def lopsided_data(tmp_path: Path) -> Path:
    """train/ has three classes, test/ only two: every label after the gap would shift."""
    return make_image_folder(tmp_path / "lopsided", {"train": ["ant", "bee", "cat"], "test": ["ant", "cat"]})


# ------------------------------------------------------------------------------------ happy paths


def test_no_arguments_prints_help() -> None:
    done = subprocess.run([sys.executable, "-m", "dfkd"], capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 2) and done.stdout.startswith("Usage: dfkd") and "error" not in done.stderr
    result = invoke()
    assert result.exit_code in (0, 2)  # click >= 8.2 exits 2 after no_args_is_help
    shown = result.stdout + result.stderr  # click >= 8.2 shows it on stderr when called without `main`
    assert "Usage:" in shown
    for command in ("teacher", "checkpoint", "evaluate", "models", "synthesize", "distill"):
        assert command in shown
    assert "Traceback" not in result.output
    sub = invoke("checkpoint")
    shown = sub.stdout + sub.stderr
    assert "Usage:" in shown and "info" in shown and "import" in shown


def test_models_json() -> None:
    result = invoke("models", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == list_models()
    assert {row["name"]: row["params_at_10_classes"] for row in rows}["wrn40_2"] == 2_243_546
    assert all(row["description"] == model_spec(row["name"]).description for row in rows)


def _image_folder(root: Path, size: int, per_class: int) -> Path:
    """An ImageFolder of `size`x`size` PNGs, two classes of distinct colours, in train/ and test/."""
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for label, name in enumerate(("red", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 96, (size, size, 3), generator=generator, dtype=torch.uint8)
                pixels[..., 0 if label == 0 else 2] += 150
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def test_teacher_train_records_the_size_and_statistics_of_its_data(tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "data64", size=64, per_class=8)
    out = tmp_path / "tiny64.safetensors"
    result = invoke(
        "teacher",
        "train",
        "--arch",
        "tiny",
        "--data",
        data,
        "--out",
        out,
        "--run",
        tmp_path / "run",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--eval-every",
        "1",
        "--device",
        "cpu",
        "--json",
    )
    assert result.exit_code == 0, result.output
    meta = read_meta(out)
    mean, std = load_split(data, "train").channel_stats()
    assert meta.input_size == 64 and meta.num_classes == 2
    assert meta.class_names == tuple(load_split(data, "train").classes)  # the class folders, in label order
    assert meta.mean == pytest.approx(mean, rel=1e-5) and meta.std == pytest.approx(std, rel=1e-5)
    # Uniform 0..95 everywhere, +150 on channel 0 (red) or 2 (blue) for half the images each.
    assert meta.mean[0] == pytest.approx((47.5 + 75) / 255, abs=0.02) and meta.mean[1] == pytest.approx(
        47.5 / 255, abs=0.02
    )
    teacher = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["teacher"]
    assert teacher["input_size"] == 64 and teacher["mean"] == pytest.approx(list(mean))
    assert teacher["mean"] == list(meta.mean), "trained with exactly the figures the checkpoint records"


def test_teacher_train_writes_checkpoint_ledger_and_manifest(
    tmp_path: Path, cifar_jpeg_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DFKD_PRECISION", "fp32")  # the golden value below is fp32's, on any CPU
    out, run = tmp_path / "ckpt" / "tiny.safetensors", tmp_path / "run"
    result = invoke(
        "teacher",
        "train",
        "--arch",
        "tiny",
        "--data",
        cifar_jpeg_root,
        "--out",
        out,
        "--run",
        run,
        "--epochs",
        "1",
        "--train-subset",
        "500",
        "--batch-size",
        "100",
        "--device",
        "cpu",
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["checkpoint"] == str(out) and summary["run"] == str(run)
    # Seeded golden value (CPU, fp32, torch 2.14.1): one epoch on 500 images leaves the tiny model at chance.
    assert summary["test_acc"] == pytest.approx(10.48)

    digest = sha256_file(out)
    _, meta = load_checkpoint(out, arch="tiny", num_classes=10)
    assert meta.arch == "tiny" and meta.num_classes == 10
    assert meta.test_acc == round(summary["test_acc"], 2)
    train = load_split(cifar_jpeg_root, "train")
    mean, std = train.subset(stratified_subset(train.labels, 500, 0)).channel_stats()
    # Measured on the 500 training images (the checkpoint keeps 6 significant digits), not CIFAR's constants.
    assert meta.mean == pytest.approx(mean, rel=1e-5) and meta.std == pytest.approx(std, rel=1e-5)
    assert meta.mean != CIFAR10_MEAN and meta.input_size == 32
    assert meta.extra["epochs"] == "1" and meta.extra["recipe"] == "dfkd teacher train"
    assert files_under(out.parent) == {"tiny.safetensors"}

    records = read_ledger(run / "carbon.jsonl")
    assert len(records) == 1
    record = records[0]
    assert record["stage"] == "teacher-training" and record["status"] == "complete" and record["error"] is None
    assert record["energy_kwh"]["total"] > 0
    assert record["result"]["checkpoint_sha256"] == digest
    assert record["work"]["images"] == 500 and record["work"]["device"] == "cpu"
    assert record["flops"] > 0
    assert verify_ledger(run / "carbon.jsonl") == []

    manifest = json.loads((run / "manifest.json").read_text())
    teacher = manifest["stages"]["teacher"]
    assert teacher["checkpoint"] == str(out) and teacher["checkpoint_sha256"] == digest
    assert teacher["config"]["arch"] == "tiny" and teacher["config"]["train_subset"] == 500
    assert [entry["epoch"] for entry in teacher["log"]] == [1]
    assert teacher["log"][0]["test_acc"] == summary["test_acc"]
    assert manifest["carbon"]["pue"] == 1.67
    assert files_under(run) == {"carbon.jsonl", "manifest.json", ".lock"}


def test_checkpoint_info(reference_teacher: Path) -> None:
    result = invoke("checkpoint", "info", reference_teacher, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    # JSON types, not strings (issue 12 item 8): numbers are numbers, mean and std lists.
    assert info["arch"] == "wrn40_2" and info["num_classes"] == 10 and info["test_acc"] == 91.20
    assert info["input_size"] == 32 and info["parameters"] == 2_243_546
    assert info["mean"] == [0.4914, 0.4822, 0.4465] and info["std"] == [0.2023, 0.1994, 0.201]
    assert info["sha256"] == sha256_file(reference_teacher) and info["path"] == str(reference_teacher)
    shown = invoke("checkpoint", "info", reference_teacher)
    assert shown.exit_code == 0 and "wrn40_2" in shown.stdout and "91.20" in shown.stdout
    assert sha256_file(reference_teacher) in shown.stdout, "the whole sha256 (soft-wrapped: never cut)"


def test_checkpoint_import(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("tiny", 10)
    src, dst = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, src)
    result = invoke(
        "checkpoint", "import", src, dst, "--arch", "tiny", "--test-acc", "55.5", "--dataset", "toy", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"path": str(dst), "sha256": sha256_file(dst)}
    loaded, meta = load_checkpoint(dst)
    assert (meta.arch, meta.num_classes, meta.dataset, meta.test_acc) == ("tiny", 10, "toy", 55.5)
    assert meta.mean == CIFAR10_MEAN and meta.std == CIFAR10_STD
    for key, value in loaded.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, model.state_dict()[key]), key


def test_evaluate_prints_tables(tmp_path: Path, toy_data: Path) -> None:
    checkpoint = save_tiny_teacher(tmp_path / "tiny3.safetensors", 3)
    result = invoke("evaluate", checkpoint, "--data", toy_data, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "top-1" in result.stdout and "kappa" in result.stdout and "(12 images)" in result.stdout
    assert "per class" in result.stdout and "confusion matrix" in result.stdout
    for name in ("ant", "bee", "cat", "macro"):
        assert name in result.stdout


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    result = invoke("--debug", "evaluate", tmp_path / "missing.safetensors", "--data", tmp_path)
    assert isinstance(result.exception, DfkdError)


# ------------------------------------------------------------------------------------ bad input


@pytest.fixture
def corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(random.Random(0).randbytes(2048))
    return path


@pytest.fixture
def truncated(tmp_path: Path) -> Path:
    data = save_tiny_teacher(tmp_path / "whole.safetensors", 3).read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return path


def teacher_train(tmp_path: Path, data: Path, *extra: str) -> Result:
    return invoke(
        "teacher",
        "train",
        "--data",
        data,
        "--out",
        tmp_path / "out" / "t.safetensors",
        "--run",
        tmp_path / "run",
        "--epochs",
        "1",
        "--device",
        "cpu",
        *extra,
    )


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (("--arch", "resnet9000"), ("unknown model 'resnet9000'", "wrn40_2")),
        (("--arch", "tiny", "--epochs", "0"), ("invalid teacher setting",)),
        (("--arch", "tiny", "--pue", "7"), ("invalid carbon setting", "pue")),
        (("--arch", "tiny", "--country", "Narnia"), ("invalid carbon setting", "country")),
        (("--arch", "tiny", "--device", "tpu"), ("unknown device 'tpu'",)),
    ],
)
def test_teacher_train_bad_settings_leave_nothing(
    tmp_path: Path, toy_data: Path, extra: tuple[str, ...], words: tuple[str, ...]
) -> None:
    assert_user_error(teacher_train(tmp_path, toy_data, *extra), *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_teacher_train_out_must_be_safetensors(tmp_path: Path, toy_data: Path) -> None:
    result = invoke("teacher", "train", "--data", toy_data, "--out", tmp_path / "t.pth", "--run", tmp_path / "run")
    assert_user_error(result, "must end in .safetensors")
    assert not (tmp_path / "t.pth").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["missing", "file", "empty-folder"])
def test_teacher_train_bad_data_path_leaves_nothing(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"
    if kind == "file":
        data.write_bytes(b"not a folder")
    elif kind == "empty-folder":
        data.mkdir()
    words = {
        "missing": "does not exist",
        "file": "is a file, not a folder",
        "empty-folder": "matches no dataset layout",
    }
    assert_user_error(teacher_train(tmp_path, data, "--arch", "tiny"), words[kind])
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_teacher_train_on_lopsided_image_folder(tmp_path: Path, lopsided_data: Path) -> None:
    line = assert_user_error(
        teacher_train(tmp_path, lopsided_data, "--arch", "tiny"), "missing classes", "test lacks ['bee']"
    )
    assert "give both splits the same class folders" in line
    assert not (tmp_path / "out").exists()
    assert not {name for name in files_under(tmp_path / "run") if ".pending" in name or name.endswith(".tmp")}


def test_teacher_train_fewer_images_than_a_batch(tmp_path: Path, toy_data: Path) -> None:
    assert_user_error(
        teacher_train(tmp_path, toy_data, "--arch", "tiny", "--batch-size", "100"), "fewer than one batch"
    )
    assert not (tmp_path / "out").exists()
    # Found inside the metered stage: any record it left says so.
    assert all(r["status"] == "interrupted" for r in read_ledger(tmp_path / "run" / "carbon.jsonl"))


@pytest.mark.parametrize("which", ["corrupt", "truncated"])
def test_damaged_checkpoint(which: str, request: pytest.FixtureRequest, toy_data: Path) -> None:
    path = request.getfixturevalue(which)
    assert_user_error(
        invoke("evaluate", path, "--data", toy_data, "--device", "cpu"), str(path), "corrupt or truncated"
    )
    assert_user_error(invoke("checkpoint", "info", path), str(path), "corrupt or truncated")


@pytest.mark.parametrize(
    ("make", "words"),
    [
        ("missing.safetensors", ("does not exist",)),
        ("model.pth", ("is not a .safetensors file", "dfkd checkpoint import")),
    ],
)
def test_evaluate_and_info_bad_checkpoint_paths(
    tmp_path: Path, toy_data: Path, make: str, words: tuple[str, ...]
) -> None:
    path = tmp_path / make
    if path.suffix == ".pth":
        path.write_bytes(b"x")
    assert_user_error(invoke("evaluate", path, "--data", toy_data), *words)
    assert_user_error(invoke("checkpoint", "info", path), *words)


def test_evaluate_bad_data(tmp_path: Path, toy_data: Path, lopsided_data: Path) -> None:
    ten = save_tiny_teacher(tmp_path / "ten.safetensors", 10)
    three = save_tiny_teacher(tmp_path / "three.safetensors", 3)
    assert_user_error(invoke("evaluate", three, "--data", tmp_path / "nowhere"), "does not exist")
    assert_user_error(invoke("evaluate", three, "--data", lopsided_data, "--device", "cpu"), "missing classes")
    assert_user_error(invoke("evaluate", ten, "--data", toy_data, "--device", "cpu"), "predicts 10 classes", "has 3")


def test_import_wrong_num_classes_writes_nothing(tmp_path: Path) -> None:
    src, dst = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save(create_model("tiny", 10).state_dict(), src)
    assert_user_error(
        invoke("checkpoint", "import", src, dst, "--arch", "tiny", "--num-classes", "100"),
        "wrong shape",
        "fc.weight (10, 16) vs (100, 16)",
    )
    assert_user_error(invoke("checkpoint", "import", src, dst, "--arch", "wrn16_1"), "does not fit the architecture")
    assert files_under(tmp_path) == {"w.pth"}


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (("--arch", "resnet9000"), ("unknown model 'resnet9000'",)),
        (("--arch", "tiny", "--num-classes", "1"), ("num_classes must be at least 2",)),
        (("--arch", "tiny", "--mean", "0.5,0.5"), ("needs 3 finite means",)),
        (("--arch", "tiny", "--std", "a,b,c"), ("malformed metadata",)),
    ],
)
def test_import_bad_options_write_nothing(tmp_path: Path, options: tuple[str, ...], words: tuple[str, ...]) -> None:
    src, dst = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save(create_model("tiny", 10).state_dict(), src)
    assert_user_error(invoke("checkpoint", "import", src, dst, *options), *words)
    assert files_under(tmp_path) == {"w.pth"}


def test_outputs_that_are_folders(tmp_path: Path, toy_data: Path) -> None:
    folder = tmp_path / "taken.safetensors"
    folder.mkdir()
    src = tmp_path / "w.pth"
    torch.save(create_model("tiny", 10).state_dict(), src)
    assert_user_error(invoke("checkpoint", "import", src, folder, "--arch", "tiny"), "cannot write checkpoint")
    result = invoke(
        "teacher", "train", "--data", toy_data, "--out", folder, "--run", tmp_path / "run", "--arch", "tiny"
    )
    assert_user_error(result, "is a folder")
    assert files_under(folder) == set() and not (tmp_path / "run").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"taken.safetensors", "w.pth", "toy"}


def test_import_refuses_pickled_code_and_bad_paths(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "hook": print}, evil)
    assert_user_error(
        invoke("checkpoint", "import", evil, tmp_path / "e.safetensors", "--arch", "tiny"), "weights-only"
    )
    assert_user_error(
        invoke("checkpoint", "import", tmp_path / "none.pth", tmp_path / "n.safetensors", "--arch", "tiny"),
        "does not exist",
    )
    assert_user_error(
        invoke("checkpoint", "import", evil, tmp_path / "e.pt", "--arch", "tiny"), "must end in .safetensors"
    )
    assert files_under(tmp_path) == {"evil.pth"}


def test_cli_conventions_short_help_version_and_plain_flags() -> None:
    """Issue 12: `-h` and `--version`; flags without a `<bool>` placeholder; choices listed in the help."""
    from importlib.metadata import version

    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).stdout.strip() == f"dfkd {version('dfkd')}"
    short, long = runner.invoke(app, ["distill", "-h"]), runner.invoke(app, ["distill", "--help"])
    assert short.exit_code == 0 and short.stdout == long.stdout
    assert "<bool>" not in long.stdout and "<hkd|cmc|dml>" in long.stdout and "<batch|sample>" in long.stdout
    assert "<table|json|markdown|html>" in runner.invoke(app, ["report", "-h"]).stdout
    # The methods are listed as choices (the same as the registry), the teacher default whole, not a path
    # cut at the terminal's edge.
    synthesize = runner.invoke(app, ["synthesize", "-h"], terminal_width=80).stdout
    assert f"<{'|'.join(typing.get_args(Method))}>" in synthesize and set(typing.get_args(Method)) == set(
        list_synthesizers()
    )
    assert "checkpoints/wrn40_2_cifar10.safetensors" in synthesize and str(EMBEDDED_TEACHER_PATH) not in synthesize


def test_report_takes_json_like_every_command(tmp_path: Path) -> None:
    from dfkd.carbon.config import CarbonConfig
    from dfkd.carbon.meter import meter

    run = tmp_path / "run"
    run.mkdir()
    with meter("synthesis", run / "carbon.jsonl", CarbonConfig(grid_g_per_kwh=400.0), "cpu", {"method": "cmi"}):
        pass
    runner = CliRunner()
    by_flag, by_format = (
        runner.invoke(app, ["report", str(run), "--json"]),
        runner.invoke(app, ["report", str(run), "--format", "json"]),
    )
    assert by_flag.exit_code == 0 and json.loads(by_flag.stdout)["runs"][0]["rows"][0]["stage"] == "synthesis"
    assert json.loads(by_flag.stdout)["runs"] == json.loads(by_format.stdout)["runs"]
    both = runner.invoke(app, ["report", str(run), "--json", "--format", "html"])
    assert both.exit_code == 2 and "two formats" in both.stderr


def test_evaluate_shows_a_progress_bar(tmp_path: Path, tiny_teacher: Path) -> None:
    """Issue 12: every loop longer than a few seconds has a progress bar with ETA, evaluation included."""
    from conftest import image_folder

    data = image_folder(tmp_path / "data", 10)
    result = CliRunner().invoke(app, ["evaluate", str(tiny_teacher), "--data", str(data), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "evaluate on 20 test images" in result.stderr and "20/20" in result.stderr


def test_every_option_says_what_it_does() -> None:
    import click
    import typer.main

    def commands(group: click.Command, path: str) -> list[tuple[str, click.Command]]:
        found = [(path, group)]
        for name, sub in getattr(group, "commands", {}).items():
            found += commands(sub, f"{path} {name}")
        return found

    silent = [
        f"{path} {param.opts[0]}"
        for path, command in commands(typer.main.get_command(app), "dfkd")
        for param in command.params
        if isinstance(param, click.Option) and not param.help
    ]
    assert not silent, silent


def test_a_paper_scale_job_on_the_cpu_says_its_cost_and_needs_yes(tmp_path: Path) -> None:
    """The defaults are the paper's (50,000 images, 200 epochs): on a CPU that is days, so the command
    measures a probe, says so, and starts only with --yes (issue 12 item 7); nothing is written."""
    from conftest import cli_fails, image_folder

    run = tmp_path / "paper"
    message = cli_fails("synthesize", "--device", "cpu", "--run", str(run))
    assert "this synthesis would take about" in message and " h " in message and "--yes" in message, message
    assert not run.exists()
    data = image_folder(tmp_path / "data", classes=10, per_class=8)  # 80 images: a million epochs is days too
    message = cli_fails(
        "distill", "--device", "cpu", "--run", str(run), "--data", str(data), "--teacher", str(EMBEDDED_TEACHER_PATH),
        "--epochs", "1000000", "--batch-size", "32",
    )  # fmt: skip
    assert "this distillation would take about" in message and "--yes" in message, message
    assert not (run / "carbon.jsonl").exists()
