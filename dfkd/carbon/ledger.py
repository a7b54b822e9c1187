"""The ledger: one JSON record per metered stage, hash-chained, appended durably. No torch here.

Each line of `carbon.jsonl` is one JSON record; `prev_sha256` is the sha256 of the previous line and
`record_sha256` that of the record itself, so an edited, removed or reordered line is detected by
`verify_ledger` (a truncated tail is not: nothing after it names it; the manifest's `ledger_head`
pins the last record for that).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dfkd.errors import DfkdError
from dfkd.files import sha256_bytes

LEDGER_SCHEMA = "dfkd.ledger/1"
LEDGER_FILE = "carbon.jsonl"
GENESIS_SHA256 = "0" * 64


def _dumps(obj: dict[str, Any]) -> str:
    """The one serialization for writing and hashing, so a parsed line re-dumps to the bytes it hashed."""
    return json.dumps(obj, sort_keys=False)


def _record_sha256(record: dict[str, Any]) -> str:
    """The sha256 of a record's JSON without its own `record_sha256` field."""
    body = {key: value for key, value in record.items() if key != "record_sha256"}
    return sha256_bytes(_dumps(body).encode())


def _ledger_lines(ledger_path: Path) -> list[bytes]:
    try:
        return Path(ledger_path).read_bytes().splitlines()
    except FileNotFoundError:
        return []


def _parse_line(ledger_path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DfkdError(
            f"ledger {ledger_path} line {number} is not valid JSON ({exc.msg}): "
            "restore the ledger from a backup or move it aside to start a new one"
        ) from None
    if not isinstance(record, dict):
        raise DfkdError(f"ledger {ledger_path} line {number} is not a JSON object: restore the ledger or move it aside")
    return record


def read_ledger(ledger_path: Path) -> list[dict[str, Any]]:
    """All records of the ledger, oldest first; a missing ledger has none."""
    return [_parse_line(ledger_path, n, line) for n, line in enumerate(_ledger_lines(ledger_path), 1)]


def append_record(ledger_path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Chain `record` to the ledger's last line and append it durably; returns the record as written.

    The line is written with O_APPEND in one write and fsynced, so it is either wholly on disk or
    not there. Callers hold the run dir's lock, so no other writer interleaves.
    """
    ledger_path = Path(ledger_path)
    existing = ledger_path.read_bytes() if ledger_path.exists() else b""
    lines = existing.splitlines()
    if lines:
        last = _parse_line(ledger_path, len(lines), lines[-1])
        if not isinstance(last.get("seq"), int):
            raise DfkdError(
                f"ledger {ledger_path} line {len(lines)} has no integer seq: restore the ledger or move it aside"
            )
        seq, prev = last["seq"] + 1, sha256_bytes(lines[-1])
    else:
        seq, prev = 0, GENESIS_SHA256
    chain_fields = ("schema", "seq", "prev_sha256", "record_sha256")
    fields = {key: value for key, value in record.items() if key not in chain_fields}
    written = {"schema": LEDGER_SCHEMA, "seq": seq, "prev_sha256": prev, **fields}
    written["record_sha256"] = _record_sha256(written)
    ledger_path.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a ledger replaced by a link must not append to whatever file it points at.
    fd = os.open(ledger_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        # A last line saved without its newline (by an editor) must not swallow this one.
        separator = b"\n" if existing and not existing.endswith(b"\n") else b""
        f.write(separator + (_dumps(written) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    return written


def verify_ledger(ledger_path: Path) -> list[str]:
    """Problems found in the ledger, one human-readable line each; an empty list means intact."""
    lines = _ledger_lines(ledger_path)
    problems: list[str] = []
    seqs: list[tuple[int, int]] = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"line {n}: not valid JSON")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {n}: not a JSON object")
            continue
        if record.get("record_sha256") != _record_sha256(record):
            problems.append(f"line {n}: edited record (its content no longer matches its record_sha256)")
        if n == 1 and record.get("prev_sha256") != GENESIS_SHA256:
            problems.append("line 1: broken chain (prev_sha256 is not 64 zeros: the records before it are gone)")
        elif n > 1 and record.get("prev_sha256") != sha256_bytes(lines[n - 2]):
            problems.append(f"line {n}: broken chain (prev_sha256 is not the sha256 of line {n - 1})")
        if isinstance(record.get("seq"), int):
            seqs.append((n, record["seq"]))
        else:
            problems.append(f"line {n}: seq missing or not an integer")
    problems += _seq_problems(seqs)
    return problems


def _seq_problems(seqs: list[tuple[int, int]]) -> list[str]:
    """Duplicate, out-of-order and missing seq numbers, given (line, seq) pairs in file order."""
    problems = []
    first_line: dict[int, int] = {}
    for n, seq in seqs:
        if seq in first_line:
            problems.append(f"line {n}: duplicate seq {seq} (also on line {first_line[seq]})")
        first_line.setdefault(seq, n)
    in_order = sorted(seqs, key=lambda pair: pair[1])
    for (n, seq), expected in zip(seqs, in_order):
        if (n, seq) != expected:
            problems.append(f"line {n}: seq {seq} out of order")
    if seqs:
        for missing in sorted(set(range(max(seq for _, seq in seqs) + 1)) - set(first_line)):
            before = min(n for n, seq in seqs if seq > missing)
            problems.append(f"line {before}: missing record seq {missing} (expected before this line)")
    return problems
