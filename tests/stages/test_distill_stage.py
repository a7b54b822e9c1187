"""Stage 2 end to end: `dfkd distill` through the CLI in process (and the library where the CLI has no option).

Tiny teacher and tiny student for the mechanics (τ logging, resume, grid, errors); the reference
WRN-40-2 for behaviour and for the real-data baseline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import image_folder, save_tiny_teacher
from safetensors.torch import load_file
from typer.testing import CliRunner

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.ledger import read_ledger, verify_ledger
from dfkd.checkpoints import load_checkpoint, read_meta
from dfkd.cli import app
from dfkd.config.distill import DistillConfig
from dfkd.config.synthesis import SynthesisConfig
from dfkd.files import sha256_file
from dfkd.metrics import top1_agreement
from dfkd.models import create_model
from dfkd.rundir import RunDir
from dfkd.stages.distill import prepare_distill, run_distillation
from dfkd.stages.evaluate import predict_logits
from dfkd.stages.runner import run_metered
from dfkd.stages.synthesis import prepare_run_dir, prepare_synthesis, synthesize_stage

COMMON = ["--device", "cpu", "--grid-intensity", "400", "--json"]
# 64 synthetic images: 6 held out, 58 to train on, 3 batches of 16 per epoch.
TINY = ["--student", "tiny", "--batch-size", "16", "--lr", "0.4"]
STEPS_PER_EPOCH = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_synthetic(
    run: RunDir, teacher: Path, method: str, num_images: int, batch_size: int, iterations: int, **settings: str
) -> dict[str, Any]:
    """Stage 1 through the library, unmetered: shards in `run`; returns the quality figures."""
    config = SynthesisConfig(
        method=method,
        teacher=str(teacher),
        num_images=num_images,
        batch_size=batch_size,
        device="cpu",
        method_settings=settings,
    )
    prepared = prepare_synthesis(config, iterations)
    report = synthesize_stage(prepared, run, prepare_run_dir(run, prepared, overwrite=False), show_progress=False)
    return report.result["quality"]


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    """A run dir holding 64 synthetic images of the tiny teacher (DeepInversion, 2 steps: mechanics only)."""
    root = tmp_path_factory.mktemp("synthetic") / "run"
    make_synthetic(RunDir.open(root), tiny_teacher, "deepinversion", 64, 32, 2)
    return root


@pytest.fixture
def run(tmp_path: Path, tiny_synthetic: Path) -> Path:
    """A private copy of the synthetic run dir for one test to distil into."""
    return Path(shutil.copytree(tiny_synthetic, tmp_path / "run"))


def distill(run: Path, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["distill", "--run", str(run), *COMMON, *TINY, *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def distill_fails(run: Path, *args: str) -> str:
    """Run `dfkd distill` expecting a user error: exit 2, one line on stderr (returned)."""
    result = CliRunner().invoke(app, ["distill", "--run", str(run), *COMMON, *TINY, *args])
    assert result.exit_code == 2, (result.output, result.exception)
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message and "Traceback" not in result.output, message
    return message


def metrics(run: Path, trial: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "student" / trial / "metrics.jsonl").read_text().splitlines()]


# --- temperature ----------------------------------------------------------------------------------


def test_stochastic_tau_is_drawn_per_batch_within_range_and_logged(run: Path, tiny_teacher: Path) -> None:
    summary = distill(run, "--epochs", "3")
    log = metrics(run, "tau=stochastic")
    assert [e["epoch"] for e in log] == [1, 2, 3]
    for entry in log:
        tau = entry["tau"]
        assert tau["bins"] == [2.0, 20.0, 18] and tau["count"] == STEPS_PER_EPOCH
        assert sum(tau["histogram"]) == tau["count"], "every draw falls inside [2, 20]"
        assert 2.0 <= tau["min"] < tau["max"] <= 20.0, "a new tau for every batch"
    assert len({e["tau"]["mean"] for e in log}) == 3
    assert sum(1 for count in map(sum, zip(*(e["tau"]["histogram"] for e in log))) if count) >= 4

    meta = read_meta(run / "student" / "student.safetensors")
    assert (meta.arch, meta.num_classes, meta.extra["tau_mode"], meta.extra["tau_per"]) == (
        "tiny",
        10,
        "stochastic",
        "batch",
    )
    assert meta.extra["source"] == "synthetic" and meta.extra["teacher_sha256"] == sha256_file(tiny_teacher)
    (record,) = read_ledger(run / "carbon.jsonl")
    assert (record["stage"], record["status"]) == ("distillation", "complete")
    assert record["result"]["holdout_agreement"] == summary["holdout_agreement"]
    assert record["work"]["images"] == 3 * STEPS_PER_EPOCH * 16 and record["flops"] > 0
    manifest = json.loads((run / "manifest.json").read_text())
    for relative, entry in manifest["artifacts"].items():
        assert sha256_file(run / relative) == entry["sha256"], relative
    assert "student/student.safetensors" in manifest["artifacts"]


def test_per_sample_tau(run: Path) -> None:
    distill(run, "--epochs", "2", "--tau-per", "sample")
    for entry in metrics(run, "tau=stochastic"):
        tau = entry["tau"]
        assert tau["count"] == STEPS_PER_EPOCH * 16, "one tau per image"
        assert sum(tau["histogram"]) == tau["count"] and 2.0 <= tau["min"] < tau["max"] <= 20.0
        assert sum(1 for count in tau["histogram"] if count) >= 10
    assert read_meta(run / "student" / "student.safetensors").extra["tau_per"] == "sample"


def test_fixed_tau_fills_one_bin(run: Path) -> None:
    distill(run, "--epochs", "2", "--tau", "4")
    for entry in metrics(run, "tau=4"):
        tau = entry["tau"]
        assert tau["min"] == tau["max"] == tau["mean"] == 4.0
        assert tau["histogram"][2] == tau["count"] == STEPS_PER_EPOCH and sum(tau["histogram"]) == tau["count"]
    assert read_meta(run / "student" / "student.safetensors").extra["tau_mode"] == "fixed"


def test_interrupted_run_resumes_the_same_tau_sequence_and_weights(
    run: Path, tmp_path: Path, tiny_synthetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = Path(shutil.copytree(tiny_synthetic, tmp_path / "reference"))
    distill(reference, "--epochs", "4")

    import dfkd.stages.distill

    original, calls = dfkd.stages.distill.save_resume, []

    def killed_in_epoch_3(*args: Any, **kwargs: Any) -> str:
        calls.append(1)
        if len(calls) == 3:  # epoch 3 trained but not saved: the run must go on from epoch 2
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(dfkd.stages.distill, "save_resume", killed_in_epoch_3)
        result = CliRunner().invoke(app, ["distill", "--run", str(run), *COMMON, *TINY, "--epochs", "4"])
    assert result.exit_code != 0 and [e["epoch"] for e in metrics(run, "tau=stochastic")] == [1, 2]
    assert not (run / "student" / "student.safetensors").exists()

    distill(run, "--epochs", "4")
    ours, theirs = metrics(run, "tau=stochastic"), metrics(reference, "tau=stochastic")
    assert [e["epoch"] for e in ours] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs):
        assert a["tau"] == b["tau"], f"epoch {a['epoch']}: another tau sequence after the restart"
        assert (a["loss"], a["lr"]) == (b["loss"], b["lr"])
    resumed, uninterrupted = (
        load_file(run / "student" / "student.safetensors"),
        load_file(reference / "student" / "student.safetensors"),
    )
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key

    interrupted, finished = read_ledger(run / "carbon.jsonl")
    assert (interrupted["status"], interrupted["error"]) == ("interrupted", "KeyboardInterrupt")
    assert (finished["status"], finished["work"]["resumed_from_epoch"]) == ("complete", 2)
    assert verify_ledger(run / "carbon.jsonl") == []


def test_grid_runs_one_metered_trial_per_tau_and_publishes_the_winner(run: Path) -> None:
    summary = distill(run, "--epochs", "2", "--tau", "grid:2,4,8")
    trials = ["tau=2", "tau=4", "tau=8"]
    records = read_ledger(run / "carbon.jsonl")
    assert [r["stage"] for r in records] == [
        "distillation[tau=2]",
        "distillation[tau=4]",
        "distillation[tau=8]",
        "selection",
    ]
    assert all(r["status"] == "complete" for r in records) and verify_ledger(run / "carbon.jsonl") == []

    stage = json.loads((run / "manifest.json").read_text())["stages"]["distillation"]
    assert stage["trials_planned"] == trials and sorted(stage["trials"]) == trials
    scores = {t: stage["trials"][t]["holdout_agreement"] for t in trials}
    best = max(trials, key=lambda t: (scores[t], -trials.index(t)))
    result = stage["result"]
    assert (result["criterion"], result["scores"], result["winner"]) == ("holdout_agreement", scores, best)
    assert summary["winner"] == records[-1]["result"]["winner"] == best
    assert sha256_file(run / "student" / "student.safetensors") == sha256_file(
        run / "student" / best / "student.safetensors"
    )
    for trial in trials:
        value = float(trial.removeprefix("tau="))
        for entry in metrics(run, trial):
            assert entry["tau"]["min"] == entry["tau"]["max"] == value


def test_other_settings_need_overwrite(run: Path) -> None:
    distill(run, "--epochs", "1", "--tau", "4")
    message = distill_fails(run, "--epochs", "1", "--tau", "6")
    assert "other settings" in message and "--overwrite" in message
    distill(run, "--epochs", "1", "--tau", "6", "--overwrite")
    assert sorted(p.name for p in (run / "student").iterdir()) == ["student.safetensors", "tau=6"]


# --- user errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", ["hot", "0.5", "inf", "grid:2,x", "grid:4,4", "grid:"])
def test_bad_tau_strings(run: Path, tau: str) -> None:
    message = distill_fails(run, f"--tau={tau}")
    assert f"tau {tau!r}" in message
    assert not (run / "student").exists()


def test_bad_tau_range(run: Path) -> None:
    assert "tau range '5,3' is invalid" in distill_fails(run, "--tau-range", "5,3")


@pytest.mark.parametrize("tau", ["4", "grid:2,4"])
def test_per_sample_tau_needs_stochastic_tau(run: Path, tau: str) -> None:
    message = distill_fails(run, "--tau", tau, "--tau-per", "sample")
    assert "--tau-per sample needs --tau stochastic" in message
    assert not (run / "student").exists() and not (run / "carbon.jsonl").exists(), "refused before any trial started"


def test_run_dir_without_synthetic_data(tmp_path: Path, tiny_teacher: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "records no teacher" in distill_fails(empty)
    message = distill_fails(empty, "--teacher", str(tiny_teacher))
    assert "has no synthetic shards" in message and "dfkd synthesize" in message
    assert "does not exist" in distill_fails(tmp_path / "missing", "--teacher", str(tiny_teacher))


def test_class_count_mismatch(run: Path, tmp_path: Path, tiny_teacher: Path) -> None:
    three = image_folder(tmp_path / "three", 3)
    message = distill_fails(run, "--data", str(three), "--teacher", str(tiny_teacher))
    assert "10 classes" in message and "has 3" in message
    three_class_teacher = save_tiny_teacher(tmp_path / "tiny3.safetensors", num_classes=3)
    message = distill_fails(run, "--teacher", str(three_class_teacher))
    assert "classes up to 9" in message and "has 3" in message


# --- behaviour with the reference teacher ------------------------------------------------------------


def test_real_data_baseline_on_a_slice(tmp_path: Path, reference_teacher: Path, cifar_jpeg_root: Path) -> None:
    # The CLI has no --train-subset yet, so the slice is asked for through the library.
    config = DistillConfig(
        student="tiny",
        teacher=str(reference_teacher),
        data=str(cifar_jpeg_root),
        train_subset=200,
        epochs=1,
        batch_size=32,
        device="cpu",
    )
    run = RunDir.open(tmp_path / "run")
    with run.locked():
        prepared = prepare_distill(config, run)
        summary = run_distillation(
            prepared,
            run,
            lambda stage, info, work: run_metered(
                run, stage, CarbonConfig(grid_g_per_kwh=400), prepared.device, info, work
            ),
            show_progress=False,
        )
    data = prepared.data
    assert data.real_labels and len(data.train) + len(data.holdout) == 200
    labels = torch.cat([data.train.labels.cpu(), data.holdout.labels])
    assert torch.bincount(labels, minlength=10).tolist() == [20] * 10, "a class-balanced slice"
    stage = json.loads((run.root / "manifest.json").read_text())["stages"]["distillation"]
    assert "imagefolder" in stage["source"] and stage["train_images"] == len(data.train)
    assert stage["config"]["train_subset"] == 200
    assert read_meta(run.root / "student" / "student.safetensors").extra["source"] == "real data"
    # Seeded golden value (CPU, torch 2.14.1) of a one-epoch tiny student on 180 real images.
    assert summary["holdout_agreement"] == pytest.approx(5.0, abs=1e-6)
    (record,) = read_ledger(run.ledger_path)
    assert (record["stage"], record["status"], record["work"]["images"]) == ("distillation", "complete", 160)


@pytest.mark.slow
def test_distillation_on_reference_synthetic_images_raises_agreement_with_the_teacher(
    tmp_path: Path, reference_teacher: Path
) -> None:
    # A few dozen synthetic images cannot teach a fresh WRN-16-1 what generalises to held-out ones
    # within a CPU test (measured: the held-out figure stays at chance, 0-17 %), so the rise is
    # measured on the images it was distilled on: the student takes over the teacher's decisions.
    run = RunDir.open(tmp_path / "run")
    quality = make_synthetic(run, reference_teacher, "cmi", 40, 20, 5)
    assert quality["target_agreement"] >= 50
    config = DistillConfig(teacher=str(reference_teacher), epochs=60, batch_size=8, lr=2.0, holdout=0.3, device="cpu")
    prepared = prepare_distill(config, run)
    meta, device, train = prepared.teacher_meta, prepared.device, prepared.data.train
    teacher_logits = predict_logits(prepared.teacher, train.images, meta.mean, meta.std, device)

    def agreement(student: torch.nn.Module) -> float:
        return top1_agreement(predict_logits(student, train.images, meta.mean, meta.std, device), teacher_logits)

    torch.manual_seed(config.seed)
    before = agreement(create_model("wrn16_1", 10))
    summary = run_distillation(prepared, run, lambda stage, info, work: work(), show_progress=False)
    student, _ = load_checkpoint(run.root / "student" / "student.safetensors")
    after = agreement(student)
    assert after >= before + 20, (before, after)
    # The stage's own figure is the agreement on the held-out slice, recomputed here from the file.
    holdout = prepared.data.holdout
    assert summary["holdout_agreement"] == pytest.approx(
        top1_agreement(
            predict_logits(student, holdout.images, meta.mean, meta.std, device), prepared.data.teacher_holdout_logits
        )
    )
