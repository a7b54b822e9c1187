"""The report model: what each stage of one or more runs cost, read from their ledgers and manifests.

`build_report` turns run dirs into one JSON-ready dict (schema `dfkd.report/1`, documented in
docs/report-schema.md) that every renderer and `dfkd audit` read, so all formats show the same
figures. It only reads: every figure comes from the hash-chained ledger; the manifest adds the
resolved config, the artifact hashes and the preview. A figure that was not measured stays null
and is counted as missing in every total, never summed as zero.
"""

from __future__ import annotations

import json
from importlib import metadata
from itertools import product
from pathlib import Path
from typing import Any, cast

from dfkd.carbon.ledger import LEDGER_FILE, read_ledger, verify_ledger
from dfkd.errors import DfkdError
from dfkd.files import sha256_file, utc_now
from dfkd.manifest import MANIFEST_FILE, Manifest, load_manifest, synthesis_of
from dfkd.report.notes import caveats, provenance
from dfkd.report.payback import STUDENT_PHASE, TEACHER_PHASE, carbon_payback
from dfkd.rundir import ESTIMATE_FILE, STUDENT_FILE

REPORT_SCHEMA = "dfkd.report/1"
PHASES = ("generation", "compression", "teacher", "inference", "other")
# A phase a run has only when it has such records (so reports of other runs are as they were).
OPTIONAL_PHASES = ("inference",)
# The stage of the interleaved mode: one record metered in phases, split between generation and compression.
INTERLEAVED = "interleaved"
# Where each metered phase of a phased record goes in the report's split.
PHASE_OF_PART = {
    "generation": "generation",
    "compression": "compression",
    TEACHER_PHASE: "inference",
    STUDENT_PHASE: "inference",
}
ENERGY_PARTS = ("cpu", "gpu", "ram", "total")
# What the report shows of a stage's manifest section: its resolved settings, not its results.
CONFIG_KEYS = ("config", "method_config", "config_hash", "identity", "teacher", "source", "selection", "targets")
COMPARISON_BASIS = (
    "compression only: every grid trial plus the selection against the stochastic distillation; "
    "making the synthetic set is the same work for both and is left out"
)


def phase_of(stage: str) -> str:
    """Generation (making the synthetic set), compression (distillation, grid trials, selection), teacher,
    inference (running the models: the inference benchmark), other, or `interleaved` (both at once: its
    record's metered phases are split between them)."""
    if stage == INTERLEAVED:
        return INTERLEAVED
    if stage == "synthesis":
        return "generation"
    if stage in ("distillation", "selection") or stage.startswith("distillation["):
        return "compression"
    if stage == "inference-benchmark":
        return "inference"
    return "teacher" if stage == "teacher-training" else "other"


def _method(stage: str, info: dict[str, Any]) -> str | None:
    if stage == "evaluation":
        return f"evaluate {info.get('arch', '?')}"
    if "method" in info:
        return str(info["method"])
    if "loss" in info:
        return f"{info['loss']} KD -> {info.get('student', '?')}"
    if "criterion" in info:
        return f"select by {info['criterion']}"
    if "arch" in info:
        return f"train {info['arch']}"
    return None


def _throughput(work: dict[str, Any], duration_s: float) -> dict[str, Any] | None:
    """Work done per second of the whole stage (setup included), in the stage's own unit."""
    if duration_s <= 0:
        return None
    for key, unit in (("image_steps", "image-steps/s"), ("images", "images/s")):
        if isinstance(work.get(key), (int, float)):
            return {"value": work[key] / duration_s, "unit": unit}
    return None


def _result(phase: str, result: dict[str, Any]) -> dict[str, Any] | None:
    """The stage's one headline figure: synthetic quality, or the model's accuracy / agreement."""
    who = "teacher" if phase == "teacher" else "student"
    winner = result.get("winner")
    of_winner = f" (the winner, {winner})" if winner else ""
    if "quality" in result and phase != INTERLEAVED:  # the interleaved stage's headline is its student
        metric, value = "target_agreement", result["quality"]["target_agreement"]
        meaning = "share of synthetic images the teacher classifies as their target"
    elif result.get("test_acc") is not None:
        metric, value = "test_acc", result["test_acc"]
        meaning = f"{who}{of_winner} top-1 accuracy on the test split"
    elif "holdout_agreement" in result:
        metric, value = "holdout_agreement", result["holdout_agreement"]
        meaning = f"{who}{of_winner} top-1 agreement with the teacher on held-out synthetic images"
    else:
        return None
    return {"metric": metric, "value": value, "unit": "%", "meaning": meaning, "winner": winner}


