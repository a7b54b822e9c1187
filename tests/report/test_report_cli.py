"""`dfkd report` and `dfkd audit` through the CLI: formats, --out, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_report import make_run
from typer.testing import CliRunner

from dfkd.carbon.ledger import read_ledger
from dfkd.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    base = tmp_path_factory.mktemp("report-cli")
    return make_run(base / "stochastic", tiny_teacher, "stochastic")


def test_report_json_to_stdout_has_every_record(run: Path) -> None:
    result = runner.invoke(app, ["report", str(run), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "dfkd.report/1"
    stages = [row["stage"] for row in report["runs"][0]["rows"]]
    assert stages == [record["stage"] for record in read_ledger(run / "carbon.jsonl")]


def test_report_html_out_writes_one_self_contained_file(run: Path, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(run), "--format", "html", "--out", str(target)])
    assert result.exit_code == 0, result.output
    page = target.read_text()
    assert page.lower().startswith("<!doctype html>") and "<svg" in page
    assert "http://" not in page and "https://" not in page.replace("https://www.w3.org", "")
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_of_a_missing_run_is_a_one_line_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_audit_ok_then_exit_1_naming_a_flipped_shard(run: Path, tmp_path: Path) -> None:
    ok = runner.invoke(app, ["audit", str(run)])
    assert ok.exit_code == 0 and ok.stdout.startswith("OK; checked:")
    manifest = json.loads((run / "manifest.json").read_text())
    records = len((run / "carbon.jsonl").read_text().splitlines())
    # The OK says what it vouches for, counted (issue 12: "list what it checked").
    assert f"{len(manifest['artifacts'])} artifacts re-hashed" in ok.stdout
    assert f"{records} ledger records: hash chain" in ok.stdout
    checked = json.loads(runner.invoke(app, ["audit", str(run), "--json"]).stdout)["checked"]
    assert any("shards' metadata" in line for line in checked)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shard = copy / "synthetic" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = runner.invoke(app, ["audit", str(copy), "--json"])
    assert bad.exit_code == 1
    verdict = json.loads(bad.stdout)
    assert verdict["ok"] is False
    assert any("synthetic/shard-00000.safetensors" in problem for problem in verdict["problems"])


def test_audit_notices_the_last_ledger_record_cut_off(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "cut"
    shutil.copytree(run, copy)
    ledger = copy / "carbon.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text("".join(lines[:-1]))
    result = runner.invoke(app, ["audit", str(copy)])
    assert result.exit_code == 1
    assert f"pins record seq {len(lines) - 1}" in result.stdout and "cut from its end" in result.stdout
