"""Stage 1 end to end: `dfkd synthesize` through the CLI (in process, and once as a killed subprocess).

The tiny model covers the mechanics (files, hashes, resume, errors) in well under a second per run;
the reference WRN-40-2 covers behaviour (the stage's quality figure on a few dozen steps).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import dfkd.models.registry
from dfkd.carbon.ledger import read_ledger, verify_ledger
from dfkd.checkpoints import CheckpointMeta, save_checkpoint
from dfkd.cli import app
from dfkd.files import sha256_file
from dfkd.models import ModelSpec
from dfkd.models.zoo import CIFAR10_MEAN, CIFAR10_STD

# Small CMI settings: the published generator, head and bank are far larger than a tiny teacher needs.
CMI_FAST = [
    "--set",
    "nz=16",
    "--set",
    "ngf=8",
    "--set",
    "head_dim=16",
    "--set",
    "bank_size=64",
    "--set",
    "num_negatives=8",
]
COMMON = ["--device", "cpu", "--grid-intensity", "400", "--json"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthesize(run: Path, teacher: Path, *args: str) -> dict:
    """Run `dfkd synthesize` in process; returns its --json summary (the command must succeed)."""
    result = CliRunner().invoke(app, ["synthesize", "--teacher", str(teacher), "--run", str(run), *COMMON, *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def synthesize_fails(run: Path, teacher: Path, *args: str) -> str:
    """Run `dfkd synthesize` expecting a user error: exit 2 and one line on stderr, which is returned."""
    result = CliRunner().invoke(app, ["synthesize", "--teacher", str(teacher), "--run", str(run), *COMMON, *args])
    assert result.exit_code == 2, (result.output, result.exception)
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message and "Traceback" not in result.output, message
    return message


def shards(run: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(p) for p in sorted((run / "synthetic").glob("shard-*.safetensors"))]


def assert_same_shards(run: Path, reference: Path) -> None:
    ours, theirs = shards(run), shards(reference)
    assert len(ours) == len(theirs)
    for index, (a, b) in enumerate(zip(ours, theirs)):
        for key in ("images", "targets", "logits", "losses"):
            assert torch.equal(a[key], b[key]), f"shard {index} {key} differs from the uninterrupted run"


def assert_manifest_matches_files(run: Path) -> dict:
    """Every artifact's recorded sha256 is its file's, and every synthetic file is recorded."""
    manifest = json.loads((run / "manifest.json").read_text())
    for relative, entry in manifest["artifacts"].items():
        assert sha256_file(run / relative) == entry["sha256"], relative
        assert (run / relative).stat().st_size == entry["bytes"], relative
    on_disk = {f"synthetic/{p.name}" for p in (run / "synthetic").iterdir()}
    assert on_disk == {k for k in manifest["artifacts"] if k.startswith("synthetic/")}
    return manifest


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF  # inside the tensor data, so the file still parses: only the hash can tell
    path.write_bytes(bytes(data))


# --- what a run writes ------------------------------------------------------------------------------


def test_stage_writes_shards_preview_state_manifest_and_one_ledger_record(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DFKD_PRECISION", "fp32")  # the golden values below are fp32's, on any CPU
    run = tmp_path / "run"
    summary = synthesize(
        run, tiny_teacher, "--method", "cmi", "--num-images", "20", "--batch-size", "8", "--iterations", "3", *CMI_FAST
    )

    files = sorted(p.name for p in (run / "synthetic").iterdir())
    assert files == [
        "preview.png",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
        "state-00002.safetensors",
    ]
    manifest = assert_manifest_matches_files(run)
    roles = {k: v["role"] for k, v in manifest["artifacts"].items()}
    assert roles["synthetic/preview.png"] == "preview" and roles["synthetic/state-00002.safetensors"] == "state"
    stage = manifest["stages"]["synthesis"]
    assert stage["shards"] == 3 and stage["images"] == 20 and stage["method_config"]["iterations"] == 3

    parts = shards(run)
    assert [len(p["images"]) for p in parts] == [8, 8, 4]
    for index, part in enumerate(parts):
        assert part["images"].dtype == torch.uint8 and part["images"].shape[1:] == (3, 32, 32)
        n = len(part["images"])
        assert part["targets"].dtype == torch.int64 and part["targets"].shape == (n,)
        assert part["logits"].dtype == torch.float32 and part["logits"].shape == (n, 10)
        assert part["losses"].shape == (n,) and torch.isfinite(part["losses"]).all()
        with safe_open(str(run / "synthetic" / f"shard-{index:05d}.safetensors"), framework="pt") as f:
            meta = f.metadata()
        assert meta["method"] == "cmi" and meta["config_hash"] == stage["config_hash"]
        assert meta["teacher_sha256"] == sha256_file(tiny_teacher) == stage["teacher"]["sha256"]
        assert (meta["index"], meta["count"]) == (str(index), str(n))
    targets = torch.cat([p["targets"] for p in parts])
    assert torch.equal(targets, torch.arange(20) % 10), "balanced round-robin targets across batches"

    with Image.open(run / "synthetic" / "preview.png") as preview:
        assert preview.format == "PNG" and preview.size == (10 * 33 + 1, 10 * 33 + 1)  # 10 classes x 10 per class

    (record,) = read_ledger(run / "carbon.jsonl")
    assert verify_ledger(run / "carbon.jsonl") == []
    assert (record["stage"], record["status"], record["error"]) == ("synthesis", "complete", None)
    assert record["info"]["resumed_after_shard"] == 0
    assert record["info"]["precision"] == stage["precision"] == "fp32"
    quality = record["result"]["quality"]
    assert quality == stage["quality"] == summary["quality"]
    assert quality["images"] == 20 and quality["target_histogram"] == [2] * 10 and sum(quality["class_histogram"]) == 20
    # Seeded golden values (CPU, fp32, torch 2.14.1): 3 steps on a tiny teacher reach chance-level agreement.
    assert quality["target_agreement"] == pytest.approx(10.0)
    assert quality["diversity_mean_cosine"] == pytest.approx(0.8003222942352295, rel=1e-5)
    assert record["work"]["images_made"] == 20 and record["work"]["image_steps"] == 60
    assert record["flops"] > 0 and "image-step" in record["flops_method"]


# --- resume -----------------------------------------------------------------------------------------

KILLABLE = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    import synthesizers.cmi as cmi
    original = cmi.CMI.synthesize
    def slow(self, *args, **kwargs):
        time.sleep(0.4)  # gives the test time to kill the process between shards
        return original(self, *args, **kwargs)
    cmi.CMI.synthesize = slow
    from dfkd.cli import app
    app(sys.argv[1:], prog_name="dfkd")
    """
)


