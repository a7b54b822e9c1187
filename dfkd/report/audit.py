"""`dfkd audit`: re-check everything a run dir states, without changing a byte of it.

Each problem is one line naming the place (a file, a ledger line, a manifest key or a report
field) and what differs; no problems means the run is consistent. Checked: every artifact against
its manifest sha256 and size; the ledger's hash chain and sequence; each record's own arithmetic
(the parts sum to the total, PUE and grid intensity applied); the report's totals against an
independent sum of the records and, given a saved JSON report, its every row and total against
the run; the manifest's stage sections against the ledger and the shards' metadata; and energy
snapshots of stages that are running or were killed and so are not in the ledger yet.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from dfkd.carbon.ledger import LEDGER_FILE, verify_ledger
from dfkd.errors import DfkdError
from dfkd.files import sha256_file, symlinks_under
from dfkd.manifest import MANIFEST_FILE, Manifest, load_manifest
from dfkd.report.audit_manifest import manifest_problems, short
from dfkd.report.build import ENERGY_PARTS, PHASE_OF_PART, REPORT_SCHEMA, build_report, phase_of

# The parts of a report's run section that are derived from the run and so must match it.
# `payback` only where the run has an inference benchmark: a saved report's payback must equal the re-derived one.
DERIVED = ("ledger", "rows", "totals", "phases", "interrupted", "artifacts", "payback")
MAX_REPORT_DIFFERENCES = 20


def _same(a: Any, b: Any) -> bool:
    """Equal, with floats compared to 1e-9 relative (sums may be taken in another order)."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) if numbers else a == b


def _load_manifest(run: Path) -> tuple[Manifest, list[str]]:
    try:
        manifest = load_manifest(run / MANIFEST_FILE)
    except DfkdError as exc:
        return {}, [f"{MANIFEST_FILE}: {exc}"]
    if manifest is None:
        return {}, [f"{MANIFEST_FILE}: missing, so no artifact can be checked"]
    return manifest, []