def record_row(record: dict[str, Any]) -> dict[str, Any]:
    """One report row from one ledger record (raises KeyError for a record that lacks a ledger field)."""
    stage, info, work = record["stage"], record["info"], record["work"]
    phase = phase_of(stage)
    device = record["device"]
    trial = info.get("trial")
    return {
        "seq": record["seq"],
        "record_sha256": record["record_sha256"],
        "stage": stage,
        "phase": phase,
        "status": record["status"],
        "error": record["error"],
        "method": _method(stage, info),
        "tau_mode": info.get("tau_mode"),
        "tau": trial.removeprefix("tau=") if isinstance(trial, str) else None,
        "device": device["name"],
        "device_model": device.get("gpu_name") or device.get("cpu_model"),
        "start_utc": record["start_utc"],
        "end_utc": record["end_utc"],
        "duration_s": record["duration_s"],
        "energy_kwh": {part: record["energy_kwh"][part] for part in ENERGY_PARTS},
        "pue": record["pue"],
        "energy_kwh_with_pue": {part: record["energy_kwh_with_pue"][part] for part in ENERGY_PARTS},
        "carbon_intensity_g_per_kwh": record["carbon_intensity_g_per_kwh"],
        "co2eq_g": record["co2eq_g"],
        "flops": record["flops"],
        "throughput": _throughput(work, record["duration_s"]),
        "result": _result(phase, record["result"]),
        "sources": {
            **record["energy_sources"],
            "flops": record["flops_method"],
            "carbon_intensity": record["carbon_intensity_source"],
        },
        "metering_ok": record["metering"]["ok"],
        "metering_failures": list(record["metering"]["failures"]),
        "info": info,
        "work": work,
        # Only records metered in phases have parts, so other rows are as they always were.
        **({"parts": _parts(record)} if "phases" in record else {}),
        # Likewise only a torchrun job's records say how many processes and machines spent the energy.
        **(
            {"ranks": record["distributed"]["world_size"], "nodes": record["distributed"]["nodes"]}
            if "distributed" in record
            else {}
        ),
    }