def counted_shards(run: Path) -> int:
    """How many leading shards the manifest records (what a resume would continue after)."""
    try:
        artifacts = json.loads((run / "manifest.json").read_text())["artifacts"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    count = 0
    while f"synthetic/shard-{count:05d}.safetensors" in artifacts:
        count += 1
    return count


@pytest.mark.slow
def test_cmi_run_killed_between_shards_resumes_without_losing_or_duplicating_images(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    args = ["--method", "cmi", "--num-images", "30", "--batch-size", "4", "--iterations", "3", "--seed", "7", *CMI_FAST]
    reference = tmp_path / "reference"
    synthesize(reference, tiny_teacher, *args)

    run = tmp_path / "killed"
    command = [
        sys.executable,
        "-c",
        KILLABLE,
        "synthesize",
        "--teacher",
        str(tiny_teacher),
        "--run",
        str(run),
        *COMMON,
        *args,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while counted_shards(run) < 2:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline, "the subprocess made no 2 shards in time"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = counted_shards(run)
    assert 2 <= done < 8
    # A kill between renaming a shard into place and recording it leaves a shard without a manifest entry.
    (run / "synthetic" / f"shard-{done:05d}.safetensors").write_bytes(b"half a shard")

    summary = synthesize(run, tiny_teacher, *args)
    assert summary["work"]["images_made"] == 30 - 4 * done
    assert summary["work"]["images_total"] == summary["quality"]["images"] == 30
    assert summary["shards"] == 8
    assert_same_shards(run, reference)
    assert_manifest_matches_files(run)

    killed, resumed = read_ledger(run / "carbon.jsonl")
    assert (killed["stage"], killed["status"]) == ("synthesis", "interrupted")
    assert killed["error"].startswith("process killed")
    assert (resumed["status"], resumed["info"]["resumed_after_shard"]) == ("complete", done)
    assert verify_ledger(run / "carbon.jsonl") == []


def test_deepinversion_interrupted_then_corrupted_shard_is_remade(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--method", "deepinversion", "--num-images", "24", "--batch-size", "8", "--iterations", "3"]
    reference = tmp_path / "reference"
    synthesize(reference, tiny_teacher, *args)

    import synthesizers.deepinversion as di

    original, calls = di.DeepInversion.synthesize, []

    def interrupted_on_third_batch(self: di.DeepInversion, targets: torch.Tensor, *a: object, **k: object) -> object:
        if len(targets) == 8:  # a batch of the run, not the 2-image FLOPs probe that precedes the stage
            calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, targets, *a, **k)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(di.DeepInversion, "synthesize", interrupted_on_third_batch)
        result = CliRunner().invoke(
            app, ["synthesize", "--teacher", str(tiny_teacher), "--run", str(run), *COMMON, *args]
        )
    assert result.exit_code != 0 and counted_shards(run) == 2

    summary = synthesize(run, tiny_teacher, *args)
    assert summary["work"]["images_made"] == 8 and summary["quality"]["images"] == 24
    assert_same_shards(run, reference)

    # A flipped byte in a shard before the last: DeepInversion keeps no state across batches, so that
    # shard and the ones after it are made again, identical to the first time.
    flip_byte(run / "synthetic" / "shard-00001.safetensors")
    summary = synthesize(run, tiny_teacher, *args)
    assert summary["work"]["images_made"] == 16 and summary["quality"]["images"] == 24
    assert_same_shards(run, reference)
    assert_manifest_matches_files(run)

    records = read_ledger(run / "carbon.jsonl")
    assert [r["status"] for r in records] == ["interrupted", "complete", "complete"]
    assert records[0]["error"] == "KeyboardInterrupt"
    assert [r["info"]["resumed_after_shard"] for r in records] == [0, 2, 1]
    assert verify_ledger(run / "carbon.jsonl") == []


def test_cmi_damaged_shard_before_the_last_is_a_clear_error_that_deletes_nothing(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    run = tmp_path / "run"
    args = ["--method", "cmi", "--num-images", "12", "--batch-size", "4", "--iterations", "2", *CMI_FAST]
    synthesize(run, tiny_teacher, *args)
    flip_byte(run / "synthetic" / "shard-00001.safetensors")
    before = {p.name: p.read_bytes() for p in (run / "synthetic").iterdir()}

    message = synthesize_fails(run, tiny_teacher, *args)
    assert "cmi cannot continue after shard 0" in message and "--overwrite" in message
    assert {p.name: p.read_bytes() for p in (run / "synthetic").iterdir()} == before
    assert len(read_ledger(run / "carbon.jsonl")) == 1, "refused before any stage was metered"

    summary = synthesize(run, tiny_teacher, *args, "--overwrite")
    assert summary["work"]["images_made"] == 12
    assert_manifest_matches_files(run)


def test_changing_num_images_keeps_the_image_count_exact(tmp_path: Path, tiny_teacher: Path) -> None:
    args = ["--method", "deepinversion", "--batch-size", "8", "--iterations", "2"]
    reference = tmp_path / "reference"
    synthesize(reference, tiny_teacher, *args, "--num-images", "40")

    run = tmp_path / "run"
    synthesize(run, tiny_teacher, *args, "--num-images", "20")  # its last shard holds 4 images, not 8
    summary = synthesize(run, tiny_teacher, *args, "--num-images", "40")
    assert summary["quality"]["images"] == 40 and summary["work"]["images_made"] == 24
    assert_same_shards(run, reference)

    summary = synthesize(run, tiny_teacher, *args, "--num-images", "12")
    assert summary["quality"]["images"] == 12 and summary["shards"] == 2
    assert [len(p["images"]) for p in shards(run)] == [8, 4]
    assert_manifest_matches_files(run)


def test_other_settings_need_overwrite_which_starts_over(tmp_path: Path, tiny_teacher: Path) -> None:
    run = tmp_path / "run"
    args = ["--method", "deepinversion", "--num-images", "8", "--batch-size", "8", "--iterations", "2"]
    synthesize(run, tiny_teacher, *args, "--seed", "0")
    first = (run / "synthetic" / "shard-00000.safetensors").read_bytes()
    hash_before = json.loads((run / "manifest.json").read_text())["stages"]["synthesis"]["config_hash"]

    for other in (["--seed", "1"], ["--set", "tv_weight=0.01"], ["--method", "cmi"]):
        message = synthesize_fails(run, tiny_teacher, *args, *other)
        assert "other settings" in message and "--overwrite" in message
    assert (run / "synthetic" / "shard-00000.safetensors").read_bytes() == first

    summary = synthesize(run, tiny_teacher, *args, "--seed", "1", "--overwrite")
    assert summary["work"]["images_made"] == 8
    stage = json.loads((run / "manifest.json").read_text())["stages"]["synthesis"]
    assert stage["config"]["seed"] == 1 and stage["config_hash"] != hash_before
    assert (run / "synthetic" / "shard-00000.safetensors").read_bytes() != first
    assert_manifest_matches_files(run)
    assert [r["status"] for r in read_ledger(run / "carbon.jsonl")] == ["complete", "complete"]


# --- user errors -----------------------------------------------------------------------------------


def test_unknown_method_lists_the_choices(tmp_path: Path, tiny_teacher: Path) -> None:
    """The method is a choice of the command line: `dfkd` itself answers in one line, before any work."""
    import subprocess
    import sys

    args = ["synthesize", "--method", "nayer", "--teacher", str(tiny_teacher), "--run", str(tmp_path / "run")]
    result = subprocess.run([sys.executable, "-m", "dfkd", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == "", result
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "'nayer' is not one of 'cmi', 'deepinversion', 'fast'" in line, line
    assert not (tmp_path / "run").exists(), "validated before the run dir is made"


def test_unknown_setting_lists_the_valid_keys(tmp_path: Path, tiny_teacher: Path) -> None:
    message = synthesize_fails(tmp_path / "run", tiny_teacher, "--method", "deepinversion", "--set", "momentum=0.9")
    assert "'momentum'" in message and "bn_weight" in message and "tv_weight" in message
    message = synthesize_fails(tmp_path / "run", tiny_teacher, "--method", "cmi", "--set", "bank=3")
    assert "'bank'" in message and "bank_size" in message and "num_negatives" in message


def test_zero_images(tmp_path: Path, tiny_teacher: Path) -> None:
    message = synthesize_fails(tmp_path / "run", tiny_teacher, "--num-images", "0")
    assert "num_images must be at least 1" in message


class NoBatchNorm(nn.Module):
    """A classifier with the registry's interface and no BatchNorm layer."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def test_teacher_without_batchnorm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No registered architecture lacks BN, so the test registers one: the checkpoint is then a real
    # file that goes through the same loading and checking as any teacher.
    spec = ModelSpec("nobn", NoBatchNorm, "test model without BN", 32, CIFAR10_MEAN, CIFAR10_STD)
    monkeypatch.setitem(dfkd.models.registry._REGISTRY, "nobn", spec)
    teacher = tmp_path / "nobn.safetensors"
    save_checkpoint(teacher, NoBatchNorm(10), CheckpointMeta("nobn", 10, CIFAR10_MEAN, CIFAR10_STD, "test"))
    for method in ("cmi", "deepinversion"):
        message = synthesize_fails(tmp_path / "run", teacher, "--method", method)
        assert "has no BatchNorm layers" in message and "use a teacher with BatchNorm" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only folder")
def test_unwritable_run_dir(tmp_path: Path, tiny_teacher: Path) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        message = synthesize_fails(parent / "run", tiny_teacher, "--num-images", "4")
        assert "cannot create run dir" in message and "writable --run" in message
    finally:
        parent.chmod(0o700)


def test_run_dir_that_cannot_be_made(tmp_path: Path, tiny_teacher: Path) -> None:
    """The same error when even root cannot make the folder: its parent is a file."""
    parent = tmp_path / "a-file"
    parent.write_text("not a folder")
    message = synthesize_fails(parent / "run", tiny_teacher, "--num-images", "4")
    assert "cannot create run dir" in message and "Not a directory" in message and "writable --run" in message


# --- behaviour with the reference teacher ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "iterations", "settings"),
    [
        # At the published BN weight of 10 the prior dominates DeepInversion's first few dozen steps;
        # weight 1 lets cross-entropy show within a short run.
        ("deepinversion", "20", ["--set", "bn_weight=1"]),
        ("cmi", "10", []),
    ],
)
def test_quality_figure_shows_the_teacher_recognises_the_targets(
    tmp_path: Path, reference_teacher: Path, method: str, iterations: str, settings: list[str]
) -> None:
    run = tmp_path / "run"
    summary = synthesize(
        run,
        reference_teacher,
        "--method",
        method,
        "--num-images",
        "12",
        "--batch-size",
        "12",
        "--iterations",
        iterations,
        *settings,
    )
    quality = summary["quality"]
    assert quality["images"] == 12 and quality["target_histogram"] == [2, 2] + [1] * 8
    assert quality["target_agreement"] >= 50, quality  # chance is 10 %
    assert quality["mean_confidence"] > 0.5, quality
    # The figure is the teacher's own judgement of the stored uint8 images.
    data = shards(run)[0]
    assert (data["logits"].argmax(1) == data["targets"]).float().mean() * 100 >= 50


def test_method_settings_take_the_recipe_spelling_and_compile_has_its_flag(tmp_path: Path, tiny_teacher: Path) -> None:
    """`--set nz=16`, `--set settings.nz=16` and `--set synthesize.settings.nz=16` are one setting; `--compile`
    is the method setting compile=true (issue 12 item 7)."""
    run = tmp_path / "run"
    spelled = ["--set", "synthesize.settings.nz=16", "--set", "settings.ngf=8", *CMI_FAST[4:]]
    synthesize(run, tiny_teacher, "--method", "cmi", "--num-images", "4", "--batch-size", "4", "--iterations", "1",
               "--compile", *spelled)  # fmt: skip
    method_config = json.loads((run / "manifest.json").read_text())["stages"]["synthesis"]["method_config"]
    assert (method_config["nz"], method_config["ngf"], method_config["compile"]) == (16, 8, True)
