"""The stage meter, with real codecarbon measuring this machine's CPU; kills and their recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.ledger import GENESIS_SHA256, read_ledger, verify_ledger
from dfkd.carbon.meter import meter, pending_path, recover_pending

FAST = CarbonConfig(flush_seconds=0.2)
CPU_LABELS = ("RAPL counter (measured", "TDP x load estimate", "constant estimate")


def busy(seconds: float) -> int:
    """Matmuls for `seconds`; returns how many ran."""
    a = torch.randn(256, 256)
    deadline, steps = time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline:
        a @ a
        steps += 1
    return steps


def test_cpu_stage_gives_one_complete_measured_record(tmp_path: Path) -> None:
    ledger = tmp_path / "carbon.jsonl"
    with meter("synthesize", ledger, FAST, "cpu", info={"method": "nayer", "tau": "fixed"}) as outcome:
        assert pending_path(ledger, "synthesize").exists()
        steps = busy(1.0)
        outcome.flops, outcome.flops_method = 2.0 * 256**3 * steps, f"analytic, {steps} matmuls"
        outcome.result, outcome.work = {"acc": 0.5}, {"image_steps": steps}

    (record,) = read_ledger(ledger)
    assert (record["schema"], record["seq"], record["prev_sha256"]) == ("dfkd.ledger/1", 0, GENESIS_SHA256)
    assert (record["stage"], record["status"], record["error"]) == ("synthesize", "complete", None)
    assert record["info"] == {"method": "nayer", "tau": "fixed"}
    assert 1.0 <= record["duration_s"] < 5
    energy = record["energy_kwh"]
    assert energy["cpu"] > 0 and energy["ram"] > 0 and energy["gpu"] == 0.0
    assert energy["total"] == pytest.approx(energy["cpu"] + energy["ram"])
    sources = record["energy_sources"]
    assert sources["cpu"].startswith(CPU_LABELS)
    assert sources["ram"].startswith("fixed estimate") and "not measured" in sources["ram"]
    assert sources["gpu"] == "no GPU used" and record["gpu_energy_nvml_kwh"] is None
    from codecarbon.input import DataSource

    usa = DataSource().get_global_energy_mix_data()["USA"]["carbon_intensity"]
    assert record["carbon_intensity_g_per_kwh"] == pytest.approx(usa)
    assert record["carbon_intensity_source"].startswith("codecarbon offline energy mix, USA")
    assert record["co2eq_g"] > 0
    assert record["co2eq_g"] == record["energy_kwh_with_pue"]["total"] * record["carbon_intensity_g_per_kwh"]
    assert record["flops"] == 2.0 * 256**3 * steps and record["work"] == {"image_steps": steps}
    assert record["result"] == {"acc": 0.5}
    assert record["metering"] == {"ok": True, "failures": []}
    assert record["versions"]["codecarbon"] == metadata.version("codecarbon")
    assert not pending_path(ledger, "synthesize").exists()
    assert verify_ledger(ledger) == []


@pytest.mark.parametrize("raised", [ValueError("bad batch"), KeyboardInterrupt()])
def test_exception_inside_is_recorded_as_interrupted_and_reraised(tmp_path: Path, raised: BaseException) -> None:
    ledger = tmp_path / "carbon.jsonl"
    with pytest.raises(type(raised)):
        with meter("distill", ledger, FAST, "cpu"):
            busy(0.3)
            raise raised
    (record,) = read_ledger(ledger)
    assert record["status"] == "interrupted"
    assert record["error"] == ("ValueError: bad batch" if isinstance(raised, ValueError) else "KeyboardInterrupt")
    assert record["energy_kwh"]["total"] > 0
    assert not pending_path(ledger, "distill").exists()


def test_codecarbon_returning_none_is_a_metering_failure_not_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from codecarbon import OfflineEmissionsTracker

    real_stop = OfflineEmissionsTracker.stop

    def swallowing_stop(self: OfflineEmissionsTracker) -> None:
        real_stop(self)
        del self.final_emissions_data  # what codecarbon leaves when its @suppress swallows an error

    monkeypatch.setattr(OfflineEmissionsTracker, "stop", swallowing_stop)
    ledger = tmp_path / "carbon.jsonl"
    with meter("distill", ledger, FAST, "cpu"):
        busy(0.2)
    (record,) = read_ledger(ledger)
    assert record["energy_kwh"] == {"cpu": None, "gpu": 0.0, "ram": None, "total": None}
    assert record["energy_kwh_with_pue"]["total"] is None and record["co2eq_g"] is None
    assert record["energy_sources"]["cpu"] == "not measured"
    assert record["metering"]["ok"] is False
    assert "codecarbon reported no energy" in record["metering"]["failures"][0]


def test_user_grid_intensity_and_pue_are_applied_exactly(tmp_path: Path) -> None:
    ledger = tmp_path / "carbon.jsonl"
    with meter("teacher", ledger, CarbonConfig(grid_g_per_kwh=123.0, flush_seconds=0.2), "cpu"):
        busy(0.3)
    (record,) = read_ledger(ledger)
    assert record["pue"] == 1.67
    for part in ("cpu", "gpu", "ram", "total"):
        assert record["energy_kwh_with_pue"][part] == pytest.approx(1.67 * record["energy_kwh"][part], rel=1e-12)
    assert record["energy_kwh_with_pue"]["total"] > 0
    assert record["carbon_intensity_g_per_kwh"] == 123.0
    assert record["carbon_intensity_source"].startswith("given by the user")
    assert record["co2eq_g"] == record["energy_kwh_with_pue"]["total"] * 123.0


def test_unknown_country_is_refused_when_the_config_is_made() -> None:
    with pytest.raises(ValueError, match="'XYZ' is not in codecarbon's energy-mix table.*grid_g_per_kwh"):
        CarbonConfig(country="XYZ")
    with pytest.raises(ValueError, match=r"'FRX'.*did you mean .*FRA"):
        CarbonConfig(country="FRX")
    assert CarbonConfig(country="fra").country == "fra", "codes are matched regardless of case"


KILLED_STAGE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from dfkd.carbon.config import CarbonConfig
    from dfkd.carbon.meter import meter

    with meter("synthesize", Path(sys.argv[1]), CarbonConfig(flush_seconds=0.2), "cpu", {"method": "kill"}):
        a = torch.randn(256, 256)
        while True:
            a @ a
    """
)


