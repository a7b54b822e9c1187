#!/usr/bin/env bash
# The issue-11 GPU check as one prepared command for the device tool (about 9 minutes):
#   run(command="bash benchmarks/device_check.sh", carry=[".devdata/cifar10-jpeg.tar.gz", ".venv"], timeout_s=600)
# It unpacks the JPEG CIFAR-10 copy carried in .devdata/, runs bench_e2e.py --scale full (the fast
# interleaved recipe as shipped, hard limit 540 s) and leaves the JSON and the run's ledger under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/dfkd-device}"
mkdir -p "$out" .devdata
[ -d .devdata/cifar10-jpeg ] || tar -xzf .devdata/cifar10-jpeg.tar.gz -C .devdata
nvidia-smi --query-gpu=name,driver_version,power.draw --format=csv > "$out/gpu.csv" || true
python benchmarks/bench_e2e.py --scale full --data .devdata/cifar10-jpeg --workdir runs/bench-e2e \
    --out "$out/bench-e2e-full.json" 2>&1 | tee "$out/bench-e2e-full.log"
cp runs/bench-e2e/*/carbon.jsonl "$out/" 2>/dev/null || true
