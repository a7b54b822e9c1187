"""End-to-end benchmark: a recipe from teacher to evaluated student under a hard wall-clock limit.

    python benchmarks/bench_e2e.py --scale cpu --data .devdata/cifar10-jpeg [--compare]
    python benchmarks/bench_e2e.py --scale full --data DATA --compare   # one GPU command, < 9 minutes

Each run goes through the real CLI (`python -m dfkd run RECIPE --set ...`) in a fresh run dir and is
killed at the preset's limit (a killed run is reported as such; its run dir resumes). Afterwards the
student and the teacher are scored on the preset's slice of the real test split, and the run's own
ledger gives the wall time and energy of generation and compression (an interleaved run's record is
split by its metered phases), the GPU energy (NVML where the ledger says so), the total with PUE and
the CO2eq. Prints one table and writes JSON with the date, machine and command.

Presets:
  full  the GPU target: recipes/c10_wrn40_2-wrn16_1_fast.toml as shipped (51,200 images, 200 rounds), the
        whole test split, limit 540 s including compilation. --compare adds the two-stage CMI baseline
        (stochastic tau) shrunk to a comparable wall time.
  cpu   2 CPU cores (sized for bf16 hardware: about 4 minutes a setup, 12 with --compare and the CMI
        interleaved setup): the fast recipe at 1,536 images (24 rounds of 64, 5 generator steps, 60
        distillation steps of 64 per round after one warm-up round), on a 2,000-image class-balanced slice
        of the test split. --compare adds two-stage CMI (512 images x 20 steps, 60 epochs at batch 64) at
        a similar wall time; `--setups "cmi interleaved"` CMI with its adversarial term at that scale.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_common import write_results
from rich.console import Console
from rich.table import Table

from dfkd.carbon.ledger import read_ledger
from dfkd.checkpoints import load_checkpoint
from dfkd.data import load_split, stratified_subset
from dfkd.device import default_precision, prepare_model, resolve_device
from dfkd.report.build import build_report
from dfkd.stages.evaluate import evaluate_on

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


@dataclass(frozen=True)
class Setup:
    """One run of a preset: a shipped recipe and the `--set` values that scale it."""

    label: str
    recipe: str
    sets: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    limit_s: int
    test_images: int  # 0 = the whole test split
    main: Setup
    baseline: Setup
    others: tuple[Setup, ...] = ()  # run only when named with --setups

    def setups(self) -> dict[str, Setup]:
        return {setup.label: setup for setup in (self.main, self.baseline, *self.others)}


PRESETS = {
    "full": Preset(
        limit_s=540,
        test_images=0,
        main=Setup("fast interleaved", "c10_wrn40_2-wrn16_1_fast.toml"),
        baseline=Setup(
            "cmi two-stage",
            "c10_wrn40_2-wrn16_1_cmi_stochastic.toml",
            {"synthesize.num_images": "8192", "distill.epochs": "100", "distill.compile": "true"},
        ),
    ),
    "cpu": Preset(
        limit_s=900,
        test_images=2000,
        main=Setup(
            "fast interleaved",
            "c10_wrn40_2-wrn16_1_fast.toml",
            {
                "synthesize.num_images": "1536",
                "synthesize.batch_size": "64",
                "synthesize.settings.compile": "false",
                "synthesize.settings.warmup_batches": "2",
                "interleave.kd_steps": "60",
                "interleave.warmup_rounds": "1",
                "distill.batch_size": "64",
                "distill.compile": "false",
            },
        ),
        baseline=Setup(
            "cmi two-stage",
            "c10_wrn40_2-wrn16_1_cmi_stochastic.toml",
            {
                "synthesize.num_images": "512",
                "synthesize.batch_size": "64",
                "synthesize.iterations": "20",
                "distill.epochs": "60",
                "distill.batch_size": "64",
            },
        ),
        others=(
            Setup(
                "cmi interleaved",
                "c10_wrn40_2-wrn16_1_cmi_interleaved.toml",
                {
                    "synthesize.num_images": "512",
                    "synthesize.batch_size": "64",
                    "synthesize.iterations": "20",
                    "interleave.kd_steps": "60",
                    "interleave.warmup_rounds": "1",
                    "distill.batch_size": "64",
                },
            ),
        ),
    ),
}


def run_setup(setup: Setup, preset: Preset, args: argparse.Namespace) -> dict[str, Any]:
    """Run one setup through the CLI under the preset's limit and read its figures back from its run dir."""
    run = Path(args.workdir) / setup.label.replace(" ", "-")
    if run.exists():
        shutil.rmtree(run)
    sets = {**setup.sets, "run.device": args.device, "synthesize.seed": str(args.seed), "distill.seed": str(args.seed)}
    command = [sys.executable, "-m", "dfkd", "run", str(RECIPES / setup.recipe), "--run", str(run), "--json"]
    command += [item for key, value in sets.items() for item in ("--set", f"{key}={value}")]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=preset.limit_s)
        status = "complete" if done.returncode == 0 else f"failed: {done.stderr.strip().splitlines()[-1:]}"
    except subprocess.TimeoutExpired:
        status = f"killed at the {preset.limit_s} s limit"
    wall = time.perf_counter() - started
    row: dict[str, Any] = {"setup": setup.label, "recipe": setup.recipe, "sets": sets, "status": status, "wall_s": wall}
    if (run / "carbon.jsonl").exists():
        row.update(ledger_figures(run))
    student = run / "student" / "student.safetensors"
    row["student_test_acc"] = test_accuracy(student, args) if status == "complete" and student.exists() else None
    return row


