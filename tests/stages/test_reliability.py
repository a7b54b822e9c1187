"""Issue 10: kills at every commit boundary, checked resume state, non-finite settings, a refusal that
changes nothing, reproducible bytes.

The kill test steps through a run's commit sequence deterministically: every durable write (a file
renamed into place, a ledger line appended) is a boundary, and for each boundary k a run is stopped
right after write k the way SIGKILL stops it — nothing written after it, no cleanup — then rerun and
audited; its synthetic set and student must be the bytes of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dfkd.carbon.meter
from dfkd.carbon.ledger import read_ledger
from dfkd.cli import app
from dfkd.config.recipe import load_recipe
from dfkd.files import sha256_file
from dfkd.report.audit import audit_run
from dfkd.stages.pipeline import run_recipe

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.toml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Killed(SystemExit):
    """Raised at the kill point and at every write attempted after it (a killed process writes nothing).

    A SystemExit, so the meter's snapshot thread, if it tries to write after the kill, ends silently.
    """


@contextmanager
def killed_after(monkeypatch: pytest.MonkeyPatch, boundary: int | None) -> Iterator[list[str]]:
    """Count durable writes; with `boundary`, stop the process right after that write. Yields the writes."""
    writes: list[str] = []
    replace, append = os.replace, dfkd.carbon.meter.append_record

    def durable(what: str, write):  # noqa: ANN001, ANN202 - a thin wrapper over either writer
        if boundary is not None and len(writes) >= boundary:
            raise Killed(what)
        result = write()
        writes.append(what)
        if len(writes) == boundary:
            raise Killed(what)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", lambda src, dst: durable(str(dst), lambda: replace(src, dst)))
        patch.setattr(
            dfkd.carbon.meter, "append_record", lambda path, record: durable("ledger", lambda: append(path, record))
        )
        yield writes


# Three shards, two epochs; no energy snapshot but the first (a deterministic commit sequence).
SMALL = ["synthesize.num_images=12", "distill.epochs=2", "carbon.flush_seconds=600"]


def tiny_recipe(tiny_recipe_sets: list[str]):  # noqa: ANN201
    return load_recipe(QUICKSTART, [*(item for item in tiny_recipe_sets if item != "--set"), *SMALL])


def outputs(run: Path) -> dict[str, str]:
    """sha256 of the synthetic shards and the students: what must not depend on where a run was killed."""
    files = sorted(run.glob("synthetic/shard-*.safetensors")) + sorted(run.glob("student/**/student.safetensors"))
    return {str(path.relative_to(run)): sha256_file(path) for path in files}


@pytest.mark.slow
# The meter's snapshot thread may try a write after the simulated kill; it ends on the Killed raised
# there (a real kill would have ended it silently), which pytest reports as a thread exception.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_kill_at_every_commit_boundary_resumes_to_the_uninterrupted_result(
    tmp_path: Path, tiny_recipe_sets: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tiny_recipe(tiny_recipe_sets)
    with killed_after(monkeypatch, None) as writes:
        run_recipe(recipe, tmp_path / "reference", show_progress=False)
    expected = outputs(tmp_path / "reference")
    assert len(expected) == 5 and len(writes) > 20, writes
    for boundary in range(1, len(writes) + 1):
        run = tmp_path / f"killed-after-{boundary}"
        with killed_after(monkeypatch, boundary), pytest.raises(Killed):
            run_recipe(recipe, run, show_progress=False)
        summary = run_recipe(recipe, run, show_progress=False)
        assert audit_run(run) == [], (boundary, writes[boundary - 1])
        assert outputs(run) == expected, (boundary, writes[boundary - 1])
        records = read_ledger(run / "carbon.jsonl")
        # The stages, then the quickstart's last step (its [inference]; the [export] is a file, not a record).
        complete = [r["stage"] for r in records if r["status"] == "complete"]
        assert complete[-2:] == ["distillation", "inference-benchmark"], boundary
        assert summary["distillation"]["student"] == "student/tau=stochastic/student.safetensors"
        shutil.rmtree(run)


def test_identical_runs_write_identical_bytes(tmp_path: Path, tiny_recipe_sets: list[str]) -> None:
    recipe = tiny_recipe(tiny_recipe_sets)
    run_recipe(recipe, tmp_path / "a", show_progress=False)
    run_recipe(recipe, tmp_path / "b", show_progress=False)
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")
    states = [sha256_file(next((tmp_path / name / "synthetic").glob("state-*.safetensors"))) for name in "ab"]
    assert states[0] == states[1]


def fails(*args: str, json_flag: bool = True) -> str:
    result = CliRunner().invoke(app, [*args, *(["--json"] if json_flag else [])])
    assert result.exit_code == 2, (result.output, result.exception)
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message and "Traceback" not in result.output, message
    return message


def _interrupted_distillation(tmp_path: Path, tiny_recipe_sets: list[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run whose distillation was stopped after epoch 1 of 2 (its state recorded)."""
    import dfkd.stages.distill

    original, calls = dfkd.stages.distill.save_resume, []

    def stop_in_epoch_2(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    run = tmp_path / "run"
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(dfkd.stages.distill, "save_resume", stop_in_epoch_2)
        run_recipe(tiny_recipe(tiny_recipe_sets), run, show_progress=False)
    return run


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_resume_state_is_refused_never_loaded(
    tmp_path: Path, tiny_recipe_sets: list[str], monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    run = _interrupted_distillation(tmp_path, tiny_recipe_sets, monkeypatch)
    (state,) = (run / "student" / "tau=stochastic").glob("resume-*.safetensors")
    data = bytearray(state.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x01
    else:
        data = data[: len(data) // 2]
    state.write_bytes(bytes(data))
    records = len(read_ledger(run / "carbon.jsonl"))
    sets = [*tiny_recipe_sets, *(item for value in SMALL for item in ("--set", value))]
    for _ in range(2):
        message = fails("run", str(QUICKSTART), "--run", str(run), *sets)
        assert "resume-e0001.safetensors" in message and "does not match its manifest hash" in message
    assert state.read_bytes() == bytes(data), "the damaged file is left for the user to inspect"
    assert len(read_ledger(run / "carbon.jsonl")) == records, "a refusal meters nothing"
    assert not (run / "student" / "student.safetensors").exists()


def test_an_unrecorded_resume_state_left_by_a_kill_is_dropped(
    tmp_path: Path, tiny_recipe_sets: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _interrupted_distillation(tmp_path, tiny_recipe_sets, monkeypatch)
    folder = run / "student" / "tau=stochastic"
    (folder / "resume-e0002.safetensors").write_bytes(b"half-written by a killed process")
    summary = run_recipe(tiny_recipe(tiny_recipe_sets), run, show_progress=False)
    assert summary["distillation"]["trial"] == "tau=stochastic"
    distillations = [r for r in read_ledger(run / "carbon.jsonl") if r["stage"] == "distillation"]
    assert distillations[-1]["work"]["resumed_from_epoch"] == 1
    assert audit_run(run) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_settings_are_refused(tmp_path: Path, tiny_teacher: Path, value: str) -> None:
    message = fails("distill", "--run", str(tmp_path / "run"), "--lr", value, "--device", "cpu")
    assert "lr" in message and "finite" in message
    message = fails("run", str(QUICKSTART), "--run", str(tmp_path / "run"), "--set", f"distill.alpha={value}")
    assert "alpha" in message and "finite" in message
    message = fails(
        "synthesize", "--run", str(tmp_path / "run"), "--teacher", str(tiny_teacher), "--set", f"lr={value}"
    )
    assert "lr" in message and "finite" in message
    assert not (tmp_path / "run").exists()


def test_a_diverged_model_is_never_written(tmp_path: Path) -> None:
    import torch

    from dfkd.checkpoints import CheckpointMeta, save_checkpoint
    from dfkd.errors import DfkdError
    from dfkd.models import create_model
    from dfkd.models.zoo import CIFAR10_MEAN, CIFAR10_STD

    model = create_model("tiny", 10)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(DfkdError, match="hold NaN or infinity.*fc.weight.*lower the learning rate"):
        save_checkpoint(tmp_path / "s.safetensors", model, CheckpointMeta("tiny", 10, CIFAR10_MEAN, CIFAR10_STD, "t"))
    assert not (tmp_path / "s.safetensors").exists()


def test_unknown_country_is_one_line_before_any_run_dir(tmp_path: Path, tiny_teacher: Path) -> None:
    run = tmp_path / "run"
    message = fails("synthesize", "--run", str(run), "--teacher", str(tiny_teacher), "--country", "XXX")
    assert "'XXX' is not in codecarbon's energy-mix table" in message
    assert not run.exists()
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(QUICKSTART.read_text().replace('country = "USA"', 'country = "XXX"'))
    assert "'XXX'" in fails("validate", str(recipe))


def test_overwrite_with_bad_input_deletes_nothing(
    tmp_path: Path, tiny_recipe_sets: list[str], tiny_teacher: Path
) -> None:
    run = tmp_path / "run"
    run_recipe(tiny_recipe(tiny_recipe_sets), run, show_progress=False)
    before = outputs(run)
    common = ["--run", str(run), "--device", "cpu", "--overwrite", "--country", "XXX"]
    fails("synthesize", "--teacher", str(tiny_teacher), *common)
    fails("distill", "--student", "tiny", *common)
    assert outputs(run) == before and audit_run(run) == []


def test_a_refused_run_changes_nothing(tmp_path: Path, tiny_recipe_sets: list[str], tiny_teacher: Path) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["synthesize", "--teacher", str(tiny_teacher), "--run", str(run), "--device", "cpu", "--json"]
        + ["--num-images", "8", "--batch-size", "4", "--iterations", "2", "--method", "deepinversion"],
    )
    assert result.exit_code == 0, result.output
    files = {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != ".lock"}
    message = fails("run", str(QUICKSTART), "--run", str(run), *tiny_recipe_sets)
    assert "other settings" in message
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != ".lock"} == files
    assert "recipe" not in json.loads((run / "manifest.json").read_text())


@pytest.mark.parametrize("name", [".lock", "carbon.jsonl", "manifest.json"])
def test_a_run_dir_holding_links_is_refused_and_audited(tmp_path: Path, tiny_recipe_sets: list[str], name: str) -> None:
    run = tmp_path / "run"
    run_recipe(tiny_recipe(tiny_recipe_sets), run, show_progress=False)
    outside = tmp_path / "outside.txt"
    outside.write_text("not dfkd's\n")
    original = run / name
    original.unlink(missing_ok=True)
    original.symlink_to(outside)
    sets = [*tiny_recipe_sets, *(item for value in SMALL for item in ("--set", value))]
    message = fails("run", str(QUICKSTART), "--run", str(run), *sets)
    assert f"holds a symbolic link, {name}" in message
    assert outside.read_text() == "not dfkd's\n", "nothing written through the link"
    assert any(problem.startswith(f"{name}: a symbolic link") for problem in audit_run(run))


def test_file_system_errors_are_one_line_and_checked_before_the_work(
    tmp_path: Path, tiny_recipe_sets: list[str], tiny_teacher: Path
) -> None:
    run = tmp_path / "run"
    run_recipe(tiny_recipe(tiny_recipe_sets), run, show_progress=False)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert "is a folder" in fails("report", str(run), "--format", "json", "--out", str(folder), json_flag=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "teacher.safetensors"
    message = fails("teacher", "train", "--data", str(tmp_path), "--out", str(out), "--run", str(tmp_path / "t"))
    assert "does not exist" in message or "matches no dataset" in message  # the data is checked first
    cifar_like = tmp_path / "data"
    for split in ("train", "test"):
        (cifar_like / split / "a").mkdir(parents=True)
        (cifar_like / split / "a" / "x.png").write_bytes(b"")
    message = fails("teacher", "train", "--data", str(cifar_like), "--out", str(out), "--run", str(tmp_path / "t"))
    assert f"cannot write {out}" in message and "is a file, not a folder" in message
    assert not (tmp_path / "t").exists(), "refused before a run dir was made"


def test_a_bank_too_large_for_memory_is_refused_before_allocation(tmp_path: Path, tiny_teacher: Path) -> None:
    settings = ["--set", "bank_size=100000000000", "--set", "num_negatives=8", "--set", "head_dim=16"]
    message = fails("synthesize", "--run", str(tmp_path / "run"), "--teacher", str(tiny_teacher), *settings)
    assert "CMI's memory bank (bank_size 100000000000 x" in message and "GiB free on cpu" in message
    assert not (tmp_path / "run").exists()


def test_audit_compares_shard_metadata_and_reports_an_unlisted_shard(
    tmp_path: Path, tiny_recipe_sets: list[str]
) -> None:
    from safetensors.torch import load_file

    from dfkd.tensor_files import safetensors_bytes

    run = tmp_path / "run"
    run_recipe(tiny_recipe(tiny_recipe_sets), run, show_progress=False)
    shard = run / "synthetic" / "shard-00001.safetensors"
    extra = run / "synthetic" / "shard-00007.safetensors"
    extra.write_bytes(shard.read_bytes())
    assert audit_run(run) == [
        "synthetic/shard-00007.safetensors: a shard file the manifest does not list "
        "(left by a killed run or added by hand; it is not part of the synthetic set)"
    ]
    extra.unlink()
    # A shard re-labelled as another index, with its manifest hash updated to match: only its metadata tells.
    tensors = load_file(shard)
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        metadata = {**f.metadata(), "index": "0"}
    shard.write_bytes(safetensors_bytes(tensors, metadata))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["artifacts"]["synthetic/shard-00001.safetensors"].update(
        sha256=sha256_file(shard), bytes=shard.stat().st_size
    )
    (run / "manifest.json").write_text(json.dumps(manifest))
    problems = audit_run(run)
    assert any("shard-00001.safetensors: its metadata index '0' differs from '1'" in p for p in problems), problems


def test_checkpoint_info_refuses_a_checkpoint_that_would_not_load(tmp_path: Path, tiny_teacher: Path) -> None:
    from safetensors import safe_open

    from dfkd.tensor_files import safetensors_bytes

    with safe_open(str(tiny_teacher), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "fc.bias"}
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(safetensors_bytes(tensors, metadata))
    assert "missing keys ['fc.bias']" in fails("checkpoint", "info", str(broken))


def test_a_mistyped_command_line_is_one_error_line() -> None:
    import subprocess
    import sys

    for args, words in ((["distill", "--bogus"], "No such option: --bogus"), (["nosuch"], "No such command")):
        result = subprocess.run([sys.executable, "-m", "dfkd", *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stdout == "", result
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: ") and words in line and "--help" in line, line


def test_a_recipe_must_state_its_scale(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert "recipe sets no synthesize.num_images" in fails("validate", str(empty))
    no_epochs = tmp_path / "no-epochs.toml"
    no_epochs.write_text("[synthesize]\nnum_images = 300\n")
    assert "recipe sets no distill.epochs" in fails("validate", str(no_epochs))


def test_import_refuses_a_test_accuracy_that_is_not_a_percentage(tmp_path: Path, tiny_teacher: Path) -> None:
    import torch
    from safetensors.torch import load_file

    source = tmp_path / "tiny.pth"
    torch.save(load_file(tiny_teacher), source)
    for value in ("nan", "-5", "101"):
        message = fails(
            "checkpoint", "import", str(source), str(tmp_path / "t.safetensors"), "--arch", "tiny", "--test-acc", value
        )
        assert "not a percentage in [0, 100]" in message
    assert not (tmp_path / "t.safetensors").exists()


def test_a_teacher_with_non_finite_weights_is_blamed_not_the_method(tmp_path: Path, tiny_teacher: Path) -> None:
    from safetensors import safe_open

    from dfkd.tensor_files import safetensors_bytes

    with safe_open(str(tiny_teacher), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["bn1.running_var"][0] = float("nan")
    broken = tmp_path / "nan.safetensors"
    broken.write_bytes(safetensors_bytes(tensors, metadata))
    message = fails("synthesize", "--run", str(tmp_path / "run"), "--teacher", str(broken), "--device", "cpu")
    assert "holds NaN or infinity" in message and "bn1.running_var" in message and "lr" not in message
    assert not (tmp_path / "run").exists()


def test_a_damaged_cmi_state_is_named_as_the_state(
    tmp_path: Path, tiny_recipe_sets: list[str], tiny_teacher: Path
) -> None:
    run = tmp_path / "run"
    run_recipe(tiny_recipe(tiny_recipe_sets), run, show_progress=False)
    (state,) = (run / "synthetic").glob("state-*.safetensors")
    state.write_bytes(state.read_bytes()[:-8])
    # The recipe's synthesis, asked for 4 more images: the set's settings, so it would continue from the state.
    settings = ["nz=16", "ngf=8", "head_dim=16", "bank_size=64", "num_negatives=8"]
    args = ["--num-images", "16", "--batch-size", "4", "--iterations", "3", "--teacher", str(tiny_teacher)]
    args += ["--device", "cpu", *(item for setting in settings for item in ("--set", setting))]
    message = fails("synthesize", "--run", str(run), *args)
    assert f"its state synthetic/{state.name} is missing or does not match its manifest hash" in message
