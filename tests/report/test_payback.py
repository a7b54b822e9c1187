"""The carbon payback's arithmetic against hand-computed values (issue 14), on report rows built by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dfkd.carbon.ledger import read_ledger
from dfkd.cli import app
from dfkd.config.recipe import EMBEDDED_TEACHER_PATH, RECIPES_DIR
from dfkd.report.audit import audit_run
from dfkd.report.build import PHASES, phase_shares, sum_rows
from dfkd.report.format import payback_line, payback_rows
from dfkd.report.html import payback_series, render_html
from dfkd.report.payback import carbon_payback
from dfkd.report.render import render_markdown

QUICKSTART = str(RECIPES_DIR / "quickstart.toml")

INTENSITY = 400.0  # g CO2eq per kWh, PUE 1: every figure below is easy to check by hand


def _energy(kwh: float) -> dict[str, float]:
    return {"cpu": kwh, "gpu": 0.0, "ram": 0.0, "total": kwh}


def row(stage: str, phase: str, kwh: float, tau_mode: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "seq": extra.pop("seq", 0),
        "record_sha256": "ab" * 32,
        "stage": stage,
        "phase": phase,
        "status": extra.pop("status", "complete"),
        "tau_mode": tau_mode,
        "device": "cpu",
        "device_model": "a test CPU",
        "duration_s": 1.0,
        "energy_kwh": _energy(kwh),
        "energy_kwh_with_pue": _energy(kwh),
        "co2eq_g": kwh * INTENSITY,
        "carbon_intensity_g_per_kwh": INTENSITY,
        "flops": None,
        "sources": {"carbon_intensity": "given"},
        "info": extra.pop("info", {}),
        **extra,
    }


def part(phase: str, kwh: float) -> dict[str, Any]:
    return {"phase": phase, "status": "complete", "duration_s": 0.5, "energy_kwh": _energy(kwh),
            "energy_kwh_with_pue": _energy(kwh), "co2eq_g": kwh * INTENSITY, "flops": None}  # fmt: skip


def benchmark(teacher_kwh: float, student_kwh: float, images: int = 1000) -> dict[str, Any]:
    parts = {"teacher-inference": part("inference", teacher_kwh), "student-inference": part("inference", student_kwh)}
    info = {
        "images": images,
        "batch_size": 64,
        "precision": "fp32",
        "teacher": {"sha256": "t" * 64},
        "student": {"sha256": "s" * 64},
    }
    return row("inference-benchmark", "inference", teacher_kwh + student_kwh, seq=9, parts=parts, info=info)


def payback_of(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return carbon_payback(rows, {phase: sum_rows(phase_shares(rows, phase)) for phase in PHASES})


def test_the_student_repays_the_run_after_cost_over_saving_per_inference() -> None:
    rows = [row("synthesis", "generation", 0.010), row("distillation", "compression", 0.020), benchmark(0.002, 0.0005)]
    found = payback_of(rows)
    assert found is not None
    assert found["teacher_per_1000"] == pytest.approx({"energy_kwh_with_pue": 0.002, "co2eq_g": 0.8})
    assert found["student_per_1000"] == pytest.approx({"energy_kwh_with_pue": 0.0005, "co2eq_g": 0.2})
    assert found["saved_per_1000"] == pytest.approx({"energy_kwh_with_pue": 0.0015, "co2eq_g": 0.6})
    assert found["cost"] == pytest.approx({"energy_kwh_with_pue": 0.030, "co2eq_g": 12.0})
    # 12 g / (0.6 g per 1,000) = 20,000 inferences; the same on energy at one intensity.
    assert found["inferences_to_repay"] == pytest.approx(20_000)
    assert found["inferences_to_repay_energy"] == pytest.approx(20_000)
    assert found["tuning_extra"] is None and found["benchmark"] == {
        "seq": 9,
        "record_sha256": "ab" * 32,
        "images": 1000,
    }
    assert "repays the run's 12 g after 20,000 inferences" in payback_line(found)
    assert payback_rows(found)[3] == ["the run: generation + compression", "0.03", "12", "20,000"]
    teacher, student = payback_series(found)
    assert teacher[2][-1] == pytest.approx((40_000, 32.0)) and student[2][-1] == pytest.approx((40_000, 20.0))


def test_a_grid_search_breaks_out_the_tuning_beyond_one_trial() -> None:
    trials = [row("distillation[tau=2]", "compression", 0.005, "grid") for _ in range(3)]
    rows = [row("synthesis", "generation", 0.010), *trials, row("selection", "compression", 0.00125)]
    found = payback_of([*rows, benchmark(0.002, 0.0005, images=500)])
    assert found is not None
    # Per 1,000: the phases ran 500 images each, so twice the phase energy.
    assert found["saved_per_1000"]["co2eq_g"] == pytest.approx(1.2)
    # Tuning: 3 trials (2 g each) + selection (0.5 g) - one mean trial (2 g) = 4.5 g -> 3,750 inferences.
    assert found["tuning_extra"]["co2eq_g"] == pytest.approx(4.5)
    assert found["tuning_extra"]["inferences_to_repay"] == pytest.approx(3_750)
    assert found["cost"]["co2eq_g"] == pytest.approx(4.0 + 6.0 + 0.5)


def test_no_saving_means_no_payback_and_no_benchmark_no_section() -> None:
    rows = [row("synthesis", "generation", 0.010), row("distillation", "compression", 0.020)]
    assert payback_of(rows) is None
    found = payback_of([*rows, benchmark(0.001, 0.002)])
    assert found is not None and found["inferences_to_repay"] is None
    assert any("never repaid" in note for note in found["caveats"])
    assert "never repays the run" in payback_line(found) and payback_series(found) == []
    alone = payback_of([benchmark(0.002, 0.0005)])  # a benchmark-only run dir: nothing to repay
    assert alone is not None and alone["cost"] == {"energy_kwh_with_pue": None, "co2eq_g": None}
    assert "holds no generation or compression records to repay" in payback_line(alone)
    assert payback_rows(alone)[3][3] == "-"
    # A phase that read no energy is unknown, not free: no payback figure rather than a wrong one.
    unread = payback_of([*rows, benchmark(0.002, 0.0)])
    assert unread is not None and unread["student_per_1000"] == {"energy_kwh_with_pue": None, "co2eq_g": None}
    assert unread["inferences_to_repay"] is None and any("read no energy" in note for note in unread["caveats"])
    # Only a benchmark of the run's own teacher and student counts.
    phases = {phase: sum_rows(phase_shares(rows, phase)) for phase in PHASES}
    assert carbon_payback([*rows, benchmark(0.002, 0.0005)], phases, "t" * 64, "s" * 64) is not None
    assert carbon_payback([*rows, benchmark(0.002, 0.0005)], phases, "t" * 64, "x" * 64) is None
    interrupted = benchmark(0.002, 0.0005)
    interrupted["status"] = "interrupted"
    assert payback_of([*rows, interrupted]) is None


def test_a_measured_payback_is_reported_and_an_edited_one_is_caught_by_the_audit(
    tmp_path: Path, tiny_recipe_sets: list[str], tiny_teacher: Path
) -> None:
    """End to end: the quickstart shrunk to the tiny student but with the embedded WRN-40-2 as its teacher; its
    [inference] benchmarks that very pair, and only that pair counts for the run's payback."""
    run = tmp_path / "run"
    runner = CliRunner()
    sets = [*tiny_recipe_sets, "--set", f"teacher.checkpoint={EMBEDDED_TEACHER_PATH}"]
    done = runner.invoke(app, ["run", QUICKSTART, "--run", str(run), *sets, "--json"])
    assert done.exit_code == 0, done.output
    saved = tmp_path / "report.json"
    written = runner.invoke(app, ["report", str(run), "--format", "json", "--out", str(saved)])
    assert written.exit_code == 0, written.output
    report = json.loads(saved.read_text())
    payback = report["runs"][0]["payback"]
    record = read_ledger(run / "carbon.jsonl")[-1]
    assert record["stage"] == "inference-benchmark"
    assert payback["benchmark"] == {"seq": record["seq"], "record_sha256": record["record_sha256"], "images": 2048}
    # Re-derived by hand from the record's phases: energy with PUE over the images, per 1,000.
    teacher = record["phases"]["teacher-inference"]["energy_kwh"]["total"] * record["pue"] / 2048 * 1000
    assert teacher > 0 and payback["teacher_per_1000"]["energy_kwh_with_pue"] == pytest.approx(teacher)
    assert payback["saved_per_1000"]["co2eq_g"] > 0 and payback["inferences_to_repay"] > 0
    assert audit_run(run, report) == []
    assert "payback-chart-0" in render_html(report) and "Carbon payback" in render_markdown(report)

    # Another pair in this run dir is refused: the payback is about this run's own teacher and student.
    other = runner.invoke(app, ["benchmark", "inference", str(tiny_teacher), str(run), "--device", "cpu", "--json"])
    assert other.exit_code == 2 and "is not the teacher of run dir" in other.stderr

    report["runs"][0]["payback"]["inferences_to_repay"] *= 2
    saved.write_text(json.dumps(report))
    audited = runner.invoke(app, ["audit", str(run), "--report", str(saved), "--json"])
    assert audited.exit_code != 0
    assert "payback.inferences_to_repay" in audited.stdout
