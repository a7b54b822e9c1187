"""The report's figures as text, and its tables as rows of cells, shared by every output format.

The terminal table, the markdown and the HTML lay out the same cells, so a figure reads the same
wherever it is shown, and a total that lacks unmetered records always says so.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

NOT_METERED = "not metered"
STAGE_HEADERS = (
    "seq",
    "stage",
    "status",
    "method",
    "τ",
    "device",
    "start (UTC)",
    "duration",
    "CPU kWh",
    "GPU kWh",
    "RAM kWh",
    "PUE",
    "kWh with PUE",
    "gCO2eq/kWh",
    "CO2eq g",
    "FLOPs",
    "throughput",
    "result",
)
# The terminal splits a record's cells into two tables that fit its width: the work, then the energy.
WORK_COLUMNS = (0, 1, 2, 3, 4, 5, 6, 7, 16, 17)
ENERGY_COLUMNS = (0, 1, 8, 9, 10, 11, 12, 13, 14, 15)
TOTAL_HEADERS = (
    "part",
    "records",
    "interrupted",
    "duration",
    "CPU kWh",
    "GPU kWh",
    "RAM kWh",
    "kWh with PUE",
    "CO2eq g",
    "FLOPs",
)
COMPARISON_HEADERS = (
    "grid run",
    "stochastic run",
    "grid kWh with PUE",
    "stochastic kWh with PUE",
    "energy ratio",
    "CO2 ratio",
    "grid result",
    "stochastic result",
    "difference",
)
ARTIFACT_HEADERS = ("artifact", "stage", "role", "bytes", "sha256")
OVERVIEW_HEADERS = (
    "run",
    "stages",
    "generation kWh with PUE",
    "compression kWh with PUE",
    "total kWh with PUE",
    "CO2eq g",
    "results",
)
_SI = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
_METRIC_NAMES = {
    "target_agreement": "target agreement",
    "test_acc": "test accuracy",
    "holdout_agreement": "held-out agreement",
}


def number(value: float | None) -> str:
    """Three significant figures; a missing figure is `not metered`, never 0."""
    return NOT_METERED if value is None else f"{value:.3g}"


def si(value: float) -> str:
    """Large counts with an SI prefix: 1.65e8 -> '165 M'."""
    for scale, prefix in _SI:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3g} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def total(totals: dict[str, Any], key: str, part: str | None = None) -> str:
    """A summed figure; when records lack it, a lower bound that says how many are missing."""
    if totals["records"] == 0:
        return "-"
    value = totals[key][part] if part else totals[key]
    missing = totals["missing"][part or key]
    shown, absent = (si, "not counted") if key == "flops" else (number, NOT_METERED)
    if missing == 0:
        return shown(value)
    if value is None:
        return absent
    return f">= {shown(value)} ({missing} of {totals['records']} {absent})"


def result(found: dict[str, Any] | None) -> str:
    if found is None:
        return "-"
    winner = f"winner {found['winner']}: " if found["winner"] else ""
    return f"{winner}{_METRIC_NAMES.get(found['metric'], found['metric'])} {found['value']:.2f} {found['unit']}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _tau(row: dict[str, Any]) -> str:
    if row["tau_mode"] in ("grid", "fixed"):
        return f"{row['tau_mode']} {row['tau']}"
    if row["tau_mode"] == "stochastic" and row["info"].get("tau_per") == "sample":
        return "stochastic per sample"
    return row["tau_mode"] or "-"


def device_cell(row: dict[str, Any]) -> str:
    """Where a record ran: the device (its model), and for a torchrun job how many ranks on how many nodes."""
    cell = row["device"] if not row["device_model"] else f"{row['device']} ({row['device_model']})"
    if "ranks" in row:
        cell += f" x {row['ranks']} ranks on {row['nodes']} node{'s' if row['nodes'] != 1 else ''}"
    return cell


def stage_cells(row: dict[str, Any]) -> list[str]:
    """One ledger record as the cells under STAGE_HEADERS."""
    energy, with_pue = row["energy_kwh"], row["energy_kwh_with_pue"]
    status = row["status"] if row["status"] == "complete" else f"{row['status'].upper()}: {row['error']}"
    throughput = row["throughput"]
    return [
        str(row["seq"]),
        row["stage"],
        status,
        row["method"] or "-",
        _tau(row),
        device_cell(row),
        row["start_utc"][:19].replace("T", " "),
        duration(row["duration_s"]),
        number(energy["cpu"]),
        number(energy["gpu"]),
        number(energy["ram"]),
        f"{row['pue']:g}",
        number(with_pue["total"]),
        f"{row['carbon_intensity_g_per_kwh']:.4g}",
        number(row["co2eq_g"]),
        "not counted" if row["flops"] is None else si(row["flops"]),
        f"{si(throughput['value'])} {throughput['unit']}" if throughput else "-",
        result(row["result"]),
    ]


def total_cells(label: str, totals: dict[str, Any]) -> list[str]:
    """A sum of records as the cells under TOTAL_HEADERS."""
    return [
        label,
        str(totals["records"]),
        str(totals["interrupted"]),
        duration(totals["duration_s"]),
        total(totals, "energy_kwh", "cpu"),
        total(totals, "energy_kwh", "gpu"),
        total(totals, "energy_kwh", "ram"),
        total(totals, "energy_kwh_with_pue", "total"),
        total(totals, "co2eq_g"),
        total(totals, "flops"),
    ]


def headline_lines(run: dict[str, Any]) -> list[tuple[str, str]]:
    """The run at a glance, as (label, text) lines: result and what it means, energy, CO2eq, split, time."""
    head = run["headline"]
    student, chance, teacher = head["student"], head["chance"], head["teacher_test_acc"]
    context = [f"chance is {chance:.3g} % ({head['classes']} classes)"] if chance is not None else []
    if teacher is not None:
        context.insert(0, f"the teacher scores {teacher:.2f} % on its test split")
    if student is None:
        quality = "no student yet"
    elif student["metric"] == "test_acc":
        quality = f"student test accuracy {student['value']:.2f} %"
    else:
        quality = (
            f"student agrees with the teacher on {student['value']:.2f} % of held-out synthetic images "
            "(imitation, not accuracy: add --set evaluate.data=PATH for test accuracy)"
        )
    share = head["generation_share"]
    energy = number(head["energy_kwh_with_pue"])
    if not head["fully_metered"]:
        energy += " (some records not metered)"
    lines = [
        ("student", quality + (f"; {', '.join(context)}" if context else "")),
        ("energy", f"{energy} kWh with PUE, {number(head['co2eq_g'])} g CO2eq"),
        (
            "split",
            "-" if share is None else f"generation {share * 100:.0f} %, compression {(1 - share) * 100:.0f} %",
        ),
        ("wall time", duration(head["duration_s"]) + " in metered stages"),
        ("ledger", "intact" if head["ledger_intact"] else "FAILS ITS CHECK: run `dfkd audit`"),
    ]
    if "payback" in run:
        lines.insert(4, ("payback", payback_line(run["payback"])))
    return lines


PAYBACK_HEADERS = ("figure", "kWh with PUE", "g CO2eq", "inferences to repay")


def _inference_count(value: float | None, cost: float | None) -> str:
    if cost is None:
        return "-"
    return "never (no saving)" if value is None else f"{value:,.0f}"


def payback_line(payback: dict[str, Any]) -> str:
    """The payback in one sentence: the saving per 1,000 inferences and when it repays the run."""
    saved = payback["saved_per_1000"]["co2eq_g"]
    if saved is None:
        return "the inference benchmark's energy was not metered, so no payback"
    if payback["cost"]["co2eq_g"] is None:
        return (
            f"the student saves {number(saved)} g CO2eq per 1,000 inferences against the teacher; this run dir "
            "holds no generation or compression records to repay"
        )
    repay = payback["inferences_to_repay"]
    when = "never repays the run" if repay is None else f"repays the run's {number(payback['cost']['co2eq_g'])} g"
    when += "" if repay is None else f" after {repay:,.0f} inferences"
    return f"the student saves {number(saved)} g CO2eq per 1,000 inferences against the teacher and {when}"


def payback_rows(payback: dict[str, Any]) -> list[list[str]]:
    """Per 1,000 inferences: teacher, student, saved; then what the run cost and when the saving repays it."""
    rows = [
        [label, number(payback[key]["energy_kwh_with_pue"]), number(payback[key]["co2eq_g"]), ""]
        for label, key in (
            ("teacher, per 1,000 inferences", "teacher_per_1000"),
            ("student, per 1,000 inferences", "student_per_1000"),
            ("saved, per 1,000 inferences", "saved_per_1000"),
        )
    ]
    cost = payback["cost"]
    rows.append(
        [
            "the run: generation + compression",
            number(cost["energy_kwh_with_pue"]),
            number(cost["co2eq_g"]),
            _inference_count(payback["inferences_to_repay"], cost["co2eq_g"]),
        ]
    )
    tuning = payback["tuning_extra"]
    if tuning is not None:
        rows.append(
            [
                "of which tuning τ by grid (beyond one trial)",
                number(tuning["energy_kwh_with_pue"]),
                number(tuning["co2eq_g"]),
                _inference_count(tuning["inferences_to_repay"], tuning["co2eq_g"]),
            ]
        )
    return rows


def totals_rows(run: dict[str, Any]) -> list[list[str]]:
    """Generation vs compression (and any other phase present), interrupted attempts, and the run's total."""
    rows = [total_cells(phase, totals) for phase, totals in run["phases"].items() if totals["records"]]
    if run["interrupted"]["records"]:
        rows.append(total_cells("of which interrupted", run["interrupted"]))
    rows.append(total_cells("total", run["totals"]))
    return rows


