"""Issue 13's recipes for user-provided teachers: runnable as written (here shrunk to CPU size with --set), and
a missing or mismatched teacher refused with the command that imports the right one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import cli_fails, image_folder
from typer.testing import CliRunner

from dfkd.carbon.ledger import verify_ledger
from dfkd.checkpoints import CheckpointMeta, load_checkpoint, save_checkpoint
from dfkd.cli import app
from dfkd.config.recipe import RECIPES_DIR
from dfkd.models import create_model, model_spec

TINY_IMAGENET = RECIPES_DIR / "tiny_imagenet_resnet34-resnet18_fast.toml"
IMAGENET = RECIPES_DIR / "imagenet_resnet50-mobilenet_v3_large_fast.toml"
CPU_SIZED = [
    "run.device=cpu",
    "synthesize.num_images=16",
    "synthesize.batch_size=8",
    "synthesize.iterations=1",
    "synthesize.settings.compile=false",
    "distill.compile=false",
    "distill.batch_size=8",
    "interleave.kd_steps=1",
    "interleave.warmup_rounds=0",
]


def user_teacher(path: Path, arch: str, num_classes: int, size: int) -> Path:
    torch.manual_seed(0)
    model = create_model(arch, num_classes).train()
    with torch.no_grad():
        model(torch.rand(8, 3, size, size))
    spec = model_spec(arch)
    save_checkpoint(path, model.eval(), CheckpointMeta(arch, num_classes, spec.mean, spec.std, "toy", size))
    return path


def sets(*items: str) -> list[str]:
    return [part for item in items for part in ("--set", item)]


def test_a_missing_user_teacher_is_refused_with_the_import_command(tmp_path: Path) -> None:
    run = tmp_path / "run"
    message = cli_fails(
        "run", str(IMAGENET), "--run", str(run), *sets(f"teacher.checkpoint={tmp_path / 'no.safetensors'}")
    )
    assert "does not exist: make it from your weights with `dfkd checkpoint import YOUR_WEIGHTS.pth" in message
    assert "--arch torchvision:resnet50 --num-classes 1000 --input-size 224`" in message
    message = cli_fails("validate", str(TINY_IMAGENET))
    assert "--arch torchvision:resnet34 --num-classes 200 --input-size 64" in message
    assert not run.exists()


def test_a_teacher_that_is_not_what_the_recipe_expects_is_refused(tmp_path: Path) -> None:
    teacher = user_teacher(tmp_path / "r18.safetensors", "torchvision:resnet18", 200, 64)
    run = tmp_path / "run"
    message = cli_fails("run", str(TINY_IMAGENET), "--run", str(run), *sets(f"teacher.checkpoint={teacher}"))
    assert "holds arch torchvision:resnet18 (the recipe expects torchvision:resnet34)" in message
    assert not run.exists()


@pytest.mark.slow
def test_the_tiny_imagenet_recipe_runs_as_written_at_cpu_size(tmp_path: Path) -> None:
    teacher = user_teacher(tmp_path / "r34.safetensors", "torchvision:resnet34", 200, 64)
    run = tmp_path / "run"
    args = ["run", str(TINY_IMAGENET), "--run", str(run), *sets(f"teacher.checkpoint={teacher}", *CPU_SIZED)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout)["mode"] == "interleaved"
    _, meta = load_checkpoint(run / "student" / "student.safetensors")
    assert (meta.arch, meta.num_classes, meta.input_size) == ("torchvision:resnet18", 200, 64)
    assert verify_ledger(run / "carbon.jsonl") == []


def test_data_whose_classes_are_not_the_teachers_is_refused_before_the_run_starts(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    quickstart = RECIPES_DIR / "quickstart.toml"
    run = tmp_path / "run"
    three = image_folder(tmp_path / "three", classes=3)
    message = cli_fails(
        "run", str(quickstart), "--run", str(run), *sets(f"teacher.checkpoint={tiny_teacher}", f"evaluate.data={three}")
    )
    assert "predicts 10 classes but imagefolder" in message and "has 3" in message
    _, meta = load_checkpoint(tiny_teacher)
    named = tmp_path / "named.safetensors"
    names = ("class0", "dog", "class2")
    save_checkpoint(named, create_model("tiny", 3), dataclasses.replace(meta, num_classes=3, class_names=names))
    message = cli_fails(
        "run", str(quickstart), "--run", str(run), *sets(f"teacher.checkpoint={named}", f"evaluate.data={three}")
    )
    assert "calls class 1 'dog' but imagefolder" in message and "calls it 'class1'" in message
    assert not run.exists()
