"""A run dir written before the issue-9 move still reports, audits and resumes after it.

`tests/fixtures/pre_move_run` was made by dfkd at commit e958c65 (see its README): `finished/` is a
whole tiny run of its `recipe.toml`, `finished-report.json` its JSON report as that code built it,
and `interrupted/` the same recipe stopped by Ctrl-C at the end of distillation epoch 2 (epoch 1's
resume state, in the old file layout, is on disk and in the manifest).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dfkd.carbon.ledger import read_ledger
from dfkd.cli import app
from dfkd.report.audit import audit_run
from dfkd.report.build import build_report

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "pre_move_run"
VOLATILE = ("generated_utc", "dfkd_version")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def fixture_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A writable copy of the fixture, as the working directory (its recipe names paths relative to it)."""
    target = tmp_path / "pre_move_run"
    shutil.copytree(FIXTURE, target)
    monkeypatch.chdir(target)
    return target


def test_report_of_an_old_run_is_the_report_the_old_code_built(fixture_copy: Path) -> None:
    saved = json.loads((fixture_copy / "finished-report.json").read_text())
    fresh = build_report([Path("finished")])
    for key in VOLATILE:
        saved.pop(key), fresh.pop(key)
    # Sections added to the schema since (the headline, issue 12) are derived from the same records.
    for entry in fresh["runs"]:
        assert entry.pop("headline")["energy_kwh_with_pue"] == entry["totals"]["energy_kwh_with_pue"]["total"]
        # ... and the training curves, read from the metrics.jsonl the manifest lists (item 9).
        curve = entry.pop("curves")["tau=stochastic"]
        assert [point["step"] for point in curve] == [1, 2, 3] and all("loss" in point for point in curve)
    assert fresh == saved


def test_old_run_audits_clean_also_against_its_saved_report(fixture_copy: Path) -> None:
    saved = json.loads((fixture_copy / "finished-report.json").read_text())
    assert audit_run(Path("finished")) == []
    assert audit_run(Path("finished"), saved) == []
    assert audit_run(Path("interrupted")) == []


def test_finished_old_run_is_not_run_again(fixture_copy: Path) -> None:
    before = read_ledger(Path("finished/carbon.jsonl"))
    result = CliRunner().invoke(app, ["run", "recipe.toml", "--run", "finished", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert read_ledger(Path("finished/carbon.jsonl")) == before


def test_interrupted_old_run_resumes_to_the_student_of_the_uninterrupted_one(fixture_copy: Path) -> None:
    records = read_ledger(Path("interrupted/carbon.jsonl"))
    assert [(r["stage"], r["status"]) for r in records] == [("synthesis", "complete"), ("distillation", "interrupted")]
    result = CliRunner().invoke(app, ["run", "recipe.toml", "--run", "interrupted", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    records = read_ledger(Path("interrupted/carbon.jsonl"))
    assert records[-1]["stage"] == "distillation" and records[-1]["work"]["resumed_from_epoch"] == 1
    resumed = load_file("interrupted/student/student.safetensors")
    uninterrupted = load_file("finished/student/student.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    # `finished/` was trained on another CPU: its fp32 kernels round differently in the last bit (6e-8 seen
    # on the 2-core build machine), so equal means equal to fp32 rounding, not bit for bit, across machines.
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6)
    assert (
        summary["distillation"]["holdout_agreement"]
        == json.loads(Path("finished/manifest.json").read_text())["stages"]["distillation"]["result"][
            "holdout_agreement"
        ]
    )
    assert audit_run(Path("interrupted")) == []
