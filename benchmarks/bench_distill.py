"""Distillation benchmark: stochastic vs fixed tau on the same synthetic set, with accuracy and energy.

    python benchmarks/bench_distill.py --synthetic runs/c10 --eval-data ~/data/cifar10-jpeg \
        --taus stochastic,4,20 --epochs 100 --batch-size 512 --out bench-distill.json

For each tau it copies the synthetic run (shards, manifest, ledger) into `<workdir>/tau-<tau>`, runs
`dfkd distill` there through the real CLI, and reads the student's throughput, its test accuracy and
the stage's energy and CO2 back from that run's ledger. Prints a table and writes JSON with the
date, machine and command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from bench_common import write_results
from rich.console import Console
from rich.table import Table

from dfkd.carbon.ledger import read_ledger


def distill_once(synthetic: Path, workdir: Path, tau: str, args: argparse.Namespace) -> dict:
    run = workdir / f"tau-{tau}"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    shutil.copytree(synthetic / "synthetic", run / "synthetic")
    for name in ("manifest.json", "carbon.jsonl"):
        if (synthetic / name).exists():
            shutil.copy2(synthetic / name, run / name)
    command = [
        sys.executable,
        "-m",
        "dfkd",
        "distill",
        "--run",
        str(run),
        "--tau",
        tau,
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--eval-data",
        args.eval_data,
        "--device",
        args.device,
        "--json",
        "--overwrite",
        *(["--compile"] if args.compile else []),
    ]
    summary = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    record = [r for r in read_ledger(run / "carbon.jsonl") if r["stage"] == "distillation"][-1]
    return {
        "tau": tau,
        "test_acc": summary.get("test_acc"),
        "holdout_agreement": summary["holdout_agreement"],
        "images_per_s": record["work"]["images_per_s"],
        "duration_s": record["duration_s"],
        "energy_kwh_with_pue": record["energy_kwh_with_pue"]["total"],
        "gpu_energy_nvml_kwh": record["gpu_energy_nvml_kwh"],
        "co2eq_g": record["co2eq_g"],
        "flops": record["flops"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", required=True, help="A run dir made by `dfkd synthesize`.")
    parser.add_argument("--eval-data", required=True)
    parser.add_argument("--taus", default="stochastic,4")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--workdir", default="runs/bench-distill")
    parser.add_argument("--out", default="bench-distill.json")
    args = parser.parse_args(argv)
    rows = [distill_once(Path(args.synthetic), Path(args.workdir), tau, args) for tau in args.taus.split(",")]
    table = Table(
        "tau",
        "test acc %",
        "holdout agreement %",
        "img/s",
        "seconds",
        "kWh (PUE)",
        "GPU kWh (NVML)",
        "CO2eq g",
        title="distillation",
    )
    for r in rows:
        table.add_row(
            r["tau"],
            f"{r['test_acc']:.2f}",
            f"{r['holdout_agreement']:.2f}",
            f"{r['images_per_s']:,.0f}",
            f"{r['duration_s']:.0f}",
            f"{r['energy_kwh_with_pue']:.5f}" if r["energy_kwh_with_pue"] is not None else "failed",
            f"{r['gpu_energy_nvml_kwh']:.5f}" if r["gpu_energy_nvml_kwh"] is not None else "-",
            f"{r['co2eq_g']:.2f}" if r["co2eq_g"] is not None else "failed",
        )
    Console().print(table)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    write_results(args.out, device, argv, rows, synthetic=args.synthetic)


if __name__ == "__main__":
    main()
