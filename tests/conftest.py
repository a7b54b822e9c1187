"""Shared fixtures: the reference checkpoints and the JPEG CIFAR-10 copy from ../shared.

Tests that need them are skipped with a reason when ../shared is absent (CI clones beside it).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dfkd.checkpoints import CheckpointMeta, save_checkpoint
from dfkd.models import create_model
from dfkd.models.zoo import CIFAR10_MEAN, CIFAR10_STD

SHARED = Path(os.environ.get("DFKD_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the shared reference data) is not present")
    return SHARED


@pytest.fixture(scope="session")
def reference_teacher(shared_dir: Path) -> Path:
    """The reference WRN-40-2 trained on the JPEG CIFAR-10 copy (91.18 % fp32 on CPU)."""
    return shared_dir / "reference" / "wrn40_2_cifar10jpeg.safetensors"


@pytest.fixture(scope="session")
def reference_student(shared_dir: Path) -> Path:
    """The reference WRN-16-1 trained on the real images (87.04 % fp32 on CPU)."""
    return shared_dir / "reference" / "wrn16_1_cifar10jpeg.safetensors"


@pytest.fixture(scope="session")
def cifar_jpeg_root(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The JPEG CIFAR-10 copy extracted once per test session: an ImageFolder root with train/ and test/."""
    target = tmp_path_factory.mktemp("cifar10-jpeg")
    # tar(1) unpacks the 60k small files several times faster than Python's tarfile.
    subprocess.run(["tar", "xzf", str(shared_dir / "data" / "cifar10-jpeg.tar.gz"), "-C", str(target)], check=True)
    return target / "cifar10-jpeg"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module: on a shared 2-core machine torch's second thread spin-waits
    against other processes and made the stage tests 10-20x slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_teacher(path: Path, num_classes: int = 10) -> Path:
    """A `tiny` checkpoint whose BN running statistics are not the initial 0 / 1 (something to invert)."""
    torch.manual_seed(0)
    model = create_model("tiny", num_classes).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 3, 32, 32) * 4 - 2)
    save_checkpoint(path, model.eval(), CheckpointMeta("tiny", num_classes, CIFAR10_MEAN, CIFAR10_STD, "test"))
    return path


def cli_fails(*args: str) -> str:
    """Run the CLI quietly (--json: no progress bars on stderr) expecting one `error:` line and exit 2."""
    from typer.testing import CliRunner

    from dfkd.cli import app

    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 2, (result.output, result.exception)
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message and "Traceback" not in result.output, message
    return message


def image_folder(root: Path, classes: int, per_class: int = 2) -> Path:
    """A tiny ImageFolder with train/ and test/ splits of 32x32 solid-colour images, one folder per class."""
    from PIL import Image

    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (40 * c, 10 * i, 90)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny 10-class teacher of the mechanics tests (made once per session)."""
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny.safetensors")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded-data caches go to a per-session temp folder, never the user's ~/.cache."""
    monkeypatch.setenv("DFKD_CACHE", str(tmp_path_factory.getbasetemp() / "dfkd-cache"))


@pytest.fixture(scope="session")
def tiny_recipe_sets(tiny_teacher: Path) -> list[str]:
    """`--set` options that shrink recipes/quickstart.toml to a tiny teacher and student (seconds on CPU)."""
    values = {
        "teacher.checkpoint": str(tiny_teacher),
        "run.device": "cpu",
        "carbon.grid_g_per_kwh": "400",
        "synthesize.method": "cmi",
        "synthesize.settings.lr": "0.001",  # CMI's own (the quickstart sets the fast method's)
        "synthesize.num_images": "48",
        "synthesize.batch_size": "4",
        "synthesize.iterations": "3",
        "synthesize.settings.nz": "16",
        "synthesize.settings.ngf": "8",
        "synthesize.settings.head_dim": "16",
        "synthesize.settings.bank_size": "64",
        "synthesize.settings.num_negatives": "8",
        "distill.student": "tiny",
        "distill.epochs": "3",
        "distill.batch_size": "8",
        "distill.lr": "0.4",
    }
    return [item for key, value in values.items() for item in ("--set", f"{key}={value}")]
