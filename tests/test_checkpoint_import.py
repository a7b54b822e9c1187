"""`dfkd checkpoint import` of another tool's weights (issue 13): a torchvision `.pth` or a `.safetensors`,
class names recorded and checked against the data, and every bad input refused in one line with nothing
written (the library side of `.pth` reading: tests/test_checkpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from conftest import cli_fails, image_folder
from safetensors.torch import save_file
from typer.testing import CliRunner

from dfkd.checkpoints import CheckpointMeta, as_recorded, load_checkpoint
from dfkd.cli import app
from dfkd.data import ImageSet
from dfkd.errors import DfkdError
from dfkd.models import model_spec
from dfkd.models.zoo import CIFAR10_MEAN, CIFAR10_STD
from dfkd.report.html import class_names
from dfkd.stages.evaluate import check_classes

NAMES = ("tench", "goldfish", "great white shark", "tiger shark", "hammerhead")


class NotWeights:
    """Pickled into a `.pth`: weights_only must refuse an arbitrary object."""


def resnet18(num_classes: int = 5) -> torch.nn.Module:
    """torchvision's own resnet18 with BN running statistics that are not the initial 0 / 1."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    return resnet18()


@pytest.fixture
def pth(tmp_path: Path, source: torch.nn.Module) -> Path:
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    return path


def import_ok(*args: str | Path) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["checkpoint", "import", *map(str, args), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def import_fails(*args: str | Path) -> str:
    return cli_fails("checkpoint", "import", *map(str, args))


def files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def assert_same_logits(path: Path, source: torch.nn.Module, size: int = 64) -> None:
    loaded, _ = load_checkpoint(path)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


# ------------------------------------------------------------------------------------ imports that work


@pytest.mark.parametrize("form", ["bare", "wrapped"])
def test_torchvision_pth_imports_and_gives_the_same_logits(tmp_path: Path, source: torch.nn.Module, form: str) -> None:
    state = source.state_dict()
    if form == "wrapped":  # a training script's checkpoint of an nn.DataParallel model
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}
    src, dst = tmp_path / "resnet18.pth", tmp_path / "out" / "resnet18.safetensors"  # a new folder is made
    torch.save(state, src)
    shown = import_ok(src, dst, "--arch", "torchvision:resnet18", "--num-classes", "5", "--dataset", "fish")
    assert shown["path"] == str(dst)
    meta = load_checkpoint(dst)[1]
    spec = model_spec("torchvision:resnet18")
    assert (meta.arch, meta.num_classes, meta.dataset, meta.input_size) == ("torchvision:resnet18", 5, "fish", 224)
    assert meta.mean == as_recorded(spec.mean) and meta.std == as_recorded(spec.std), "the arch's own stats"
    assert meta.class_names is None
    assert_same_logits(dst, source)


def test_options_recorded_and_class_names_read_back(tmp_path: Path, pth: Path, source: torch.nn.Module) -> None:
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"  {name} " for name in NAMES[:2]) + "\n\n" + "\n".join(NAMES[2:]) + "\n\n")
    dst = tmp_path / "named.safetensors"
    import_ok(
        pth, dst, "--arch", "torchvision:resnet18", "--num-classes", "5", "--input-size", "64",
        "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--class-names", names, "--test-acc", "71.5",
    )  # fmt: skip
    meta = load_checkpoint(dst)[1]
    assert meta.class_names == NAMES
    assert (meta.input_size, meta.mean, meta.std, meta.test_acc) == (64, (0.5,) * 3, (0.25,) * 3, 71.5)
    info = CliRunner().invoke(app, ["checkpoint", "info", str(dst), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["class_names"] == list(NAMES)
    assert_same_logits(dst, source)


def test_builtin_arch_keeps_cifar10_stats(tmp_path: Path) -> None:
    from dfkd.models import create_model

    src, dst = tmp_path / "wrn.pth", tmp_path / "wrn.safetensors"
    torch.save(create_model("wrn16_1", 10).state_dict(), src)
    import_ok(src, dst, "--arch", "wrn16_1")
    meta = load_checkpoint(dst)[1]
    assert (meta.mean, meta.std, meta.input_size, meta.dataset) == (CIFAR10_MEAN, CIFAR10_STD, 32, "cifar10")


def test_safetensors_source_whose_own_metadata_is_ignored(tmp_path: Path, source: torch.nn.Module) -> None:
    src, dst = tmp_path / "hub.safetensors", tmp_path / "dfkd.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(src), metadata={"format": "pt"})
    import_ok(src, dst, "--arch", "torchvision:resnet18", "--num-classes", "5", "--input-size", "64")
    meta = load_checkpoint(dst)[1]
    assert meta.extra == {} and meta.input_size == 64
    assert_same_logits(dst, source)


# ------------------------------------------------------------------------------------ bad input: one line, no file


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (
            ("--num-classes", "7"),
            "the weights predict 5 classes, not 7: pass --num-classes 5 (the head has the wrong shape, file vs "
            "model: fc.weight (5, 512) vs (7, 512), fc.bias (5,) vs (7,))",
        ),
        (("--arch", "torchvision:resnet34"), "does not fit the architecture: missing keys ['layer1.2.bn1.bias', "),
        (("--arch", "wrn16_1", "--num-classes", "5"), "unexpected keys ['layer1.0.bn1.bias', "),
        (("--arch", "torchvision:resnet9000"), "unknown torchvision model 'resnet9000'"),
        (("--input-size", "0"), "torchvision:resnet18 cannot classify 0x0 images ("),
        (("--mean", "0.5,0.5"), "needs 3 finite means and 3 positive finite stds"),
    ],
    ids=["num-classes", "arch-missing-keys", "arch-other-keys", "unknown-arch", "input-size", "mean"],
)
def test_weights_that_do_not_fit(tmp_path: Path, pth: Path, options: tuple[str, ...], words: str) -> None:
    args = {"--arch": "torchvision:resnet18", "--num-classes": "5"} | dict(zip(options[::2], options[1::2]))
    message = import_fails(pth, tmp_path / "out.safetensors", *(item for pair in args.items() for item in pair))
    assert words in message, message
    assert files(tmp_path) == {"resnet18.pth"}


