"""Faults: kill -9 mid-stage (real subprocesses), a NaN loss, a full disk, two processes on one run dir."""

from __future__ import annotations

import errno
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
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from dfkd.carbon.ledger import read_ledger
from dfkd.cli import app
from dfkd.config.recipe import load_recipe
from dfkd.report.audit import audit_run
from dfkd.stages.pipeline import run_recipe

QUICKSTART = str(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.toml")

# `dfkd` with its stages slowed down (not changed), so a kill lands inside a stage.
SLOWED = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    import synthesizers.cmi as cmi
    import dfkd.stages.distill
    original = cmi.CMI.synthesize
    def slow_batch(self, *args, **kwargs):
        time.sleep(0.3)
        return original(self, *args, **kwargs)
    cmi.CMI.synthesize = slow_batch
    get_loss = dfkd.stages.distill.get_loss
    def slow_loss(name):
        loss = get_loss(name)
        def slowed(*args, **kwargs):
            time.sleep(0.1)
            return loss(*args, **kwargs)
        return slowed
    dfkd.stages.distill.get_loss = slow_loss
    from dfkd.cli import app
    app(sys.argv[1:], prog_name="dfkd")
    """
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def overrides(sets: list[str]) -> list[str]:
    return sets[1::2]


def pending_starts(run: Path, stage: str) -> set[str]:
    try:
        return {json.loads((run / f".pending-{stage}.json").read_text())["start_utc"]}
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return set()


def kill_during(run: Path, stage: str, command: list[str], rng: random.Random) -> None:
    """Start `command`, wait until `stage`'s meter has written its first snapshot, kill -9 a random moment later."""
    before = pending_starts(run, stage)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not pending_starts(run, stage) - before:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline, f"{stage} did not start in time"
        time.sleep(0.02)
    time.sleep(rng.uniform(0.2, 0.8))
    assert process.poll() is None, f"{stage} finished before the kill: slow it down further"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_kill_9_three_times_in_each_stage_then_the_run_completes_as_if_uninterrupted(
    tmp_path: Path, tiny_recipe_sets: list[str]
) -> None:
    sets = [*tiny_recipe_sets, "--set", "distill.epochs=8"]
    reference = tmp_path / "reference"
    run_recipe(load_recipe(Path(QUICKSTART), overrides(sets)), reference, show_progress=False)

    run = tmp_path / "killed"
    command = [sys.executable, "-c", SLOWED, "run", QUICKSTART, "--run", str(run), "--json", *sets]
    rng = random.Random(6)
    for stage in ("synthesis", "distillation"):
        for _ in range(3):
            kill_during(run, stage, command, rng)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    assert audit_run(run) == []
    records = read_ledger(run / "carbon.jsonl")
    assert [(r["stage"], r["status"]) for r in records] == [
        *[("synthesis", "interrupted")] * 3,
        ("synthesis", "complete"),
        *[("distillation", "interrupted")] * 3,
        ("distillation", "complete"),
        ("inference-benchmark", "complete"),  # the quickstart's last step
    ]
    assert all(r["error"].startswith("process killed") for r in records if r["status"] == "interrupted")
    # No image duplicated or lost: the shards are those of the uninterrupted run.
    ours, theirs = sorted((run / "synthetic").glob("shard-*")), sorted((reference / "synthetic").glob("shard-*"))
    assert [p.name for p in ours] == [p.name for p in theirs] and len(ours) == 12
    for a, b in zip(ours, theirs):
        x, y = load_file(a), load_file(b)
        assert all(torch.equal(x[k], y[k]) for k in ("images", "targets", "logits", "losses")), a.name
    resumed, uninterrupted = (
        load_file(run / "student" / "student.safetensors"),
        load_file(reference / "student" / "student.safetensors"),
    )
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_nan_loss_stops_with_a_clear_error_keeping_the_last_good_epoch(
    tmp_path: Path, tiny_recipe_sets: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dfkd.stages.distill

    get_loss, steps = dfkd.stages.distill.get_loss, {"n": 0}
    per_epoch = (48 - 5) // 8  # 43 training images after the held-out slice, batch 8

    def nan_in_epoch_2(name: str) -> Any:
        loss = get_loss(name)

        def patched(*args: Any, **kwargs: Any) -> torch.Tensor:
            steps["n"] += 1
            value = loss(*args, **kwargs)
            return value * float("nan") if steps["n"] > per_epoch else value

        return patched

    monkeypatch.setattr(dfkd.stages.distill, "get_loss", nan_in_epoch_2)
    run = tmp_path / "run"
    message = fails("run", QUICKSTART, "--run", str(run), *tiny_recipe_sets)
    assert "nan" in message and "epoch 2" in message and "last good epoch is kept" in message
    (resume,) = (run / "student" / "tau=stochastic").glob("resume*.safetensors")
    assert resume.name == "resume-e0001.safetensors"
    with safe_open(str(resume), framework="pt") as f:
        assert json.loads(f.metadata()["state"])["epoch"] == 1
    assert read_ledger(run / "carbon.jsonl")[-1]["status"] == "interrupted"
    assert audit_run(run) == []


def test_full_disk_is_one_line_and_the_run_resumes(
    tmp_path: Path, tiny_recipe_sets: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dfkd.synthetic_set

    original, calls = dfkd.synthetic_set.atomic_write_bytes, {"n": 0}

    def full_once(path: Path, data: bytes) -> str:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, data)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(dfkd.synthetic_set, "atomic_write_bytes", full_once)
        message = fails("run", QUICKSTART, "--run", str(run), *tiny_recipe_sets)
    assert "no space left on device" in message and "rerun the same command to resume" in message
    assert audit_run(run) == []
    result = CliRunner().invoke(app, ["run", QUICKSTART, "--run", str(run), "--json", *tiny_recipe_sets])
    assert result.exit_code == 0, result.output
    statuses = [(r["stage"], r["status"]) for r in read_ledger(run / "carbon.jsonl")]
    assert statuses == [
        ("synthesis", "interrupted"),
        ("synthesis", "complete"),
        ("distillation", "complete"),
        ("inference-benchmark", "complete"),
    ]
    assert json.loads(result.stdout)["synthesis"]["quality"]["images"] == 48
    assert audit_run(run) == []


def test_a_second_process_is_refused_until_the_holder_dies(tmp_path: Path, tiny_recipe_sets: list[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dfkd.rundir import RunDir; RunDir(sys.argv[1]).lock(); "
            "print('held', flush=True); time.sleep(600)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        message = fails("run", QUICKSTART, "--run", str(run), *tiny_recipe_sets)
        assert "in use by another dfkd process" in message
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    result = CliRunner().invoke(app, ["run", QUICKSTART, "--run", str(run), "--json", *tiny_recipe_sets])
    assert result.exit_code == 0, result.output