def ledger_figures(run: Path) -> dict[str, Any]:
    """Wall time and energy of generation and compression, GPU energy and totals, from the run's own ledger."""
    (entry,) = build_report([run])["runs"]
    records = read_ledger(run / "carbon.jsonl")
    phases, totals = entry["phases"], entry["totals"]
    nvml = all(str(r["energy_sources"].get("gpu", "")).startswith("NVML") for r in records)
    work = {k: v for r in records for k, v in r["work"].items() if k in ("images_made", "images_total", "rounds")}
    return {
        "generation_s": phases["generation"]["duration_s"],
        "compression_s": phases["compression"]["duration_s"],
        "images_synthesised": work.get("images_total", work.get("images_made")),
        "generation_kwh_with_pue": phases["generation"]["energy_kwh_with_pue"]["total"],
        "compression_kwh_with_pue": phases["compression"]["energy_kwh_with_pue"]["total"],
        "gpu_kwh": totals["energy_kwh"]["gpu"],
        "gpu_source": "NVML" if nvml else "not NVML (CPU run or codecarbon)",
        "total_kwh_with_pue": totals["energy_kwh_with_pue"]["total"],
        "co2eq_g": totals["co2eq_g"],
        "holdout_agreement": _holdout(records),
    }


def _holdout(records: list[dict[str, Any]]) -> float | None:
    complete = [r for r in records if r["status"] == "complete" and "holdout_agreement" in r["result"]]
    return complete[-1]["result"]["holdout_agreement"] if complete else None


_TEST: dict[str, Any] = {}


def test_slice(args: argparse.Namespace, count: int) -> Any:
    """The real test split, or a class-balanced slice of `count` images of it (the same for every run)."""
    if "set" not in _TEST:
        test = load_split(Path(args.data), "test")
        _TEST["set"] = test.subset(stratified_subset(test.labels, count, 0)) if count else test
    return _TEST["set"]


def test_accuracy(checkpoint: Path, args: argparse.Namespace) -> float:
    model, meta = load_checkpoint(checkpoint)
    device = resolve_device(args.device)
    test = test_slice(args, PRESETS[args.scale].test_images)
    precision = default_precision(device)  # as `dfkd evaluate` scores a checkpoint
    model = prepare_model(model, device, precision)
    return float(evaluate_on(model, test, meta.mean, meta.std, device, precision=precision)["accuracy"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(PRESETS), required=True)
    parser.add_argument("--data", required=True, help="CIFAR-10 (ImageFolder JPEG copy or the python version).")
    parser.add_argument("--compare", action="store_true", help="Also run the two-stage CMI baseline.")
    parser.add_argument("--setups", default="", help="Comma-separated setup labels to run instead (see PRESETS).")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", default=str(REPO / "checkpoints" / "wrn40_2_cifar10.safetensors"))
    parser.add_argument("--workdir", default="runs/bench-e2e")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/bench-e2e-<scale>.json).")
    args = parser.parse_args(argv)
    preset = PRESETS[args.scale]
    teacher_acc = test_accuracy(Path(args.teacher), args)
    known = preset.setups()
    chosen = [label.strip() for label in args.setups.split(",") if label.strip()]
    if any(label not in known for label in chosen):
        parser.error(f"--setups: choose among {', '.join(known)}")
    setups = [known[label] for label in chosen] or ([preset.main, preset.baseline] if args.compare else [preset.main])
    rows = [run_setup(setup, preset, args) for setup in setups]
    for row in rows:
        acc = row["student_test_acc"]
        row["teacher_test_acc"] = teacher_acc
        row["accuracy_ratio"] = None if acc is None else acc / teacher_acc
    # One column per setup, one row per figure: it fits an 80-column terminal or log.
    table = Table("figure", *(r["setup"] for r in rows), title=f"end to end, --scale {args.scale}")

    def number(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    figures = (
        ("status", "status", "s"),
        ("wall s (whole command)", "wall_s", ".0f"),
        ("generation s", "generation_s", ".0f"),
        ("compression s", "compression_s", ".0f"),
        ("images synthesised", "images_synthesised", ","),
        (f"student test % ({len(test_slice(args, preset.test_images))} images)", "student_test_acc", ".2f"),
        ("teacher test %", "teacher_test_acc", ".2f"),
        ("accuracy ratio", "accuracy_ratio", ".3f"),
        ("held-out agreement %", "holdout_agreement", ".2f"),
        ("GPU kWh", "gpu_kwh", ".5f"),
        ("kWh with PUE", "total_kwh_with_pue", ".5f"),
        ("CO2eq g", "co2eq_g", ".3f"),
    )
    for name, key, fmt in figures:
        table.add_row(name, *(number(r.get(key), fmt) for r in rows))
    Console().print(table)
    device = resolve_device(args.device)
    out = args.out or str(REPO / "benchmarks" / "results" / f"bench-e2e-{args.scale}.json")
    write_results(out, device, argv, rows, scale=args.scale, limit_s=preset.limit_s, seed=args.seed)


if __name__ == "__main__":
    main()
