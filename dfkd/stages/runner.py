"""Runs a stage's work inside the meter: the one place where stages and metering meet.

A stage function does its work and returns a `StageReport`; it never meters itself. `run_metered`
recovers records of runs that were killed, wraps the work in `meter`, counts FLOPs with the stage's
probe (one representative step under torch's flop counter, times the number of steps) and copies
the stage's figures into the ledger record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.ledger import read_ledger
from dfkd.carbon.meter import meter, recover_pending
from dfkd.rundir import RunDir


@dataclass
class StageReport:
    """What a stage hands back: its figures, the work done, and how to count its FLOPs."""

    result: dict[str, Any]
    work: dict[str, Any]
    flops_probe: Callable[[], float] | None = None
    flops_units: int = 0
    flops_unit_name: str = "image-step"


def run_metered(
    run: RunDir,
    stage: str,
    carbon: CarbonConfig,
    device: torch.device,
    info: dict[str, Any],
    work: Callable[[], StageReport],
) -> StageReport:
    """Run `work` as one metered stage of `run`; exactly one ledger record is written, whatever happens.

    Afterwards the manifest pins the ledger's last record (seq and hash), so `dfkd audit` notices
    records cut from the ledger's end, which the hash chain alone cannot show.
    """
    recover_pending(run.ledger_path)
    try:
        with meter(stage, run.ledger_path, carbon, device, info) as outcome:
            report = work()
            outcome.result = report.result
            outcome.work = report.work
            if report.flops_probe is not None and report.flops_units > 0:
                per_unit = report.flops_probe()
                outcome.flops = per_unit * report.flops_units
                outcome.flops_method = (
                    f"counted by torch.utils.flop_counter on one {report.flops_unit_name} "
                    f"({per_unit:.4g} FLOPs) x {report.flops_units} {report.flops_unit_name}s"
                )
    finally:
        last = read_ledger(run.ledger_path)[-1]
        run.update_manifest(ledger_head={"seq": last["seq"], "record_sha256": last["record_sha256"]})
    return report
