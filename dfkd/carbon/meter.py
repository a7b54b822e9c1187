"""The stage meter: energy, CO2eq and FLOPs of one stage, appended to the hash-chained ledger.

`meter(...)` wraps a stage from the outside, as codecarbon does: nothing runs on the stage's hot
path, so what is measured is the stage as it would run unmetered. On exit (normal, exception or
Ctrl-C) it appends exactly one record to `carbon.jsonl`. While the stage runs, a snapshot of the
energy so far is kept in `.pending-<stage>.json` beside the ledger, so a process killed with
SIGKILL still leaves a record once the next stage calls `recover_pending`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.ledger import append_record, read_ledger
from dfkd.carbon.sources import EnergyMeters
from dfkd.device import resolve_device
from dfkd.errors import DfkdError
from dfkd.files import atomic_write_json, package_versions, utc_now

PARTS = ("cpu", "gpu", "ram")
OUTSIDE_PHASES = "outside phases"


@dataclass
class StageOutcome:
    """What the stage runner reports while inside `meter`: its FLOPs, figures and amount of work, and
    the energy of its phases when it has any (`with outcome.phase("generation"): ...`)."""

    flops: float | None = None
    flops_method: str = "not counted"
    result: dict[str, Any] = field(default_factory=dict)
    work: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    read_energy: Callable[[], dict[str, float | None]] | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Bill what runs inside to phase `name` (entered as often as needed; the parts add up).

        The energy counters are read at both boundaries, so the phases and the time outside them sum to
        the stage's total exactly. A boundary costs a measurement (and, on a GPU, a device sync).
        """
        if self.read_energy is None or name == OUTSIDE_PHASES:
            raise ValueError(f"phase {name!r} cannot be metered here")
        start, started = self.read_energy(), time.perf_counter()
        try:
            yield
        finally:
            end = self.read_energy()
            entry = self.phases.setdefault(name, {"energy_kwh": dict.fromkeys(PARTS, 0.0), "duration_s": 0.0})
            entry["duration_s"] += time.perf_counter() - started
            for part in PARTS:
                before, after, so_far = start[part], end[part], entry["energy_kwh"][part]
                missing = before is None or after is None or so_far is None
                entry["energy_kwh"][part] = None if missing else so_far + after - before


def phase_section(
    phases: dict[str, dict[str, Any]], energy: dict[str, Any], duration_s: float, flops: float | None
) -> dict[str, Any]:
    """The record's `phases`: each phase's energy (parts and total), time and FLOPs, and what ran
    outside them, so that the figures of all entries sum to the stage's own."""
    section: dict[str, Any] = {}
    for name, entry in phases.items():
        parts = dict(entry["energy_kwh"])
        parts["total"] = None if None in parts.values() else sum(parts.values())
        section[name] = {"energy_kwh": parts, "duration_s": entry["duration_s"], "flops": entry.get("flops")}
    outside: dict[str, float | None] = {}
    for part in (*PARTS, "total"):
        inside = [entry["energy_kwh"][part] for entry in section.values()]
        outside[part] = None if energy[part] is None or None in inside else energy[part] - sum(inside)
    inside_flops = [entry["flops"] for entry in section.values()]
    section[OUTSIDE_PHASES] = {
        "energy_kwh": outside,
        "duration_s": duration_s - sum(entry["duration_s"] for entry in section.values()),
        "flops": None if flops is None or None in inside_flops else flops - sum(inside_flops),
    }
    return section


def pending_path(ledger_path: Path, stage: str) -> Path:
    """Where the running stage's energy snapshot is kept, beside the ledger."""
    return Path(ledger_path).parent / f".pending-{re.sub(r'[^A-Za-z0-9_.-]', '_', stage)}.json"


class _Snapshots(threading.Thread):
    """Writes a snapshot after each codecarbon measurement, and at least every two flush periods.

    The fallback keeps the GPU counter and elapsed time landing if codecarbon falls silent. A
    failed write is kept in `error` (the stage goes on; only kill protection is lost).
    """

    def __init__(self, write: Callable[[], None], reported: threading.Event, flush_seconds: float) -> None:
        super().__init__(name="dfkd-meter-snapshots", daemon=True)
        self._write = write
        self._reported = reported
        self._timeout = 2 * flush_seconds
        self._stopping = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        while True:
            self._reported.wait(self._timeout)
            self._reported.clear()
            if self._stopping.is_set():
                return
            try:
                self._write()
            except OSError as exc:
                self.error = self.error or f"energy snapshots could not be written ({exc}); a kill would go unrecorded"

    def stop(self) -> None:
        self._stopping.set()
        self._reported.set()
        self.join()