def _records(ledger: Path) -> list[tuple[int, dict[str, Any]]]:
    """The ledger's parseable records with their line numbers (verify_ledger reports the others)."""
    if not ledger.exists():
        return []
    records = []
    for number, line in enumerate(ledger.read_bytes().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append((number, record))
    return records


def _artifact_problems(run: Path, artifacts: dict[str, Any]) -> list[str]:
    """Every artifact the manifest lists must exist with its recorded size and sha256."""
    problems = []
    root = run.resolve()
    for relative, entry in sorted(artifacts.items()):
        path = run / relative
        if not path.resolve().is_relative_to(root):
            problems.append(f"manifest.json artifacts[{relative}]: points outside the run dir")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            problems.append(f"manifest.json artifacts[{relative}]: has no sha256")
            continue
        if not path.is_file():
            problems.append(f"{relative}: missing (the manifest lists it with sha256 {entry['sha256']})")
            continue
        size = path.stat().st_size
        if entry.get("bytes") != size:
            problems.append(f"{relative}: {size} bytes, but the manifest says {entry.get('bytes')}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            problems.append(f"{relative}: sha256 {digest}, but the manifest says {entry['sha256']}")
    return problems


def _ledger_problems(run: Path) -> list[str]:
    ledger = run / LEDGER_FILE
    if not ledger.exists():
        return ["carbon.jsonl: missing, so no stage of this run is accounted for"]
    return [f"carbon.jsonl {problem}" for problem in verify_ledger(ledger)]


def _ledger_head_problems(manifest: Manifest, records: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """The record the manifest pins (the last one when a stage ended) must still be in the ledger, unchanged."""
    head = manifest.get("ledger_head")
    if head is None:
        return []
    pinned = next((record for _, record in records if record.get("seq") == head["seq"]), None)
    if pinned is None:
        return [
            f"carbon.jsonl: manifest.json pins record seq {head['seq']}, which the ledger no longer holds "
            "(records cut from its end)"
        ]
    if pinned.get("record_sha256") != head["record_sha256"]:
        return [
            f"carbon.jsonl: record seq {head['seq']} differs from the one manifest.json pins "
            f"(sha256 {head['record_sha256'][:12]})"
        ]
    return []


def _record_problems(records: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """Each record's energy parts must sum to its total, with PUE and the grid intensity applied as stated."""
    problems = []
    for line, record in records:
        try:
            energy, with_pue, pue = record["energy_kwh"], record["energy_kwh_with_pue"], record["pue"]
            parts = [energy[part] for part in ("cpu", "gpu", "ram")]
            checks = [
                ("energy_kwh.total", energy["total"], None if None in parts else math.fsum(parts), "cpu + gpu + ram")
            ]
            checks += [
                (
                    f"energy_kwh_with_pue.{part}",
                    with_pue[part],
                    None if energy[part] is None else energy[part] * pue,
                    f"energy_kwh.{part} x PUE",
                )
                for part in ENERGY_PARTS
            ]
            intensity = record["carbon_intensity_g_per_kwh"]
            co2 = None if with_pue["total"] is None else with_pue["total"] * intensity
            checks.append(("co2eq_g", record["co2eq_g"], co2, "energy with PUE x carbon intensity"))
            checks += _phase_checks(record) + _rank_checks(record)
        except (KeyError, TypeError, AttributeError):
            problems.append(f"carbon.jsonl line {line}: lacks the energy fields of a ledger record")
            continue
        problems += [
            f"carbon.jsonl line {line} ({record.get('stage')}): {field} is {short(stated)}, "
            f"but {how} gives {short(expected)}"
            for field, stated, expected, how in checks
            if not _same(stated, expected)
        ]
    return problems


def _phase_checks(record: dict[str, Any]) -> list[tuple[str, Any, Any, str]]:
    """A record metered in phases: its phases (and the time outside them) sum to its own figures."""
    phases = record.get("phases")
    if phases is None:
        return []
    entries = list(phases.values())
    checks: list[tuple[str, Any, Any, str]] = []
    for part in ENERGY_PARTS:
        inside = [entry["energy_kwh"][part] for entry in entries]
        summed = None if None in inside else math.fsum(inside)
        checks.append((f"energy_kwh.{part}", record["energy_kwh"][part], summed, f"the sum of its phases' {part}"))
    durations = math.fsum(entry["duration_s"] for entry in entries)
    checks.append(("duration_s", record["duration_s"], durations, "the sum of its phases' durations"))
    flops = [entry.get("flops") for entry in entries]
    if record.get("flops") is not None or any(value is not None for value in flops):
        summed_flops = None if None in flops else math.fsum(flops)
        checks.append(("flops", record.get("flops"), summed_flops, "the sum of its phases' FLOPs"))
    return checks


def _rank_checks(record: dict[str, Any]) -> list[tuple[str, Any, Any, str]]:
    """A torchrun job's record: its ranks' shares, and its nodes' shares, each sum to its own energy, and it
    lists as many ranks as the job had."""
    job = record.get("distributed")
    if job is None:
        return []
    missing = sum(
        1 for failure in record["metering"]["failures"] if failure.endswith("left no record: its energy is missing")
    )
    checks: list[tuple[str, Any, Any, str]] = [
        (
            "distributed.world_size",
            job["world_size"],
            len(job["ranks"]) + missing,
            "the ranks it lists and those its metering failures name as missing",
        )
    ]
    for shares, what in ((job["ranks"], "ranks'"), (job["node_shares"], "nodes'")):
        for part in ENERGY_PARTS:
            values = [share["energy_kwh"][part] for share in shares]
            summed = None if None in values else math.fsum(values)
            checks.append((f"energy_kwh.{part}", record["energy_kwh"][part], summed, f"the sum of its {what} {part}"))
    return checks


def _phase_records(records: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    """The records of `phase`, and from each record metered in phases its share of `phase` as a record of
    its own (PUE and intensity applied as to the whole record; time outside the phases counts as other)."""
    found = [r for r in records if phase_of(r["stage"]) == phase and not r.get("phases")]
    for record in records:
        for name, entry in (record.get("phases") or {}).items():
            if PHASE_OF_PART.get(name, "other") != phase:
                continue
            with_pue = {
                p: None if entry["energy_kwh"][p] is None else entry["energy_kwh"][p] * record["pue"]
                for p in ENERGY_PARTS
            }
            total = with_pue["total"]
            found.append(
                {
                    "duration_s": entry["duration_s"],
                    "energy_kwh": entry["energy_kwh"],
                    "energy_kwh_with_pue": with_pue,
                    "co2eq_g": None if total is None else total * record["carbon_intensity_g_per_kwh"],
                    "flops": entry.get("flops"),
                }
            )
    return found


def _known_sum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return math.fsum(known) if known else None


def _sum_problems(place: str, totals: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """A report total against the records summed again here, independently of the report's own code."""
    expected = {
        "records": len(records),
        "unmetered": sum(r["energy_kwh"]["total"] is None for r in records),
        "duration_s": math.fsum(r["duration_s"] for r in records),
        **{f"energy_kwh.{p}": _known_sum([r["energy_kwh"][p] for r in records]) for p in ENERGY_PARTS},
        **{
            f"energy_kwh_with_pue.{p}": _known_sum([r["energy_kwh_with_pue"][p] for r in records]) for p in ENERGY_PARTS
        },
        "co2eq_g": _known_sum([r["co2eq_g"] for r in records]),
        "flops": _known_sum([r["flops"] for r in records]),
    }
    stated = {
        **{key: totals[key] for key in ("records", "unmetered", "duration_s", "co2eq_g", "flops")},
        **{f"energy_kwh.{p}": totals["energy_kwh"][p] for p in ENERGY_PARTS},
        **{f"energy_kwh_with_pue.{p}": totals["energy_kwh_with_pue"][p] for p in ENERGY_PARTS},
    }
    return [
        f"report {place}.{key}: {short(stated[key])}, but the ledger's records sum to {short(expected[key])}"
        for key in expected
        if not _same(stated[key], expected[key])
    ]


def _differences(place: str, saved: Any, fresh: Any) -> list[str]:
    """Where a saved report's value differs from the one derived from the run now."""
    if isinstance(saved, dict) and isinstance(fresh, dict):
        found = []
        for key in dict.fromkeys([*saved, *fresh]):
            if key not in fresh:
                found.append(f"{place}.{key}: in the report, but not derived from the run")
            elif key not in saved:
                found.append(f"{place}.{key}: missing from the report")
            else:
                found += _differences(f"{place}.{key}", saved[key], fresh[key])
        return found
    if isinstance(saved, list) and isinstance(fresh, list):
        if len(saved) != len(fresh):
            return [f"{place}: {len(saved)} entries in the report, {len(fresh)} derived from the run"]
        return [problem for i, pair in enumerate(zip(saved, fresh)) for problem in _differences(f"{place}[{i}]", *pair)]
    return (
        [] if _same(saved, fresh) else [f"{place}: {short(saved)} in the report, {short(fresh)} derived from the run"]
    )


def _saved_report_problems(report: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """A saved report's section for this run must equal the one built from the run now."""
    if report.get("schema") != REPORT_SCHEMA:
        return [f"report: schema {short(report.get('schema'))} is not {REPORT_SCHEMA}"]
    runs = [entry for entry in report.get("runs", []) if isinstance(entry, dict)]
    matching = [entry for entry in runs if entry.get("name") == fresh["name"]] or (runs if len(runs) == 1 else [])
    if not matching:
        return [f"report: has no section for run {fresh['name']}"]
    saved = matching[0]
    found = _differences(
        f"report runs[{saved.get('name')}]",
        {key: saved.get(key) for key in DERIVED},
        {key: fresh.get(key) for key in DERIVED},
    )
    extra = len(found) - MAX_REPORT_DIFFERENCES
    return found[:MAX_REPORT_DIFFERENCES] + ([f"report: ... and {extra} more differences"] if extra > 0 else [])


def _totals_problems(run: Path, records: list[dict[str, Any]], report: dict[str, Any] | None) -> list[str]:
    try:
        fresh = build_report([run])["runs"][0]
    except DfkdError as exc:
        return [f"report: cannot be built from this run ({exc})"]
    try:
        problems = _sum_problems("totals", fresh["totals"], records)
        problems += _sum_problems(
            "interrupted", fresh["interrupted"], [r for r in records if r["status"] != "complete"]
        )
        for phase, totals in fresh["phases"].items():
            problems += _sum_problems(f"phases.{phase}", totals, _phase_records(records, phase))
    except (KeyError, TypeError):
        problems = ["carbon.jsonl: records lack the fields a ledger record has, so the totals cannot be re-summed"]
    return problems + (_saved_report_problems(report, fresh) if report is not None else [])


def _link_problems(run: Path) -> list[str]:
    """A run dir holds files, not links: a link can point anywhere, so what it shows is not the run's."""
    return [
        f"{link.relative_to(run).as_posix()}: a symbolic link (to {os.readlink(link)}), not a file of the run"
        for link in symlinks_under(run)
    ]


def _pending_problems(run: Path) -> list[str]:
    """Energy snapshots of stages whose record is not in the ledger: their energy is missing from it."""
    problems = []
    for path in sorted(run.glob(".pending-*.json")):
        try:
            stage = json.loads(path.read_text()).get("stage", "?")
        except (OSError, json.JSONDecodeError, AttributeError):
            stage = "?"
        problems.append(
            f"{path.name}: stage {stage} is running or was killed; its energy is not in the ledger until the next "
            "stage on this run records it"
        )
    return problems


def audit_run(run: Path, report: dict[str, Any] | None = None) -> list[str]:
    """Every inconsistency found in `run` (and in `report`, a saved JSON report of it); [] means OK.

    Only reads the run dir. A path that is not a directory is a `DfkdError`.
    """
    run = Path(run)
    if not run.is_dir():
        raise DfkdError(f"run dir {run} does not exist: pass the directory given as --run")
    manifest, problems = _load_manifest(run)
    numbered = _records(run / LEDGER_FILE)
    records = [record for _, record in numbered]
    problems += _artifact_problems(run, manifest.get("artifacts", {}))
    problems += _ledger_problems(run)
    problems += _ledger_head_problems(manifest, numbered)
    problems += _record_problems(numbered)
    try:
        problems += manifest_problems(manifest, numbered, run)
    except (KeyError, TypeError, AttributeError):
        problems.append(
            "carbon.jsonl: records lack the fields a ledger record has, so the manifest cannot be checked against them"
        )
    problems += _pending_problems(run)
    problems += _link_problems(run)
    return problems + _totals_problems(run, records, report)


def audit_scope(run: Path, with_report: bool) -> list[str]:
    """What `audit_run` checks on this run, counted, so that an OK says what it vouches for."""
    run = Path(run)
    manifest = load_manifest(run / MANIFEST_FILE) or {}
    artifacts = manifest.get("artifacts", {})
    records = [record for _, record in _records(run / LEDGER_FILE)] if (run / LEDGER_FILE).exists() else []
    shards = sum(1 for entry in artifacts.values() if isinstance(entry, dict) and entry.get("role") == "shard")
    phased = sum(1 for record in records if record.get("phases"))
    jobs = sum(1 for record in records if record.get("distributed"))
    scope = [
        f"{len(artifacts)} artifacts re-hashed against manifest.json (and no unlisted shards or symbolic links)",
        f"{len(records)} ledger records: hash chain, the head pinned in manifest.json, each record's energy parts, "
        "PUE and CO2eq arithmetic",
        f"{shards} shards' metadata (method, config hash, teacher, index, count) against the manifest",
        "the manifest's recorded results against the ledger records that produced them",
        "totals, the generation/compression split and the interrupted sums re-derived from the records",
        "no meter snapshot left unrecorded",
    ]
    if phased:
        scope.insert(2, f"{phased} records metered in phases: phases sum to the record (energy, time, FLOPs)")
    if jobs:
        scope.insert(2, f"{jobs} records of torchrun jobs: every rank listed; ranks' and nodes' shares sum to them")
    if with_report:
        scope.append(
            "the saved report's ledger, rows, totals, phases, interrupted, artifacts and payback against the run"
        )
    return scope
