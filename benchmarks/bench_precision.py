"""fp32 vs bf16 autocast + channels_last: images per second of the passes every stage is made of.

For the embedded teacher's architecture (WRN-40-2) and the student's (WRN-16-1) at 32x32: the teacher's
forward pass (distillation, evaluation), its forward + backward to the input (synthesis) and the
student's training step (forward + backward). Each cell is the median of `--repeats` timed calls after
two warm-up calls, at `--batch`. dfkd computes in bf16 where `native_bf16` says the device has it
(`dfkd.device`); this benchmark measures what that buys on the machine it runs on.

    python benchmarks/bench_precision.py --out benchmarks/results/bench-precision-cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_common import write_results

from dfkd.device import Precision, autocast, native_bf16, prepare_model, resolve_device
from dfkd.models import create_model


def _timed(call: Callable[[], None], device: torch.device, repeats: int) -> float:
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _pass(arch: str, kind: str, precision: Precision, device: torch.device, batch: int) -> Callable[[], None]:
    model = prepare_model(create_model(arch, 10), device, precision)
    layout = torch.channels_last if precision == "bf16" or device.type == "cuda" else torch.contiguous_format
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=layout)
    if kind == "forward":
        model.eval()

        def forward() -> None:
            with torch.no_grad(), autocast(device, precision):
                model(x)

        return forward
    model.train(kind == "train step")
    inputs = x.requires_grad_(kind == "forward + backward to the input")
    model.requires_grad_(kind == "train step")

    def backward() -> None:
        with autocast(device, precision):
            loss = model(inputs).float().logsumexp(1).mean()
        loss.backward()

    return backward


CASES = (("wrn40_2", "forward"), ("wrn40_2", "forward + backward to the input"), ("wrn16_1", "train step"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/bench-precision.json")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    rows = []
    for arch, kind in CASES:
        per_second = {}
        for precision in ("fp32", "bf16"):
            seconds = _timed(_pass(arch, kind, precision, device, args.batch), device, args.repeats)
            per_second[precision] = args.batch / seconds
        rows.append(
            {
                "model": arch,
                "pass": kind,
                "fp32_images_per_s": per_second["fp32"],
                "bf16_images_per_s": per_second["bf16"],
                "speedup": per_second["bf16"] / per_second["fp32"],
            }
        )
    print(f"{device} (native bf16: {native_bf16(device)}), batch {args.batch}, median of {args.repeats}")
    print(f"{'model':<9} {'pass':<32} {'fp32 img/s':>11} {'bf16 img/s':>11} {'speed-up':>9}")
    for row in rows:
        print(
            f"{row['model']:<9} {row['pass']:<32} {row['fp32_images_per_s']:>11.0f} "
            f"{row['bf16_images_per_s']:>11.0f} {row['speedup']:>8.2f}x"
        )
    write_results(args.out, device, argv, rows, batch=args.batch, repeats=args.repeats, native_bf16=native_bf16(device))


if __name__ == "__main__":
    main()
