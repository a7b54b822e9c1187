"""Runs a stage's work inside the meter: the one place where stages and metering meet.

A stage function does its work and returns a `StageReport`; it never meters itself. `run_metered`
recovers records of runs that were killed, wraps the work in `meter`, counts FLOPs with the stage's
probe (one representative step under torch's flop counter, times the number of steps) and copies
the stage's figures into the ledger record.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.ledger import read_ledger
from dfkd.carbon.meter import StageOutcome, meter, recover_pending
from dfkd.distributed import current_world
from dfkd.rundir import RunDir

# `phase("generation")`: a context that bills what runs inside it to that phase of the stage's record.
Phase = Callable[[str], AbstractContextManager[None]]


@dataclass
class StageReport:
    """What a stage hands back: its figures, the work done, and how many FLOP units it did (in all, or
    per phase for a stage metered in phases)."""

    result: dict[str, Any]
    work: dict[str, Any]
    flops_units: int = 0
    phase_units: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FlopsPerUnit:
    """FLOPs of one unit of a stage's work (an image-step, a training image), counted before it runs."""

    flops: float
    unit: str


def run_metered(
    run: RunDir,
    stage: str,
    carbon: CarbonConfig,
    device: torch.device,
    info: dict[str, Any],
    work: Callable[[], StageReport],
    flops: FlopsPerUnit | None = None,
) -> StageReport:
    """Run `work` as one metered stage of `run`; exactly one ledger record is written, whatever happens.

    The FLOPs per unit are counted by the caller before the stage starts, so the counter's own cost is
    not billed to the stage and nothing runs between the stage's last file and its ledger record. A
    stage is finished only once that record is written. Afterwards the manifest pins the ledger's last
    record (seq and hash), so `dfkd audit` notices records cut from the ledger's end.
    """

    def fill(outcome: StageOutcome) -> StageReport:
        report = work()
        if flops is not None and report.flops_units > 0:
            outcome.flops = flops.flops * report.flops_units
            outcome.flops_method = f"counted by torch.utils.flop_counter on {_units(flops, report.flops_units)}"
        return report

    return _metered(run, stage, carbon, device, info, fill)


def run_metered_in_phases(
    run: RunDir,
    stage: str,
    carbon: CarbonConfig,
    device: torch.device,
    info: dict[str, Any],
    work: Callable[[Phase], StageReport],
    flops: dict[str, FlopsPerUnit],
) -> StageReport:
    """`run_metered` for a stage whose work alternates between phases (the interleaved mode's
    generation and compression): `work(phase)` enters `phase(name)` around each part, and the record
    carries each phase's energy, time and FLOPs (`flops[name]` per unit x the report's `phase_units`)."""

    def fill(outcome: StageOutcome) -> StageReport:
        report = work(outcome.phase)
        counted = {name: units for name, units in report.phase_units.items() if units > 0 and name in flops}
        if counted:
            # A phase entered but given no unit of work (a resumed run with only the other phase's work left)
            # did 0 FLOPs, not an unknown number: otherwise its phases would not sum to the record's FLOPs.
            for name in {*counted, *(entered for entered in outcome.phases if entered in flops)}:
                outcome.phases.setdefault(name, {"energy_kwh": {}, "duration_s": 0.0})["flops"] = flops[
                    name
                ].flops * counted.get(name, 0)
            outcome.flops = sum(flops[name].flops * units for name, units in counted.items())
            outcome.flops_method = "counted by torch.utils.flop_counter on " + " + ".join(
                f"{name}: {_units(flops[name], units)}" for name, units in counted.items()
            )
        return report

    return _metered(run, stage, carbon, device, info, fill)


def _units(flops: FlopsPerUnit, units: int) -> str:
    return f"one {flops.unit} ({flops.flops:.4g} FLOPs) x {units} {flops.unit}s"


def _metered(
    run: RunDir,
    stage: str,
    carbon: CarbonConfig,
    device: torch.device,
    info: dict[str, Any],
    fill: Callable[[StageOutcome], StageReport],
) -> StageReport:
    primary = current_world().primary  # under torchrun, rank 0 alone writes the ledger and the manifest
    if primary:
        recover_pending(run.ledger_path)
    try:
        with meter(stage, run.ledger_path, carbon, device, info) as outcome:
            report = fill(outcome)
            outcome.result = report.result
            outcome.work = report.work
    finally:
        records = read_ledger(run.ledger_path) if primary else []
        if records:  # empty only when the meter failed to start (nothing was recorded, nothing ran)
            last = records[-1]
            run.update_manifest(ledger_head={"seq": last["seq"], "record_sha256": last["record_sha256"]})
    return report


def finished_record(run: RunDir, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """The last complete ledger record that `wanted` accepts: a stage is done only when it has one."""
    found = [record for record in read_ledger(run.ledger_path) if record.get("status") == "complete" and wanted(record)]
    return found[-1] if found else None