class _Recorder:
    """Builds the stage's record, final or snapshot, from the fixed fields, the outcome and the energy."""

    def __init__(self, stage: str, info: dict[str, Any] | None, outcome: StageOutcome) -> None:
        self.fixed = {"stage": stage, "info": dict(info or {})}
        self.outcome = outcome
        self.versions = package_versions()
        self.start_utc = utc_now()
        self.started = time.perf_counter()

    def record(self, status: str, error: str | None, section: dict[str, Any]) -> dict[str, Any]:
        duration = time.perf_counter() - self.started
        return {
            **self.fixed,
            "status": status,
            "error": error,
            "start_utc": self.start_utc,
            "end_utc": utc_now(),
            "duration_s": duration,
            **{key: value for key, value in section.items() if key != "metering"},
            "flops": self.outcome.flops,
            "flops_method": self.outcome.flops_method,
            "result": dict(self.outcome.result),
            "work": dict(self.outcome.work),
            # Only stages that meter phases carry them, so other records are as they always were.
            **(
                {"phases": phase_section(self.outcome.phases, section["energy_kwh"], duration, self.outcome.flops)}
                if self.outcome.phases
                else {}
            ),
            "metering": section["metering"],
            "versions": self.versions,
        }


@contextmanager
def meter(
    stage: str,
    ledger_path: Path,
    carbon: CarbonConfig,
    device: torch.device | str,
    info: dict[str, Any] | None = None,
) -> Iterator[StageOutcome]:
    """Meter the stage run inside the `with` block and append its record to the ledger on exit.

    The caller fills the yielded `StageOutcome`. An exception or Ctrl-C inside is recorded as
    `interrupted` with its type and message, then re-raised.
    """
    pending = pending_path(ledger_path, stage)
    reported = threading.Event()
    meters = EnergyMeters(carbon, resolve_device(device), reported)
    meters.start()
    outcome = StageOutcome(read_energy=meters.reading)
    recorder = _Recorder(stage, info, outcome)

    def write_snapshot() -> None:
        atomic_write_json(pending, recorder.record("running", None, meters.snapshot()))

    write_snapshot()
    snapshots = _Snapshots(write_snapshot, reported, carbon.flush_seconds)
    snapshots.start()
    error: str | None = None
    try:
        yield outcome
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise
    finally:
        snapshots.stop()
        section = meters.stop()
        if snapshots.error:
            section["metering"] = {"ok": False, "failures": section["metering"]["failures"] + [snapshots.error]}
        append_record(ledger_path, recorder.record("interrupted" if error else "complete", error, section))
        pending.unlink(missing_ok=True)


def recover_pending(ledger_path: Path) -> list[dict[str, Any]]:
    """Turn snapshots left by killed processes into `interrupted` records; returns those appended.

    A snapshot whose stage already has its record (killed between appending and deleting it) is
    only deleted. Call it at the start of every stage, holding the run dir's lock.
    """
    ledger_path = Path(ledger_path)
    recorded = {(r.get("stage"), r.get("start_utc")) for r in read_ledger(ledger_path)}
    snapshots = []
    for path in ledger_path.parent.glob(".pending-*.json"):
        try:
            snapshots.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            raise DfkdError(f"meter snapshot {path} is unreadable ({exc}): delete it to go on") from None
    appended = []
    for path, snapshot in sorted(snapshots, key=lambda item: item[1]["start_utc"]):
        if (snapshot["stage"], snapshot["start_utc"]) not in recorded:
            snapshot["status"] = "interrupted"
            snapshot["error"] = f"process killed; energy measured up to the last flush at {snapshot['end_utc']}"
            appended.append(append_record(ledger_path, snapshot))
        path.unlink()
    # A kill during a snapshot write leaves atomic_write_json's temporary file behind.
    for leftover in ledger_path.parent.glob("..pending-*.tmp"):
        leftover.unlink()
    return appended
