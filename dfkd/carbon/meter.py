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
from dfkd.collective import barrier, broadcast_object, gather_objects
from dfkd.device import resolve_device
from dfkd.distributed import RankError, current_world
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


def pending_path(ledger_path: Path, stage: str, rank: int = 0) -> Path:
    """Where the running stage's energy snapshot is kept, beside the ledger (one per rank under torchrun)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stage)
    return Path(ledger_path).parent / (f".pending-{name}.json" if rank == 0 else f".pending-{name}.rank-{rank}.json")


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
        # Under torchrun every rank's record carries rank 0's start: it names the job's record of the stage.
        self.start_utc = broadcast_object(utc_now())
        self.started = time.perf_counter()
        world = current_world()
        self.rank = (
            {
                "rank": {
                    "rank": world.rank,
                    "world_size": world.size,
                    "node": world.node,
                    "local_rank": world.local_rank,
                    "host": world.host,
                }
            }
            if world.several
            else {}
        )

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
            **self.rank,
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
    world = current_world()
    pending = pending_path(ledger_path, stage, world.rank)
    reported = threading.Event()
    meters = EnergyMeters(carbon, resolve_device(device), reported, host=world.meters_host)
    meters.start()
    outcome = StageOutcome(read_energy=meters.reading)
    recorder = _Recorder(stage, info, outcome)

    def write_snapshot() -> None:
        atomic_write_json(pending, recorder.record("running", None, meters.snapshot()))

    write_snapshot()
    snapshots = _Snapshots(write_snapshot, reported, carbon.flush_seconds)
    snapshots.start()
    error: str | None = None
    together = False  # an error every rank of the job raised at one point (`dfkd.collective.agree`)
    try:
        yield outcome
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        together = isinstance(exc, RankError)
        raise
    finally:
        snapshots.stop()
        section = meters.stop()
        if snapshots.error:
            section["metering"] = {"ok": False, "failures": section["metering"]["failures"] + [snapshots.error]}
        record = recorder.record("interrupted" if error else "complete", error, section)
        if not world.several:
            append_record(ledger_path, record)
            pending.unlink(missing_ok=True)
        else:
            _record_job(ledger_path, pending, record, failed=error is not None and not together)


def _record_job(ledger_path: Path, pending: Path, record: dict[str, Any], failed: bool) -> None:
    """Rank 0 appends the job's one record of the stage: the sum of every rank's, each rank's share listed.

    After a clean stage, or an error every rank raised together, the ranks hand their records over (a
    collective). After any other error no rank waits for
    the others (they may be gone): a failed rank leaves its final record as its snapshot, and rank 0
    combines its own with the snapshots the others left; a snapshot that arrives later is only deleted by
    `recover_pending`, since the job's record already names its start.
    """
    world = current_world()
    if failed:
        atomic_write_json(pending, record)
        if world.primary:
            peers = [(path, snapshot) for path, snapshot in _snapshots(ledger_path) if _same_run(snapshot, record)]
            others = [snapshot for _, snapshot in peers if snapshot["rank"]["rank"] != 0]
            append_record(ledger_path, combine_ranks([record, *others]))
            for path, _ in peers:
                path.unlink(missing_ok=True)
        return
    records = gather_objects(record)
    if world.primary:
        append_record(ledger_path, combine_ranks(records))
    barrier()  # the record is on disk before any rank drops the snapshot that would otherwise recover it
    pending.unlink(missing_ok=True)


def _same_run(snapshot: dict[str, Any], record: dict[str, Any]) -> bool:
    return (snapshot.get("stage"), snapshot.get("start_utc")) == (record["stage"], record["start_utc"])


def combine_ranks(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record of a stage from the records of a job's ranks (each carries its `rank`): every energy figure
    is the sum over the ranks (codecarbon's CPU and RAM once per node, by its local rank 0), CO2eq follows
    from the sum, and `distributed` lists each rank's and each node's share. A rank that left no record is
    named in the metering failures, so a figure without it never reads as complete."""
    records = sorted(records, key=lambda r: r["rank"]["rank"])
    base = {key: value for key, value in records[0].items() if key != "rank"}
    world_size = int(records[0]["rank"]["world_size"])

    def summed(key: str, members: list[dict[str, Any]] = records) -> dict[str, float | None]:
        parts = (*PARTS, "total")
        return {p: None if any(r[key][p] is None for r in members) else sum(r[key][p] for r in members) for p in parts}

    def total(key: str) -> float | None:
        values = [r.get(key) for r in records]
        return None if None in values else sum(values)  # type: ignore[arg-type]

    failures = [f"rank {r['rank']['rank']}: {f}" for r in records for f in r["metering"]["failures"]]
    present = {r["rank"]["rank"] for r in records}
    failures += [
        f"rank {rank} left no record: its energy is missing" for rank in range(world_size) if rank not in present
    ]
    with_pue = summed("energy_kwh_with_pue")
    intensity = base["carbon_intensity_g_per_kwh"]
    interrupted = next((r for r in records if r["status"] != "complete"), None)
    nodes: dict[int, dict[str, Any]] = {}
    for r in records:
        node = nodes.setdefault(r["rank"]["node"], {"node": r["rank"]["node"], "host": r["rank"]["host"], "ranks": []})
        node["ranks"].append(r["rank"]["rank"])
    for node in nodes.values():
        members = [r for r in records if r["rank"]["node"] == node["node"]]
        node["energy_kwh"] = summed("energy_kwh", members)
    return {
        **base,
        "status": interrupted["status"] if interrupted else "complete",
        "error": interrupted["error"] if interrupted else None,
        "end_utc": max(r["end_utc"] for r in records),
        "energy_kwh": summed("energy_kwh"),
        "energy_kwh_with_pue": with_pue,
        "gpu_energy_nvml_kwh": total("gpu_energy_nvml_kwh"),
        "gpu_energy_codecarbon_kwh": total("gpu_energy_codecarbon_kwh"),
        "co2eq_g": None if with_pue["total"] is None else with_pue["total"] * intensity,
        "metering": {"ok": not failures, "failures": failures},
        "distributed": {
            "world_size": world_size,
            "nodes": len(nodes),
            "ranks": [
                {
                    **{key: value for key, value in r["rank"].items() if key != "world_size"},
                    "device": r["device"]["name"],
                    "energy_kwh": r["energy_kwh"],
                    "energy_sources": r["energy_sources"],
                    "duration_s": r["duration_s"],
                }
                for r in records
            ],
            "node_shares": [nodes[n] for n in sorted(nodes)],
        },
    }


