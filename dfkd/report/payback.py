"""The carbon payback of a distillation, from the run's own records: what the student saves per 1,000
inferences against its teacher, and after how many inferences that repays making it.

Inputs, all from the ledger: the last complete `inference-benchmark` record, metered in two phases that each
ran one model over the same images (`teacher-inference`, `student-inference`), so a phase's energy with PUE
over its images is that model's energy per inference on the benchmark's device, batch size and precision;
and the run's generation and compression records (the synthetic set and the distillation, grid trials
included). The savings are priced at the benchmark record's carbon intensity, the cost at its own records'.

    saved per 1,000  = (E_teacher − E_student) / images × 1,000           (kWh with PUE; g CO2eq likewise)
    payback          = (generation + compression) / saved per inference   (inferences, on CO2eq)

For a grid-tuned run the tuning's extra cost — every grid trial and selection beyond the one trial that a
single stochastic-τ run replaces (their mean) — is broken out with the inferences it alone takes to repay.
No torch here: the report and the audit re-derive it from the records.
"""

from __future__ import annotations

from typing import Any

BENCHMARK = "inference-benchmark"
TEACHER_PHASE, STUDENT_PHASE = "teacher-inference", "student-inference"


def _per_1000(part: dict[str, Any], images: int) -> dict[str, float | None]:
    """A phase's energy and CO2eq per 1,000 of its images; None where unknown, and where the counter read
    nothing (a phase shorter than its update interval): zero would price the model as free."""
    energy, co2 = part["energy_kwh_with_pue"]["total"], part["co2eq_g"]
    if not energy:
        energy = co2 = None
    return {
        "energy_kwh_with_pue": None if energy is None else energy / images * 1000,
        "co2eq_g": None if co2 is None else co2 / images * 1000,
    }


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _inferences(cost: float | None, saved_per_1000: float | None) -> float | None:
    """How many inferences repay `cost` at `saved_per_1000`; None when either is unknown or nothing is saved."""
    if cost is None or saved_per_1000 is None or saved_per_1000 <= 0:
        return None
    return cost / (saved_per_1000 / 1000)


def _benchmark(rows: list[dict[str, Any]], teacher: str | None, student: str | None) -> dict[str, Any] | None:
    """The last complete benchmark of this run's own teacher and student (by sha256, where the run records
    them): a benchmark of other models says nothing about what this run's student saves."""
    done = [
        r
        for r in rows
        if r["stage"] == BENCHMARK
        and r["status"] == "complete"
        and {TEACHER_PHASE, STUDENT_PHASE} <= set(r.get("parts", {}))
        and teacher in (None, r["info"].get("teacher", {}).get("sha256"))
        and student in (None, r["info"].get("student", {}).get("sha256"))
    ]
    return done[-1] if done else None


def _tuning(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """The extra cost of a grid search over one trial: every grid record (interrupted attempts too) and selection,
    minus the mean of its complete trials; None for a run without a finished grid trial or with unmetered ones."""
    spent = [r for r in rows if r["tau_mode"] == "grid" or r["stage"] == "selection"]
    trials = [r for r in spent if r["tau_mode"] == "grid" and r["status"] == "complete"]
    if not trials:
        return None
    extra: dict[str, float] = {}
    for key in ("energy_kwh_with_pue", "co2eq_g"):
        values = [_figure(r, key) for r in spent]
        if any(v is None for v in values):
            return None
        extra[key] = sum(v for v in values if v is not None) - sum(_figure(r, key) or 0.0 for r in trials) / len(trials)
    return extra


def carbon_payback(
    rows: list[dict[str, Any]],
    phases: dict[str, dict[str, Any]],
    teacher_sha256: str | None = None,
    student_sha256: str | None = None,
) -> dict[str, Any] | None:
    """The payback section of a run's report (module docstring), or None when the run has no inference benchmark
    of its own teacher and student (`teacher_sha256`, `student_sha256`: as the run records them; None: any).

    `rows` are the report's rows, `phases` its per-phase totals (`generation`, `compression`).
    """
    bench = _benchmark(rows, teacher_sha256, student_sha256)
    if bench is None:
        return None
    images = bench["info"].get("images")
    if not isinstance(images, int) or images < 1:  # not a record this version wrote: no payback from it
        return None
    teacher = _per_1000(bench["parts"][TEACHER_PHASE], images)
    student = _per_1000(bench["parts"][STUDENT_PHASE], images)
    saved = {key: _difference(teacher[key], student[key]) for key in teacher}
    cost: dict[str, float | None] = {}
    for key in ("energy_kwh_with_pue", "co2eq_g"):
        known = [v for v in (_figure(phases[phase], key) for phase in ("generation", "compression")) if v is not None]
        cost[key] = sum(known) if known else None
    tuning = _tuning(rows)
    caveats = [
        f"energy per inference measured on {bench['device_model'] or bench['device']} at batch "
        f"{bench['info'].get('batch_size')} in {bench['info'].get('precision', 'its precision')} over "
        f"{images:,} images per model, through PyTorch (not an exported file); another device, batch size or "
        "runtime changes it",
        f"the savings are priced at the benchmark's carbon intensity ({bench['carbon_intensity_g_per_kwh']:g} g/kWh, "
        f"{bench['sources']['carbon_intensity']}); the cost at its own records'",
        "the cost is the run's generation and compression records (interrupted attempts included); teacher "
        "training, evaluation and the benchmark itself are not counted",
    ]
    if None in (teacher["energy_kwh_with_pue"], student["energy_kwh_with_pue"]):
        caveats.append(
            "a model's phase read no energy (unmetered, or shorter than the energy counter's update interval), so "
            "there is no payback figure: benchmark more images (--images, [inference] images)"
        )
    if saved["co2eq_g"] is not None and saved["co2eq_g"] <= 0:
        caveats.append("the student did not use less energy than the teacher here, so the run is never repaid")
    if any(phases[p]["unmetered"] for p in ("generation", "compression")):
        caveats.append("some generation or compression records were not metered, so the cost is a lower bound")
    return {
        "benchmark": {"seq": bench["seq"], "record_sha256": bench["record_sha256"], "images": images},
        "teacher_per_1000": teacher,
        "student_per_1000": student,
        "saved_per_1000": saved,
        "cost": cost,
        "inferences_to_repay": _inferences(cost["co2eq_g"], saved["co2eq_g"]),
        "inferences_to_repay_energy": _inferences(cost["energy_kwh_with_pue"], saved["energy_kwh_with_pue"]),
        "tuning_extra": None
        if tuning is None
        else {**tuning, "inferences_to_repay": _inferences(tuning["co2eq_g"], saved["co2eq_g"])},
        "caveats": caveats,
    }


def _figure(totals: dict[str, Any], key: str) -> float | None:
    return totals["co2eq_g"] if key == "co2eq_g" else totals["energy_kwh_with_pue"]["total"]
