"""Synthesis benchmark: image-steps per second and quality, per method and batch size.

    python benchmarks/bench_synthesis.py --teacher checkpoints/wrn40_2_cifar10.safetensors \
        --methods cmi,deepinversion --batch-sizes 256,1024 --iterations 200 --out bench-synthesis.json

For each (method, batch size, compile) it runs one warm-up batch (compilation, cuDNN autotuning),
then times `--repeats` batches of `--iterations` steps with the device synchronised at both ends,
and reports image-steps/s and the teacher's judgement of the timed batches (agreement with the
target, mean confidence). Prints a table and writes JSON with the date, machine and command.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_common import write_results
from rich.console import Console
from rich.table import Table

from dfkd.checkpoints import load_checkpoint
from dfkd.config.overrides import apply_overrides
from dfkd.device import resolve_device
from dfkd.stages.synthesis import batch_targets
from synthesizers import get_synthesizer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(
    teacher, meta, device, method: str, batch_size: int, iterations: int, repeats: int, compile_: bool
) -> dict:
    method_class = get_synthesizer(method)
    config = apply_overrides(method_class.config_class(), {"iterations": iterations, "compile": compile_})
    synthesizer = method_class(teacher, config, device, meta.mean, meta.std, meta.num_classes, meta.input_size)
    torch.manual_seed(0)
    synthesizer.synthesize(batch_targets(0, batch_size, batch_size, meta.num_classes))
    synchronize(device)
    agreements, confidences = [], []
    started = time.perf_counter()
    for index in range(1, repeats + 1):
        targets = batch_targets(index, batch_size, batch_size, meta.num_classes).to(device)
        batch = synthesizer.synthesize(targets)
        probs = batch.logits.softmax(1)
        agreements.append((probs.argmax(1) == targets).float().mean())
        confidences.append(probs.max(1).values.mean())
    synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "method": method,
        "batch_size": batch_size,
        "iterations": iterations,
        "compile": compile_,
        "seconds": seconds,
        "image_steps_per_s": batch_size * iterations * repeats / seconds,
        "target_agreement": float(torch.stack(agreements).mean()) * 100,
        "mean_confidence": float(torch.stack(confidences).mean()),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        # What the synthesis stage's memory check reserves for this batch (see bench_memory.py).
        "estimate_gib": (
            method_class.persistent_memory(config, teacher)[0]
            + batch_size * method_class.bytes_per_image(config, teacher, meta.input_size, synthesizer.precision)
        )
        / 2**30,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="checkpoints/wrn40_2_cifar10.safetensors")
    parser.add_argument("--methods", default="cmi,deepinversion,fast")
    parser.add_argument("--batch-sizes", default="256")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench-synthesis.json")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    teacher, meta = load_checkpoint(Path(args.teacher))
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    for method in args.methods.split(","):
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            for compile_ in compile_modes:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                rows.append(
                    bench_one(teacher, meta, device, method, batch_size, args.iterations, args.repeats, compile_)
                )
                Console(stderr=True).print(rows[-1])
    table = Table(
        "method",
        "batch",
        "iters",
        "compile",
        "image-steps/s",
        "agreement %",
        "confidence",
        "peak GiB",
        "estimate GiB",
        title="synthesis",
    )
    for r in rows:
        table.add_row(
            r["method"],
            str(r["batch_size"]),
            str(r["iterations"]),
            str(r["compile"]),
            f"{r['image_steps_per_s']:,.0f}",
            f"{r['target_agreement']:.1f}",
            f"{r['mean_confidence']:.3f}",
            f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-",
            f"{r['estimate_gib']:.1f}",
        )
    Console().print(table)
    write_results(args.out, device, argv, rows, teacher=args.teacher)


if __name__ == "__main__":
    main()
