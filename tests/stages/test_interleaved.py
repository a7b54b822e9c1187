"""The interleaved mode end to end on the tiny teacher: shards, phases, audit, resume, kill -9, bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import cli_fails as fails
from safetensors.torch import load_file
from typer.testing import CliRunner

from dfkd.carbon.ledger import read_ledger
from dfkd.cli import app
from dfkd.config.recipe import load_recipe
from dfkd.report.audit import audit_run
from dfkd.report.build import build_report
from dfkd.report.html import render_html
from dfkd.stages.pipeline import run_recipe

REPO = Path(__file__).resolve().parents[2]
FAST = str(REPO / "recipes" / "c10_wrn40_2-wrn16_1_fast.toml")
CMI = str(REPO / "recipes" / "c10_wrn40_2-wrn16_1_cmi_interleaved.toml")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_interleaved(tiny_teacher: Path) -> list[str]:
    """`--set` options that shrink the interleaved recipes to the tiny teacher: 6 rounds of 8 images."""
    values = {
        "teacher.checkpoint": str(tiny_teacher),
        "run.device": "cpu",
        "carbon.grid_g_per_kwh": "400",
        "synthesize.num_images": "48",
        "synthesize.batch_size": "8",
        "synthesize.iterations": "2",
        "synthesize.settings.nz": "16",
        "synthesize.settings.ngf": "8",
        "synthesize.settings.compile": "false",
        "synthesize.settings.warmup_batches": "1",
        "interleave.kd_steps": "4",
        "interleave.warmup_rounds": "1",
        "distill.student": "tiny",
        "distill.batch_size": "8",
        "distill.compile": "false",
    }
    return [item for key, value in values.items() for item in ("--set", f"{key}={value}")]


def values(sets: list[str]) -> list[str]:
    return sets[1::2]


def invoke(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_interleaved_run_writes_hashed_shards_one_phased_record_and_audits(
    tmp_path: Path, tiny_interleaved: list[str]
) -> None:
    run = tmp_path / "run"
    summary = invoke("run", FAST, "--run", str(run), *tiny_interleaved)
    assert summary["mode"] == "interleaved" and summary["synthesis"]["quality"]["images"] == 48
    result = summary["distillation"]
    assert result["trial"] == "tau=stochastic" and 0 <= result["holdout_agreement"] <= 100

    manifest = json.loads((run / "manifest.json").read_text())
    shards = sorted(k for k, v in manifest["artifacts"].items() if v["role"] == "shard")
    assert shards == [f"synthetic/shard-{i:05d}.safetensors" for i in range(6)]
    assert manifest["stages"]["synthesis"]["mode"] == "interleaved"
    assert "epochs" not in manifest["recipe"]["distill"] and manifest["recipe"]["interleave"]["kd_steps"] == 4

    (record,) = read_ledger(run / "carbon.jsonl")
    assert record["stage"] == "interleaved" and record["status"] == "complete"
    assert set(record["phases"]) == {"generation", "compression", "outside phases"}
    assert record["work"]["rounds"] == 6 and record["work"]["images"] == 5 * 4 * 8  # 5 rounds after the warm-up
    assert record["phases"]["generation"]["flops"] > 0 and record["phases"]["compression"]["flops"] > 0
    parts = record["phases"].values()
    assert sum(p["duration_s"] for p in parts) == pytest.approx(record["duration_s"])
    assert sum(p["flops"] for p in parts) == pytest.approx(record["flops"])

    # The report keeps the generation/compression split, and the audit re-derives it.
    (entry,) = build_report([run])["runs"]
    phases = entry["phases"]
    assert phases["generation"]["records"] == phases["compression"]["records"] == 1
    assert phases["generation"]["flops"] == pytest.approx(record["phases"]["generation"]["flops"])
    assert entry["rows"][0]["result"]["metric"] == "holdout_agreement"
    assert audit_run(run) == []
    # The HTML page stacks the record's parts in the CO2 chart (it once failed on the phased row).
    page = render_html(build_report([run]))
    assert 'id="co2-chart"' in page and "generation" in page and "compression" in page

    # The same command again does nothing and meters nothing.
    again = invoke("run", FAST, "--run", str(run), *tiny_interleaved)
    assert again["distillation"] == summary["distillation"] and len(read_ledger(run / "carbon.jsonl")) == 1

    # The set is an ordinary synthetic set: a two-stage distillation re-uses it.
    other = invoke("distill", "--run", str(run), "--student", "tiny", "--epochs", "1", "--batch-size", "8",
                   "--device", "cpu", "--overwrite")  # fmt: skip
    assert 0 <= other["holdout_agreement"] <= 100


def test_a_tampered_phase_is_caught_by_the_audit(tmp_path: Path, tiny_interleaved: list[str]) -> None:
    run = tmp_path / "run"
    run_recipe(load_recipe(Path(FAST), values(tiny_interleaved)), run, show_progress=False)
    ledger = run / "carbon.jsonl"
    record = json.loads(ledger.read_text())
    record["phases"]["generation"]["flops"] *= 2
    ledger.write_text(json.dumps(record) + "\n")
    assert any("the sum of its phases' FLOPs" in problem for problem in audit_run(run))


@pytest.mark.parametrize("recipe", [FAST, CMI])
def test_a_run_stopped_mid_round_resumes_to_the_same_student(
    tmp_path: Path, tiny_interleaved: list[str], monkeypatch: pytest.MonkeyPatch, recipe: str
) -> None:
    """Stopped inside round 4's distillation (its shard written, its student state not): the rerun does that
    distillation again and ends with the shards and student of an uninterrupted run."""
    import dfkd.stages.interleaved as interleaved

    sets = values(tiny_interleaved)
    if recipe == CMI:
        sets = [s for s in sets if "warmup_batches" not in s]
        sets += ["synthesize.settings.head_dim=8", "synthesize.settings.bank_size=32"]
        sets += ["synthesize.settings.num_negatives=4"]
    reference = tmp_path / "reference"
    run_recipe(load_recipe(Path(recipe), sets), reference, show_progress=False)

    original = interleaved.save_resume

    def stop_in_round_4(path: Path, *args: Any, **kwargs: Any) -> str:
        if path.name == "resume-r00004.safetensors":
            raise KeyboardInterrupt
        return original(path, *args, **kwargs)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(interleaved, "save_resume", stop_in_round_4)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(load_recipe(Path(recipe), sets), run, show_progress=False)
    assert (run / "synthetic" / "shard-00003.safetensors").exists()
    run_recipe(load_recipe(Path(recipe), sets), run, show_progress=False)

    records = read_ledger(run / "carbon.jsonl")
    assert [(r["stage"], r["status"]) for r in records] == [("interleaved", "interrupted"), ("interleaved", "complete")]
    assert records[1]["info"]["resumed_after_round"] == 3 and records[1]["work"]["images_made"] == 2 * 8
    for shard in sorted((reference / "synthetic").glob("shard-*")):
        assert same_tensors(shard, run / "synthetic" / shard.name), shard.name
    assert same_tensors(reference / "student" / "student.safetensors", run / "student" / "student.safetensors")
    assert audit_run(run) == []


# `dfkd` with each round slowed down (not changed), so a kill lands inside a round.
SLOWED = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    import dfkd.stages.interleaved as interleaved
    original = interleaved.train_step
    def slow_step(*args, **kwargs):
        time.sleep(0.05)
        return original(*args, **kwargs)
    interleaved.train_step = slow_step
    from dfkd.cli import app
    app(sys.argv[1:], prog_name="dfkd")
    """
)