def test_sigkilled_stage_is_recovered_as_interrupted_with_energy_up_to_the_last_flush(tmp_path: Path) -> None:
    ledger = tmp_path / "carbon.jsonl"
    pending = pending_path(ledger, "synthesize")
    child = subprocess.Popen([sys.executable, "-c", KILLED_STAGE, str(ledger)])
    try:
        deadline = time.monotonic() + 60
        while not (pending.exists() and json.loads(pending.read_text())["duration_s"] >= 0.5):
            assert child.poll() is None and time.monotonic() < deadline, "the metered child never flushed"
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert not ledger.exists()
    snapshot = json.loads(pending.read_text())

    (record,) = recover_pending(ledger)
    assert record["status"] == "interrupted"
    assert record["error"] == f"process killed; energy measured up to the last flush at {snapshot['end_utc']}"
    assert record["energy_kwh"] == snapshot["energy_kwh"] and record["energy_kwh"]["total"] > 0
    assert record["co2eq_g"] == snapshot["co2eq_g"] > 0
    assert record["duration_s"] >= 0.5 and record["info"] == {"method": "kill"}
    assert read_ledger(ledger) == [record]
    assert not pending.exists() and verify_ledger(ledger) == []
    assert recover_pending(ledger) == []


def test_recover_pending_skips_a_snapshot_whose_record_was_already_appended(tmp_path: Path) -> None:
    ledger = tmp_path / "carbon.jsonl"
    with meter("distill", ledger, FAST, "cpu"):
        leftover = pending_path(ledger, "distill").read_bytes()
    pending_path(ledger, "distill").write_bytes(leftover)  # as if killed between append and delete
    assert recover_pending(ledger) == []
    assert len(read_ledger(ledger)) == 1 and not pending_path(ledger, "distill").exists()


def test_phases_are_measured_at_their_boundaries_and_sum_to_the_record(tmp_path: Path) -> None:
    from dfkd.carbon.meter import OUTSIDE_PHASES
    from dfkd.report.audit import _record_problems

    ledger = tmp_path / "carbon.jsonl"
    with meter("interleaved", ledger, FAST, "cpu") as outcome:
        for _ in range(2):  # rounds: each enters both phases again
            with outcome.phase("generation"):
                busy(0.3)
            with outcome.phase("compression"):
                busy(0.6)
        busy(0.2)
    (record,) = read_ledger(ledger)
    phases = record["phases"]
    assert list(phases) == ["generation", "compression", OUTSIDE_PHASES]
    assert phases["compression"]["duration_s"] > phases["generation"]["duration_s"] > 0.5
    for part in ("cpu", "gpu", "ram", "total"):
        assert sum(p["energy_kwh"][part] for p in phases.values()) == pytest.approx(record["energy_kwh"][part])
    assert phases["compression"]["energy_kwh"]["cpu"] > phases["generation"]["energy_kwh"]["cpu"] > 0
    assert _record_problems([(1, record)]) == []
    edited = json.loads(json.dumps(record))
    edited["phases"]["generation"]["energy_kwh"]["cpu"] *= 2
    assert any("the sum of its phases' cpu" in p for p in _record_problems([(1, edited)]))


def test_a_stage_without_phases_records_none(tmp_path: Path) -> None:
    from dfkd.carbon.meter import StageOutcome

    with meter("synthesis", tmp_path / "carbon.jsonl", FAST, "cpu"):
        pass
    assert "phases" not in read_ledger(tmp_path / "carbon.jsonl")[0], "a two-stage record is as it always was"
    with pytest.raises(ValueError, match="cannot be metered here"):
        with StageOutcome().phase("generation"):
            pass


def test_a_phase_entered_without_work_counts_zero_flops_so_the_phases_sum(tmp_path: Path) -> None:
    """A resumed interleaved run can enter generation with no batch left to make: 0 FLOPs there, not unknown
    (the audit once found such a record's phases not summing to its FLOPs)."""
    from dfkd.report.audit import _phase_checks
    from dfkd.rundir import RunDir
    from dfkd.stages.runner import FlopsPerUnit, StageReport, run_metered_in_phases

    run = RunDir.open(tmp_path / "run")

    def work(phase):  # noqa: ANN001, ANN202
        with phase("generation"):
            pass  # nothing left to make
        with phase("compression"):
            busy(0.05)
        return StageReport(result={}, work={}, phase_units={"generation": 0, "compression": 3})

    flops = {"generation": FlopsPerUnit(10.0, "image-step"), "compression": FlopsPerUnit(7.0, "KD step")}
    carbon = CarbonConfig(grid_g_per_kwh=400)
    run_metered_in_phases(run, "interleaved", carbon, torch.device("cpu"), {}, work, flops)
    (record,) = read_ledger(run.ledger_path)
    assert record["phases"]["generation"]["flops"] == 0.0 and record["phases"]["compression"]["flops"] == 21.0
    assert record["flops"] == 21.0
    checks = {figure: (saved, derived) for figure, saved, derived, _ in _phase_checks(record)}
    assert checks["flops"] == (21.0, 21.0)
