"""The synthesis stage's memory estimate against measured peaks: per (method, batch size) of a
`bench_synthesis.py` JSON, the bytes `check_memory` would reserve for one batch beside the method's state,
next to the peak GPU memory that run measured.

    python benchmarks/bench_memory.py --measured benchmarks/results/bench-synthesis.json \
        --teacher checkpoints/wrn40_2_cifar10.safetensors --out benchmarks/results/bench-memory-estimate.json

The estimate needs no GPU (it counts activations on the meta device), so it is computed here for the
precision the measured run used (bf16 on CUDA). Prints a table and writes JSON with the date, machine and
command; the measured rows keep the machine and date of their own run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_common import write_results
from rich.console import Console
from rich.table import Table

from dfkd.checkpoints import load_checkpoint
from dfkd.config.overrides import apply_overrides
from synthesizers import get_synthesizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", default="benchmarks/results/bench-synthesis.json")
    parser.add_argument("--teacher", default="checkpoints/wrn40_2_cifar10.safetensors")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--out", default="bench-memory-estimate.json")
    args = parser.parse_args(argv)
    measured = json.loads(Path(args.measured).read_text())
    teacher, meta = load_checkpoint(Path(args.teacher))
    rows = []
    for run in measured["rows"]:
        if run.get("peak_memory_gib") is None:
            continue
        method = get_synthesizer(run["method"])
        config = apply_overrides(method.config_class(), {"iterations": run["iterations"]})
        state, _ = method.persistent_memory(config, teacher)
        per_image = method.bytes_per_image(config, teacher, meta.input_size, args.precision)
        estimate = (state + run["batch_size"] * per_image) / 2**30
        rows.append(
            {
                "method": run["method"],
                "batch_size": run["batch_size"],
                "estimate_gib": estimate,
                "measured_peak_gib": run["peak_memory_gib"],
                "estimate_over_measured": estimate / run["peak_memory_gib"],
            }
        )
    table = Table("method", "batch", "estimate GiB", "measured peak GiB", "estimate / measured", title="memory")
    for r in rows:
        table.add_row(
            r["method"],
            str(r["batch_size"]),
            f"{r['estimate_gib']:.2f}",
            f"{r['measured_peak_gib']:.2f}",
            f"{r['estimate_over_measured']:.2f}",
        )
    Console().print(table)
    source = {k: measured[k] for k in ("date", "machine", "torch", "command")}
    write_results(args.out, torch.device("cpu"), argv, rows, teacher=args.teacher, measured=source)


if __name__ == "__main__":
    main()