def _parts(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A phased record's share of each metered phase, with PUE and CO2eq applied as to the whole record;
    what ran outside the phases (setup, metering) goes to `other`."""
    pue, intensity = record["pue"], record["carbon_intensity_g_per_kwh"]
    parts = {}
    for name, entry in record["phases"].items():
        energy = {part: entry["energy_kwh"][part] for part in ENERGY_PARTS}
        with_pue = {part: None if value is None else value * pue for part, value in energy.items()}
        parts[name] = {
            "phase": PHASE_OF_PART.get(name, "other"),
            "status": record["status"],
            "duration_s": entry["duration_s"],
            "energy_kwh": energy,
            "energy_kwh_with_pue": with_pue,
            "co2eq_g": None if with_pue["total"] is None else with_pue["total"] * intensity,
            "flops": entry.get("flops"),
        }
    return parts


def phase_shares(rows: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    """What of `rows` belongs to `phase`: whole rows of that phase and the matching parts of phased rows (a
    phased row counts only through its parts, which sum to it)."""
    whole = [row for row in rows if row["phase"] == phase and "parts" not in row]
    return whole + [part for row in rows for part in row.get("parts", {}).values() if part["phase"] == phase]


def _sum(values: list[float | None]) -> float | None:
    """The sum of the known values; None when none is known (the missing ones are counted separately)."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def sum_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of rows: every figure summed over the records that have it, and how many lack it.

    `unmetered` counts records without a total energy; `fully_metered` is False when any record
    lacks it, so an incomplete total is never mistaken for a complete one.
    """
    missing = {part: sum(r["energy_kwh"][part] is None for r in rows) for part in ENERGY_PARTS}
    missing["co2eq_g"] = sum(r["co2eq_g"] is None for r in rows)
    missing["flops"] = sum(r["flops"] is None for r in rows)
    return {
        "records": len(rows),
        "interrupted": sum(r["status"] != "complete" for r in rows),
        "unmetered": missing["total"],
        "fully_metered": missing["total"] == 0,
        "duration_s": sum(r["duration_s"] for r in rows),
        "energy_kwh": {part: _sum([r["energy_kwh"][part] for r in rows]) for part in ENERGY_PARTS},
        "energy_kwh_with_pue": {part: _sum([r["energy_kwh_with_pue"][part] for r in rows]) for part in ENERGY_PARTS},
        "co2eq_g": _sum([r["co2eq_g"] for r in rows]),
        "flops": _sum([r["flops"] for r in rows]),
        "missing": missing,
    }


def _rows(ledger: Path, run: Path) -> list[dict[str, Any]]:
    rows = []
    for number, record in enumerate(read_ledger(ledger), 1):
        try:
            rows.append(record_row(record))
        except (KeyError, TypeError, AttributeError):
            raise DfkdError(
                f"ledger {ledger} line {number} is not a complete dfkd ledger record: run `dfkd audit {run}`"
            ) from None
    return rows


def _config(manifest: Manifest) -> dict[str, Any]:
    sections = cast(dict[str, dict[str, Any]], manifest.get("stages", {}))
    stages = {name: {key: content[key] for key in CONFIG_KEYS if key in content} for name, content in sections.items()}
    return {"carbon": manifest.get("carbon"), "stages": stages}


def _preview(run: Path, artifacts: dict[str, Any]) -> dict[str, Any] | None:
    entry = artifacts.get("synthetic/preview.png")
    if entry is None or not (run / "synthetic" / "preview.png").is_file():
        return None
    return {"path": "synthetic/preview.png", "sha256": entry.get("sha256")}


CURVE_KEYS = ("loss", "test_acc", "holdout_agreement")


def _curves(run: Path, artifacts: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each trial's training log (`metrics.jsonl`, one line per epoch or round) as points: step, loss and the
    accuracy figures it logged; only logs that still match their manifest hash."""
    curves: dict[str, list[dict[str, Any]]] = {}
    for relative, entry in sorted(artifacts.items()):
        path = run / relative
        if entry.get("role") != "metrics" or not path.is_file() or sha256_file(path) != entry.get("sha256"):
            continue
        points = []
        for line in path.read_text().splitlines():
            logged = json.loads(line)
            step = logged.get("epoch", logged.get("round"))
            points.append({"step": step, **{key: logged[key] for key in CURVE_KEYS if key in logged}})
        curves[path.parent.name] = points
    return curves


def run_entry(run: Path, name: str) -> dict[str, Any]:
    """The report's section for one run dir: its rows, totals, phase split, provenance and caveats."""
    run = Path(run)
    ledger = run / LEDGER_FILE
    if not run.is_dir() or not ((run / MANIFEST_FILE).exists() or ledger.exists()):
        raise DfkdError(
            f"{run} is not a dfkd run dir (no manifest.json or carbon.jsonl): pass a directory given as --run"
        )
    manifest: Manifest = load_manifest(run / MANIFEST_FILE) or {}
    rows = _rows(ledger, run)
    problems = verify_ledger(ledger)
    artifacts = manifest.get("artifacts", {})
    shares = {phase: phase_shares(rows, phase) for phase in PHASES}
    phases = {p: sum_rows(found) for p, found in shares.items() if found or p not in OPTIONAL_PHASES}
    student = artifacts.get(STUDENT_FILE)
    teacher = synthesis_of(manifest).get("teacher", {}).get("sha256")
    payback = carbon_payback(rows, phases, teacher, None if student is None else student["sha256"])
    return {
        "name": name,
        "path": str(run),
        "manifest": {
            "sha256": sha256_file(run / MANIFEST_FILE) if manifest else None,
            **{key: manifest.get(key) for key in ("created", "updated", "git_commit", "versions", "host")},
        },
        "ledger": {
            "file": "carbon.jsonl",
            "sha256": sha256_file(ledger) if ledger.exists() else None,
            "records": len(rows),
            "head_record_sha256": rows[-1]["record_sha256"] if rows else None,
            "intact": not problems,
            "problems": problems,
        },
        "rows": rows,
        "totals": sum_rows(rows),
        "phases": phases,
        "interrupted": sum_rows([r for r in rows if r["status"] != "complete"]),
        "provenance": provenance(rows),
        "caveats": caveats(rows, problems),
        "config": _config(manifest),
        "artifacts": artifacts,
        "preview": _preview(run, artifacts),
        "headline": headline(rows, _config(manifest), not problems),
        # Only runs with training logs / a dry run's estimate carry these, so other reports are as they were.
        **({"curves": curves} if (curves := _curves(run, artifacts)) else {}),
        **({"estimate": estimate_vs_actual(run / ESTIMATE_FILE, rows)} if (run / ESTIMATE_FILE).is_file() else {}),
        # Only runs with an inference benchmark have a payback (dfkd.report.payback).
        **({"payback": payback} if payback is not None else {}),
    }


def _actual_of(stage: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the ledger says an estimated stage cost: its records (every attempt), or its interleaved phase."""
    if stage.startswith("interleaved: "):
        phase = stage.removeprefix("interleaved: ")
        picked = phase_shares([r for r in rows if r["phase"] == INTERLEAVED], phase)
    else:
        picked = [r for r in rows if r["stage"] == stage or r["stage"].startswith(f"{stage}[")]
    totals = sum_rows(picked)
    return {
        "seconds": totals["duration_s"] if picked else None,
        "energy_kwh_with_pue": totals["energy_kwh_with_pue"]["total"] if picked else None,
        "co2eq_g": totals["co2eq_g"] if picked else None,
    }


def estimate_vs_actual(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each stage of a dry run's estimate beside what the run's records say it cost (None: not run yet)."""
    try:
        estimate = json.loads(path.read_text())
        stages = [
            (s["stage"], {k: s[k] for k in ("seconds", "energy_kwh_with_pue", "co2eq_g")}) for s in estimate["stages"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DfkdError(
            f"{path} is not a dfkd estimate ({exc}): remove it or rerun `dfkd run --dry-run --run`"
        ) from None
    return [{"stage": stage, "estimated": figures, "actual": _actual_of(stage, rows)} for stage, figures in stages]


def headline(rows: list[dict[str, Any]], config: dict[str, Any], intact: bool) -> dict[str, Any]:
    """What a reader needs first: how good the student is and against what, what it all cost, the split.

    The student's figure is its last test accuracy, else its last agreement with the teacher on held-out
    synthetic images; chance (1 / classes) and the teacher's own test accuracy (as its checkpoint records
    it) say what that figure means.
    """
    teacher = config["stages"].get("synthesis", {}).get("teacher", {})
    classes = teacher.get("num_classes")
    done = [
        r for r in rows if r["status"] == "complete" and r["result"] and r["phase"] not in ("generation", "teacher")
    ]
    student = next(
        (r["result"] for metric in ("test_acc", "holdout_agreement") for r in reversed(done)
         if r["result"]["metric"] == metric),
        None,
    )  # fmt: skip
    totals = sum_rows(rows)
    generation = sum_rows(phase_shares(rows, "generation"))["energy_kwh_with_pue"]["total"]
    compression = sum_rows(phase_shares(rows, "compression"))["energy_kwh_with_pue"]["total"]
    both = (generation or 0.0) + (compression or 0.0)
    return {
        "student": None if student is None else {k: student[k] for k in ("metric", "value", "unit", "meaning")},
        "teacher_test_acc": teacher.get("test_acc"),
        "chance": None if not classes else 100.0 / classes,
        "classes": classes,
        "energy_kwh_with_pue": totals["energy_kwh_with_pue"]["total"],
        "co2eq_g": totals["co2eq_g"],
        "generation_share": generation / both if generation is not None and both > 0 else None,
        "duration_s": totals["duration_s"],
        "fully_metered": totals["fully_metered"],
        "ledger_intact": intact,
    }


def _run_names(runs: list[Path]) -> list[str]:
    """Each run's folder name, or its path where two runs share a folder name."""
    names = [Path(run).name or str(run) for run in runs]
    return [name if names.count(name) == 1 else str(run) for name, run in zip(names, runs)]


def _group(entry: dict[str, Any], rows: list[dict[str, Any]], outcome: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "run": entry["name"],
        "stages": [r["stage"] for r in rows],
        "totals": sum_rows(rows),
        "result": outcome["result"] if outcome else None,
        "synthetic_set": entry["config"]["stages"].get("synthesis", {}).get("config_hash"),
        "settings": sorted(
            {f"{r['info']['student']} / {r['info'].get('loss')}" for r in rows if "student" in r["info"]}
        ),
    }


def _distillation_groups(entry: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A run's grid search (its trials and selections) and its stochastic distillation, where it has them."""
    rows = entry["rows"]
    grid = [r for r in rows if r["tau_mode"] == "grid" or r["stage"] == "selection"]
    stochastic = [r for r in rows if r["tau_mode"] == "stochastic"]
    selected = [r for r in grid if r["stage"] == "selection" and r["status"] == "complete"]
    trained = [r for r in stochastic if r["status"] == "complete"]
    return (
        _group(entry, grid, selected[-1] if selected else None) if any(r["tau_mode"] == "grid" for r in grid) else None,
        _group(entry, stochastic, trained[-1] if trained else None) if stochastic else None,
    )


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _compare(grid: dict[str, Any], stochastic: dict[str, Any]) -> dict[str, Any]:
    """The paper's comparison: what tuning τ by grid search cost against one stochastic-τ run."""
    notes = []
    spent, baseline = grid["totals"], stochastic["totals"]
    metered = spent["fully_metered"] and baseline["fully_metered"]
    if not metered:
        notes.append("a compared stage was not metered, so the energy and CO2 ratios are left out")
    if grid["result"] is None:
        notes.append(f"the grid search in {grid['run']} has no finished selection, so it has no accuracy")
    if stochastic["result"] is None:
        notes.append(f"the stochastic distillation in {stochastic['run']} did not finish, so it has no accuracy")
    metric = difference = None
    if grid["result"] and stochastic["result"]:
        if grid["result"]["metric"] == stochastic["result"]["metric"]:
            metric = grid["result"]["metric"]
            difference = stochastic["result"]["value"] - grid["result"]["value"]
            if metric == "holdout_agreement":
                notes.append(
                    "accuracy is the students' agreement with the teacher on held-out synthetic images (no test "
                    "data was given); it is not test accuracy"
                )
        else:
            notes.append(
                "the two students were scored differently (test accuracy vs. agreement), so they are not compared"
            )
    if grid["synthetic_set"] != stochastic["synthetic_set"]:
        notes.append("the two students were trained on different synthetic sets")
    if grid["settings"] != stochastic["settings"]:
        notes.append(f"student / loss differ: grid {grid['settings']} vs stochastic {stochastic['settings']}")
    return {
        "grid": grid,
        "stochastic": stochastic,
        "basis": COMPARISON_BASIS,
        "energy_ratio": _ratio(spent["energy_kwh_with_pue"]["total"], baseline["energy_kwh_with_pue"]["total"])
        if metered
        else None,
        "co2_ratio": _ratio(spent["co2eq_g"], baseline["co2eq_g"]) if metered else None,
        "accuracy_metric": metric,
        "accuracy_difference_pp": difference,
        "notes": notes,
    }


def comparisons(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every grid search against every stochastic distillation among the runs given together."""
    groups = [_distillation_groups(entry) for entry in entries]
    grids = [grid for grid, _ in groups if grid is not None]
    stochastics = [stochastic for _, stochastic in groups if stochastic is not None]
    return [_compare(grid, stochastic) for grid, stochastic in product(grids, stochastics)]


def _version() -> str:
    try:
        return metadata.version("dfkd")
    except metadata.PackageNotFoundError:
        return "not installed"


def build_report(runs: list[Path]) -> dict[str, Any]:
    """The report of `runs` (schema `dfkd.report/1`), side by side in the order given."""
    if not runs:
        raise DfkdError("no run dir given: pass at least one run dir, e.g. `dfkd report runs/c10`")
    entries = [run_entry(Path(run), name) for run, name in zip(runs, _run_names([Path(r) for r in runs]))]
    return {
        "schema": REPORT_SCHEMA,
        "generated_utc": utc_now(),
        "dfkd_version": _version(),
        "runs": entries,
        "comparisons": comparisons(entries),
    }


def load_report(path: Path) -> dict[str, Any]:
    """A report saved with `--format json`, checked to be one this version reads."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DfkdError(
            f"report {path} is unreadable ({exc}): pass a file written by `dfkd report --format json`"
        ) from None
    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA:
        found = report.get("schema") if isinstance(report, dict) else None
        raise DfkdError(
            f"report {path} has schema {found!r}, not {REPORT_SCHEMA}: write it again with `dfkd report --format json`"
        )
    return report