def test_input_size_too_small_for_the_architecture(tmp_path: Path) -> None:
    src = tmp_path / "squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_0(num_classes=3).state_dict(), src)
    args = ("--arch", "torchvision:squeezenet1_0", "--num-classes", "3", "--input-size", "16")
    message = import_fails(src, tmp_path / "s.safetensors", *args)
    assert "torchvision:squeezenet1_0 cannot classify 16x16 images (" in message
    assert message.endswith("pass the --input-size the weights were trained at")
    assert files(tmp_path) == {"squeezenet.pth"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("\n".join(NAMES[:4]), "names.txt: 4 class names for 5 classes: give one distinct name per class"),
        ("\n".join((*NAMES[:4], NAMES[0])), "class names repeat: tench"),
    ],
    ids=["count", "repeated"],
)
def test_bad_class_names_file(tmp_path: Path, pth: Path, text: str, words: str) -> None:
    (tmp_path / "names.txt").write_text(text)
    args = ("--arch", "torchvision:resnet18", "--num-classes", "5", "--class-names", tmp_path / "names.txt")
    assert words in import_fails(pth, tmp_path / "out.safetensors", *args)
    assert "cannot read class names" in import_fails(
        pth, tmp_path / "out.safetensors", *args[:-1], tmp_path / "absent.txt"
    )
    assert files(tmp_path) == {"resnet18.pth", "names.txt"}


def test_pickles_and_paths_that_are_refused(tmp_path: Path, pth: Path) -> None:
    arch = ("--arch", "torchvision:resnet18", "--num-classes", "5")
    posing = tmp_path / "posing.pth"
    torch.save(NotWeights(), posing)
    assert "is not a weights-only PyTorch file" in import_fails(posing, tmp_path / "a.safetensors", *arch)
    (tmp_path / "nothing.pth").write_bytes(b"")
    assert "is not a weights-only PyTorch file" in import_fails(
        tmp_path / "nothing.pth", tmp_path / "b.safetensors", *arch
    )
    other = tmp_path / "weights.bin"
    other.write_bytes(pth.read_bytes())
    assert "is neither a .pth/.pt nor a .safetensors file" in import_fails(other, tmp_path / "c.safetensors", *arch)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10" * 64)
    assert "is corrupt or truncated" in import_fails(corrupt, tmp_path / "d.safetensors", *arch)
    assert "is the source file itself" in import_fails(corrupt, corrupt, *arch)
    folder = tmp_path / "taken.safetensors"
    folder.mkdir()
    assert "cannot write checkpoint" in import_fails(pth, folder, *arch)
    assert "must end in .safetensors" in import_fails(pth, tmp_path / "e.pt", *arch)
    sources = {"resnet18.pth", "posing.pth", "nothing.pth", "weights.bin", "corrupt.safetensors"}
    assert files(tmp_path) == sources | {"taken.safetensors"}


# ------------------------------------------------------------------------------------ class names meet data


def named_meta(names: tuple[str, ...] | None) -> CheckpointMeta:
    return CheckpointMeta("tiny", 3, CIFAR10_MEAN, CIFAR10_STD, "toy", class_names=names)


def test_check_classes_compares_names_in_label_order() -> None:
    data = ImageSet(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.arange(3), ["ant", "bee", "cat"], "toy (test)")
    check_classes(data, named_meta(("ant", "bee", "cat")), "t.safetensors")
    check_classes(data, named_meta(None), "t.safetensors")
    with pytest.raises(DfkdError, match="t.safetensors calls class 1 'cat' but toy \\(test\\) calls it 'bee': use"):
        check_classes(data, named_meta(("ant", "cat", "bee")), "t.safetensors")
    with pytest.raises(DfkdError, match="predicts 4 classes but toy \\(test\\) has 3"):
        check_classes(data, CheckpointMeta("tiny", 4, CIFAR10_MEAN, CIFAR10_STD, "toy"), "t.safetensors")


def test_evaluate_refuses_data_whose_class_names_differ(tmp_path: Path) -> None:
    from dfkd.models import create_model

    src, dst = tmp_path / "tiny.pth", tmp_path / "tiny.safetensors"
    torch.save(create_model("tiny", 3).state_dict(), src)
    (tmp_path / "names.txt").write_text("class0\nclass2\nclass1\n")
    import_ok(src, dst, "--arch", "tiny", "--num-classes", "3", "--class-names", tmp_path / "names.txt")
    data = image_folder(tmp_path / "data", 3)
    message = cli_fails("evaluate", str(dst), "--data", str(data), "--device", "cpu")
    assert "calls class 1 'class2'" in message and "calls it 'class1'" in message


def test_preview_rows_are_labelled_with_the_teachers_class_names() -> None:
    teacher = {"num_classes": 3, "dataset": "cifar10", "class_names": ["ant", "bee", "cat"]}
    assert class_names({"config": {"stages": {"synthesis": {"teacher": teacher}}}}) == ["ant", "bee", "cat"]