def _snapshots(ledger_path: Path) -> list[tuple[Path, dict[str, Any]]]:
    snapshots = []
    for path in Path(ledger_path).parent.glob(".pending-*.json"):
        try:
            snapshots.append((path, json.loads(path.read_text())))
        except FileNotFoundError:  # a rank finishing at the same moment deleted it
            continue
        except (OSError, json.JSONDecodeError) as exc:
            raise DfkdError(f"meter snapshot {path} is unreadable ({exc}): delete it to go on") from None
    return snapshots


def recover_pending(ledger_path: Path) -> list[dict[str, Any]]:
    """Turn snapshots left by killed processes into `interrupted` records; returns those appended.

    A snapshot whose stage already has its record (killed between appending and deleting it) is
    only deleted. The snapshots of one torchrun job's ranks (one stage, one start) become one record,
    their sum (`combine_ranks`). Call it at the start of every stage, holding the run dir's lock.
    """
    ledger_path = Path(ledger_path)
    recorded = {(r.get("stage"), r.get("start_utc")) for r in read_ledger(ledger_path)}
    runs: dict[tuple[Any, Any], list[tuple[Path, dict[str, Any]]]] = {}
    for path, snapshot in _snapshots(ledger_path):
        runs.setdefault((snapshot.get("stage"), snapshot.get("start_utc")), []).append((path, snapshot))
    appended = []
    for key, found in sorted(runs.items(), key=lambda item: item[0][1]):
        if key not in recorded:
            killed = f"process killed; energy measured up to the last flush at {max(s['end_utc'] for _, s in found)}"
            snapshots = [snapshot for _, snapshot in found]
            for snapshot in snapshots:
                if snapshot["status"] == "running":
                    snapshot["status"], snapshot["error"] = "interrupted", killed
            record = combine_ranks(snapshots) if "rank" in snapshots[0] else snapshots[0]
            appended.append(append_record(ledger_path, record))
        for path, _ in found:
            path.unlink(missing_ok=True)
    # A kill during a snapshot write leaves atomic_write_json's temporary file behind.
    for leftover in ledger_path.parent.glob("..pending-*.tmp"):
        leftover.unlink()
    return appended
