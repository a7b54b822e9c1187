"""The ledger: each record chained to the one before, and every edit, removal or swap detected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dfkd.carbon.ledger import GENESIS_SHA256, append_record, read_ledger, verify_ledger
from dfkd.errors import DfkdError
from dfkd.files import sha256_bytes


def _ledger_of(tmp_path: Path, n: int) -> Path:
    ledger = tmp_path / "carbon.jsonl"
    for i in range(n):
        append_record(ledger, {"stage": f"s{i}", "status": "complete", "co2eq_g": 0.1 * i})
    return ledger


def test_append_record_chains_each_line_to_the_previous(tmp_path: Path) -> None:
    ledger = _ledger_of(tmp_path, 3)
    lines = ledger.read_bytes().splitlines()
    records = read_ledger(ledger)
    assert [r["seq"] for r in records] == [0, 1, 2]
    assert records[0]["prev_sha256"] == GENESIS_SHA256
    assert records[1]["prev_sha256"] == sha256_bytes(lines[0])
    assert records[2]["prev_sha256"] == sha256_bytes(lines[1])
    assert verify_ledger(ledger) == []


def test_append_after_a_last_line_saved_without_its_newline(tmp_path: Path) -> None:
    ledger = _ledger_of(tmp_path, 2)
    ledger.write_bytes(ledger.read_bytes().rstrip(b"\n"))
    append_record(ledger, {"stage": "s2"})
    assert [r["seq"] for r in read_ledger(ledger)] == [0, 1, 2]
    assert verify_ledger(ledger) == []


def test_verify_reports_an_edited_line(tmp_path: Path) -> None:
    ledger = _ledger_of(tmp_path, 4)
    lines = ledger.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["co2eq_g"] = 0.0
    lines[1] = json.dumps(edited)
    ledger.write_text("\n".join(lines) + "\n")
    assert verify_ledger(ledger) == [
        "line 2: edited record (its content no longer matches its record_sha256)",
        "line 3: broken chain (prev_sha256 is not the sha256 of line 2)",
    ]


def test_verify_reports_a_removed_line(tmp_path: Path) -> None:
    ledger = _ledger_of(tmp_path, 4)
    lines = ledger.read_text().splitlines()
    del lines[1]
    ledger.write_text("\n".join(lines) + "\n")
    assert verify_ledger(ledger) == [
        "line 2: broken chain (prev_sha256 is not the sha256 of line 1)",
        "line 2: missing record seq 1 (expected before this line)",
    ]


def test_verify_reports_swapped_lines(tmp_path: Path) -> None:
    ledger = _ledger_of(tmp_path, 4)
    lines = ledger.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    ledger.write_text("\n".join(lines) + "\n")
    assert verify_ledger(ledger) == [
        "line 2: broken chain (prev_sha256 is not the sha256 of line 1)",
        "line 3: broken chain (prev_sha256 is not the sha256 of line 2)",
        "line 4: broken chain (prev_sha256 is not the sha256 of line 3)",
        "line 2: seq 2 out of order",
        "line 3: seq 1 out of order",
    ]


def test_read_ledger_names_the_malformed_line(tmp_path: Path) -> None:
    ledger = _ledger_of(tmp_path, 2)
    with open(ledger, "a") as f:
        f.write('{"stage": "cut off\n')
    with pytest.raises(DfkdError, match=r"line 3 is not valid JSON"):
        read_ledger(ledger)
    assert verify_ledger(ledger) == ["line 3: not valid JSON"]
