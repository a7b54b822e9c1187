"""Throughput scaling under torchrun: the same synthesis (and distillation) at 1, 2, … ranks, from the ledger.

    python benchmarks/bench_ranks.py --ranks 1,2 --device cpu --out benchmarks/results/bench-ranks-cpu.json
    python benchmarks/bench_ranks.py --ranks 1,2,4,8 --device cuda --num-images 8192 --batch-size 256 \
        --iterations 200 --epochs 5 --out bench-ranks-gpu.json

Each world size runs as its own torchrun job in a fresh run dir (1 rank included, so every row pays the same
launch); the figures are the ledger's: images/s of the synthesis record, training images/s of the
distillation record, energy, and the scaling efficiency `rate(N) / (N x rate(1))`. On a CPU every rank gets
one thread (torchrun's OMP_NUM_THREADS=1), so N ranks use N cores where the 1-rank row uses one. Prints a
table and writes JSON with the date, machine and command.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from bench_common import write_results
from rich.console import Console
from rich.table import Table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _job(ranks: int, args: list[str], cwd: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(_free_port()), "-m", "dfkd", *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # what torchrun gives each of several ranks; the 1-rank row alike
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{ranks} ranks failed:\n{result.stderr[-3000:]}")


def _record(run: Path, stage: str) -> dict[str, Any]:
    records = [json.loads(line) for line in (run / "carbon.jsonl").read_text().splitlines()]
    return next(r for r in records if r["stage"] == stage and r["status"] == "complete")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", default="deepinversion")
    parser.add_argument("--teacher", default="checkpoints/wrn40_2_cifar10.safetensors")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--student", default="wrn16_1")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--distill-batch", type=int, default=16)
    parser.add_argument("--out", default="bench-ranks.json")
    args = parser.parse_args(argv)
    teacher = str(Path(args.teacher).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in [int(n) for n in args.ranks.split(",")]:
            run = Path(tmp) / f"ranks-{ranks}"
            common = ["--run-dir", str(run), "--device", args.device, "--json", "--yes"]
            _job(ranks, ["synthesize", "--method", args.method, "--teacher", teacher, "--num-images",
                         str(args.num_images), "--batch-size", str(args.batch_size), "--iterations",
                         str(args.iterations), *common], Path(tmp))  # fmt: skip
            _job(ranks, ["distill", "--student", args.student, "--epochs", str(args.epochs), "--batch-size",
                         str(args.distill_batch), *common], Path(tmp))  # fmt: skip
            synthesis, distillation = _record(run, "synthesis"), _record(run, "distillation")
            rows.append(
                {
                    "ranks": ranks,
                    "synthesis_s": synthesis["duration_s"],
                    "synthesis_images_per_s": synthesis["work"]["images_made"] / synthesis["duration_s"],
                    "synthesis_kwh": synthesis["energy_kwh"]["total"],
                    "distillation_s": distillation["duration_s"],
                    "distillation_images_per_s": distillation["work"]["images"] / distillation["duration_s"],
                    "distillation_kwh": distillation["energy_kwh"]["total"],
                }
            )
    for key in ("synthesis", "distillation"):
        base = rows[0][f"{key}_images_per_s"] / rows[0]["ranks"]
        for row in rows:
            row[f"{key}_efficiency"] = row[f"{key}_images_per_s"] / (row["ranks"] * base)
    table = Table(title=f"torchrun scaling: {args.method} synthesis, {args.student} distillation on {args.device}")
    for header in ("ranks", "synth img/s", "synth eff.", "synth kWh", "distill img/s", "distill eff.", "distill kWh"):
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(
            str(row["ranks"]),
            f"{row['synthesis_images_per_s']:.2f}",
            f"{row['synthesis_efficiency']:.2f}",
            f"{row['synthesis_kwh']:.3g}",
            f"{row['distillation_images_per_s']:.1f}",
            f"{row['distillation_efficiency']:.2f}",
            f"{row['distillation_kwh']:.3g}",
        )
    Console().print(table)
    inputs = {key: value for key, value in vars(args).items() if key not in ("out", "device")}
    write_results(args.out, torch.device(args.device.split(":")[0]), argv, rows, device_spec=args.device, **inputs)


if __name__ == "__main__":
    main()
