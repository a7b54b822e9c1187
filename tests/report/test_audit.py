"""`dfkd audit` on real tiny runs: passes untouched, and names the place after each kind of tampering."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_report import add_interrupted_attempts, make_run

from dfkd.carbon.meter import pending_path
from dfkd.errors import DfkdError
from dfkd.files import atomic_write_json
from dfkd.report.audit import audit_run
from dfkd.report.build import build_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    """A grid-tuned run (synthesis, two trials, selection): every kind of artifact and record."""
    base = tmp_path_factory.mktemp("audit-runs")
    return make_run(base / "grid", tiny_teacher, "grid:2,4")


@pytest.fixture
def run(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "grid"
    shutil.copytree(pristine, copy)
    return copy


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()
    }


def flip_shard_byte(run: Path) -> None:
    path = run / "synthetic" / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def ledger_lines(run: Path, change: Callable[[list[str]], None]) -> None:
    path = run / "carbon.jsonl"
    lines = path.read_text().splitlines()
    change(lines)
    path.write_text("\n".join(lines) + "\n")


def edit_line(lines: list[str]) -> None:
    record = json.loads(lines[1])
    record["co2eq_g"] /= 10  # a smaller footprint, with the record's hash left as it was
    lines[1] = json.dumps(record)


def remove_line(lines: list[str]) -> None:
    del lines[2]


def reorder_lines(lines: list[str]) -> None:
    lines[1], lines[2] = lines[2], lines[1]


def edit_manifest(run: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = run / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def forge_artifact_hash(manifest: dict[str, Any]) -> None:
    manifest["artifacts"]["student/student.safetensors"]["sha256"] = "0" * 64


def inflate_quality(manifest: dict[str, Any]) -> None:
    manifest["stages"]["synthesis"]["quality"]["target_agreement"] = 99.5


def inflate_trial(manifest: dict[str, Any]) -> None:
    manifest["stages"]["distillation"]["trials"]["tau=4"]["holdout_agreement"] = 12.5


def claim_more_epochs(manifest: dict[str, Any]) -> None:
    manifest["stages"]["distillation"]["config"]["epochs"] = 200


def drop_artifact_entry(manifest: dict[str, Any]) -> None:
    del manifest["artifacts"]["synthetic/preview.png"]


TAMPERING: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "shard byte flipped": (flip_shard_byte, ["synthetic/shard-00001.safetensors: sha256 "]),
    "ledger line edited": (
        lambda run: ledger_lines(run, edit_line),
        [
            "carbon.jsonl line 2: edited record",
            "carbon.jsonl line 3: broken chain",
            "carbon.jsonl line 2 (distillation[tau=2]): co2eq_g is ",
        ],
    ),
    "ledger line removed": (
        lambda run: ledger_lines(run, remove_line),
        [
            "carbon.jsonl line 3: broken chain",
            "carbon.jsonl line 3: missing record seq 2",
            "manifest.json stages.distillation.trials[tau=4]: the ledger has no complete record",
        ],
    ),
    "ledger lines reordered": (
        lambda run: ledger_lines(run, reorder_lines),
        [
            "carbon.jsonl line 2: seq 2 out of order",
            "carbon.jsonl line 3: seq 1 out of order",
            "carbon.jsonl line 2: broken chain",
        ],
    ),
    "manifest artifact hash edited": (
        lambda run: edit_manifest(run, forge_artifact_hash),
        ["student/student.safetensors: sha256 ", "but the manifest says " + "0" * 64],
    ),
    "manifest quality edited": (
        lambda run: edit_manifest(run, inflate_quality),
        ["manifest.json stages.synthesis.quality.target_agreement: 99.5 but ledger line 1 records"],
    ),
    "manifest trial result edited": (
        lambda run: edit_manifest(run, inflate_trial),
        ["manifest.json stages.distillation.trials[tau=4].holdout_agreement: 12.5 but ledger line 3 records"],
    ),
    "manifest config edited": (
        lambda run: edit_manifest(run, claim_more_epochs),
        [
            "manifest.json stages.distillation.config: no longer hashes to its recorded identity",
            "manifest.json stages.distillation.config.epochs: 200 but ledger line 2 records 1",
        ],
    ),
    "manifest entry removed": (
        lambda run: edit_manifest(run, drop_artifact_entry),
        ["manifest.json artifacts: lacks synthetic/preview.png, which ledger line 1 names as its preview"],
    ),
    "artifact deleted": (
        lambda run: (run / "student" / "tau=2" / "student.safetensors").unlink(),
        ["student/tau=2/student.safetensors: missing (the manifest lists it with sha256 "],
    ),
}


def test_an_untouched_run_passes_and_is_left_as_it_was(run: Path) -> None:
    before = snapshot(run)
    assert audit_run(run) == []
    assert audit_run(run, json.loads(json.dumps(build_report([run])))) == []
    assert snapshot(run) == before


@pytest.mark.parametrize("kind", TAMPERING)
def test_each_kind_of_tampering_is_found_and_located(run: Path, kind: str) -> None:
    tamper, expected = TAMPERING[kind]
    tamper(run)
    before = snapshot(run)
    problems = audit_run(run)
    for fragment in expected:
        assert any(fragment in problem for problem in problems), (fragment, problems)
    assert snapshot(run) == before  # the audit only reads


def test_a_saved_report_that_disagrees_with_the_run_is_named(run: Path) -> None:
    report = json.loads(json.dumps(build_report([run])))
    report["runs"][0]["totals"]["co2eq_g"] /= 2
    report["runs"][0]["rows"][2]["energy_kwh"]["gpu"] = 1.0
    problems = audit_run(run, report)
    assert any(p.startswith("report runs[grid].totals.co2eq_g: ") for p in problems)
    assert any(p.startswith("report runs[grid].rows[2].energy_kwh.gpu: 1.0 in the report") for p in problems)
    ledger_lines(run, remove_line)  # a ledger rewritten after the report was made no longer matches it
    assert any(p.startswith("report runs[grid].ledger.sha256") for p in audit_run(run, report))


def test_interrupted_attempts_pass_the_audit(run: Path) -> None:
    add_interrupted_attempts(run)
    assert audit_run(run) == []
    assert build_report([run])["runs"][0]["totals"]["interrupted"] == 2


def test_a_stage_not_yet_recorded_is_reported(run: Path) -> None:
    atomic_write_json(pending_path(run / "carbon.jsonl", "distillation"), {"stage": "distillation", "start_utc": "x"})
    (problem,) = audit_run(run)
    assert problem.startswith(".pending-distillation.json: stage distillation is running or was killed")


def test_a_missing_run_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(DfkdError, match="does not exist"):
        audit_run(tmp_path / "nowhere")
