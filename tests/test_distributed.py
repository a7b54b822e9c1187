"""Launched as several processes (torchrun), dfkd stops at once: its stages, lock, manifest and meter are
single-process for now (issue 15), and N copies of a job on one run dir would each redo it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_fails

from dfkd.config.recipe import RECIPES_DIR
from dfkd.distributed import check_single_process
from dfkd.errors import DfkdError


def test_one_process_passes_and_several_are_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_single_process()
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_single_process()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(DfkdError, match=r"launched as process 3 of 4 \(WORLD_SIZE=4"):
        check_single_process()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DfkdError, match="is not a number of processes"):
        check_single_process()


def test_every_command_refuses_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = tmp_path / "run"
    message = cli_fails("run", str(RECIPES_DIR / "quickstart.toml"), "--run", str(run))
    assert "runs in one process only for now" in message
    assert "runs in one process only for now" in cli_fails("report", str(run))
    assert not run.exists()


@pytest.mark.slow
def test_a_torchrun_launch_stops_every_rank_with_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "dfkd", "run",
         str(RECIPES_DIR / "quickstart.toml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: dfkd was launched as process")]
    assert sorted(line.split()[6] for line in errors) == ["0", "1"], result.stderr
    assert not (tmp_path / "runs").exists(), "nothing written"