def comparison_cells(comparison: dict[str, Any]) -> list[str]:
    grid, stochastic = comparison["grid"], comparison["stochastic"]
    difference = comparison["accuracy_difference_pp"]
    return [
        f"{grid['run']} ({len(grid['stages'])} records)",
        f"{stochastic['run']} ({len(stochastic['stages'])} records)",
        total(grid["totals"], "energy_kwh_with_pue", "total"),
        total(stochastic["totals"], "energy_kwh_with_pue", "total"),
        ratio(comparison["energy_ratio"]),
        ratio(comparison["co2_ratio"]),
        result(grid["result"]),
        result(stochastic["result"]),
        "-" if difference is None else f"{difference:+.2f} pp (stochastic - grid)",
    ]


def _label(row: dict[str, Any]) -> str:
    """What a record was, for the overview: `synthesis (cmi)`, `distillation (grid)`, `selection`."""
    if row["phase"] == "generation" and row["method"]:
        return f"{row['stage']} ({row['method']})"
    if row["tau_mode"]:
        return f"distillation ({row['tau_mode']})"
    return row["stage"]


def overview_cells(run: dict[str, Any]) -> list[str]:
    """One run in the side-by-side overview: what ran (records per kind), its split, and each kind's last result."""
    phases, rows = run["phases"], run["rows"]
    counts = Counter(_label(r) for r in rows)
    finished = {
        _label(r): r["result"] for r in rows if r["result"] and r["status"] == "complete" and r["tau_mode"] != "grid"
    }
    return [
        run["name"],
        ", ".join(f"{label} x{n}" if n > 1 else label for label, n in counts.items()) or "-",
        total(phases["generation"], "energy_kwh_with_pue", "total"),
        total(phases["compression"], "energy_kwh_with_pue", "total"),
        total(run["totals"], "energy_kwh_with_pue", "total"),
        total(run["totals"], "co2eq_g"),
        "; ".join(f"{label}: {result(found)}" for label, found in finished.items()) or "-",
    ]


ESTIMATE_HEADERS = (
    "stage",
    "time est.",
    "time actual",
    "kWh est. (PUE)",
    "kWh actual (PUE)",
    "CO2eq g est.",
    "CO2eq g actual",
)


def estimate_rows(run: dict[str, Any]) -> list[list[str]]:
    """A dry run's estimate beside the actual cost, one row per stage (`not run yet` where it has not run)."""

    def shown(figures: dict[str, Any], key: str) -> str:
        value = figures[key]
        if value is None:
            return "not run yet" if figures["seconds"] is None else NOT_METERED
        return duration(value) if key == "seconds" else number(value)

    return [
        [
            row["stage"],
            *(
                shown(row[side], key)
                for key in ("seconds", "energy_kwh_with_pue", "co2eq_g")
                for side in ("estimated", "actual")
            ),
        ]
        for row in run.get("estimate", [])
    ]


def artifact_rows(run: dict[str, Any]) -> list[list[str]]:
    return [
        [path, str(entry.get("stage")), str(entry.get("role")), str(entry.get("bytes")), str(entry.get("sha256"))]
        for path, entry in sorted(run["artifacts"].items())
    ]