@pytest.mark.slow
def test_kill_9_mid_round_then_the_rerun_ends_with_the_uninterrupted_student(
    tmp_path: Path, tiny_interleaved: list[str]
) -> None:
    reference = tmp_path / "reference"
    run_recipe(load_recipe(Path(FAST), values(tiny_interleaved)), reference, show_progress=False)
    run = tmp_path / "killed"
    command = [sys.executable, "-c", SLOWED, "run", FAST, "--run", str(run), "--json", *tiny_interleaved]
    rng = random.Random(11)
    pending = run / ".pending-interleaved.json"

    def started() -> str | None:
        try:
            return json.loads(pending.read_text())["start_utc"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    for _ in range(2):
        before = started()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while started() in (None, before):
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "the rounds did not start in time"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.3, 1.2))
        assert process.poll() is None, "the run finished before the kill: slow it down further"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    statuses = [r["status"] for r in read_ledger(run / "carbon.jsonl")]
    assert statuses == ["interrupted", "interrupted", "complete"]
    assert same_tensors(reference / "student" / "student.safetensors", run / "student" / "student.safetensors")
    assert audit_run(run) == []


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("interleave.kd_steps=0", "kd_steps must be at least 1"),
        ("synthesize.iterations=0", "iterations must be at least 1"),
        ("interleave.warmup_rounds=6", "leaves no round to distill in"),
        ("distill.tau=grid", "tau = grid does not run interleaved"),
        ("distill.epochs=3", "distill.epochs does not apply to the interleaved mode"),
        ("run.mode=sequential", "mode must be one of two-stage, interleaved"),
    ],
)
def test_bad_interleaved_input_is_one_line_exit_2_nothing_written(
    tmp_path: Path, tiny_interleaved: list[str], setting: str, expected: str
) -> None:
    run = tmp_path / "run"
    assert expected in fails("run", FAST, "--run", str(run), *tiny_interleaved, "--set", setting)
    assert not run.exists()


def test_a_method_without_a_student_term_cannot_run_interleaved(
    tmp_path: Path, tiny_interleaved: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from synthesizers import registry

    entry = dataclasses.replace(registry.METHODS["fast"], student_term="")
    monkeypatch.setitem(registry.METHODS, "fast", entry)
    run = tmp_path / "run"
    message = fails("run", FAST, "--run", str(run), *tiny_interleaved)
    assert "method fast cannot take a student" in message and "cmi, deepinversion" in message
    assert not run.exists()


def test_a_pool_larger_than_memory_is_refused_before_anything_is_written(
    tmp_path: Path, tiny_interleaved: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dfkd.stages.synthesis as synthesis

    monkeypatch.setattr(synthesis, "free_memory_bytes", lambda device: 100_000)
    run = tmp_path / "run"
    message = fails("run", FAST, "--run", str(run), *tiny_interleaved)
    assert "the interleaved pool of 48 images" in message and "lower synthesize.num_images" in message
    assert not run.exists()


def test_study_tau_refuses_an_interleaved_recipe(tmp_path: Path, tiny_interleaved: list[str]) -> None:
    message = fails("study", "tau", FAST, "--run", str(tmp_path / "study"), *tiny_interleaved)
    assert "one shared synthetic set" in message and "fast_tau_study.toml" in message
