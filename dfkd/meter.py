"""The stage meter: energy, CO2eq and FLOPs of one stage, appended to a hash-chained ledger.

`meter(...)` wraps a stage from the outside, as codecarbon does: nothing runs on the stage's hot
path, so what is measured is the stage as it would run unmetered. On exit (normal, exception or
Ctrl-C) it appends exactly one record to `carbon.jsonl`. While the stage runs, a snapshot of the
energy so far is kept in `.pending-<stage>.json` beside the ledger, so a process killed with
SIGKILL still leaves a record once the next stage calls `recover_pending`.

Energy comes from codecarbon's offline tracker (CPU, RAM) and NVML's cumulative energy counter
(GPU). Every figure is labelled with how it was obtained, a failed measurement is recorded as null
with the reason, never as zero, and PUE is applied here (codecarbon runs with PUE 1) so both the
raw and the PUE-scaled energy are kept.

Each ledger line is one JSON record; `prev_sha256` is the sha256 of the previous line and
`record_sha256` that of the record itself, so an edited, removed or reordered line is detected by
`verify_ledger` (a truncated tail is not: nothing after it names it).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dfkd.config import CarbonConfig
from dfkd.errors import DfkdError
from dfkd.rundir import atomic_write_json, package_versions, sha256_bytes, utc_now

LEDGER_SCHEMA = "dfkd.ledger/1"
GENESIS_SHA256 = "0" * 64
_MJ_PER_KWH = 3.6e9

# codecarbon logs each measurement at INFO and its fallbacks at WARNING, which would drown the
# CLI's output; its errors still show, and a CODECARBON_LOG_LEVEL the user set wins.
os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")


@dataclass
class StageOutcome:
    """What the stage runner reports while inside `meter`: its FLOPs, figures and amount of work."""

    flops: float | None = None
    flops_method: str = "not counted"
    result: dict[str, Any] = field(default_factory=dict)
    work: dict[str, Any] = field(default_factory=dict)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn`, counted by torch's FlopCounterMode.

    Call it on one representative step outside the metered loop: the counter slows what it wraps.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _dumps(obj: dict[str, Any]) -> str:
    """The one serialization for writing and hashing, so a parsed line re-dumps to the bytes it hashed."""
    return json.dumps(obj, sort_keys=False)


def _record_sha256(record: dict[str, Any]) -> str:
    """The sha256 of a record's JSON without its own `record_sha256` field."""
    body = {key: value for key, value in record.items() if key != "record_sha256"}
    return sha256_bytes(_dumps(body).encode())


def _ledger_lines(ledger_path: Path) -> list[bytes]:
    try:
        return Path(ledger_path).read_bytes().splitlines()
    except FileNotFoundError:
        return []


def _parse_line(ledger_path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DfkdError(
            f"ledger {ledger_path} line {number} is not valid JSON ({exc.msg}): "
            "restore the ledger from a backup or move it aside to start a new one"
        ) from None
    if not isinstance(record, dict):
        raise DfkdError(f"ledger {ledger_path} line {number} is not a JSON object: restore the ledger or move it aside")
    return record


def read_ledger(ledger_path: Path) -> list[dict[str, Any]]:
    """All records of the ledger, oldest first; a missing ledger has none."""
    return [_parse_line(ledger_path, n, line) for n, line in enumerate(_ledger_lines(ledger_path), 1)]


def append_record(ledger_path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Chain `record` to the ledger's last line and append it durably; returns the record as written.

    The line is written with O_APPEND in one write and fsynced, so it is either wholly on disk or
    not there. Callers hold the run dir's lock, so no other writer interleaves.
    """
    ledger_path = Path(ledger_path)
    existing = ledger_path.read_bytes() if ledger_path.exists() else b""
    lines = existing.splitlines()
    if lines:
        last = _parse_line(ledger_path, len(lines), lines[-1])
        if not isinstance(last.get("seq"), int):
            raise DfkdError(
                f"ledger {ledger_path} line {len(lines)} has no integer seq: restore the ledger or move it aside"
            )
        seq, prev = last["seq"] + 1, sha256_bytes(lines[-1])
    else:
        seq, prev = 0, GENESIS_SHA256
    chain_fields = ("schema", "seq", "prev_sha256", "record_sha256")
    fields = {key: value for key, value in record.items() if key not in chain_fields}
    written = {"schema": LEDGER_SCHEMA, "seq": seq, "prev_sha256": prev, **fields}
    written["record_sha256"] = _record_sha256(written)
    ledger_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(ledger_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with os.fdopen(fd, "wb") as f:
        # A last line saved without its newline (by an editor) must not swallow this one.
        separator = b"\n" if existing and not existing.endswith(b"\n") else b""
        f.write(separator + (_dumps(written) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    return written


def verify_ledger(ledger_path: Path) -> list[str]:
    """Problems found in the ledger, one human-readable line each; an empty list means intact."""
    lines = _ledger_lines(ledger_path)
    problems: list[str] = []
    seqs: list[tuple[int, int]] = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"line {n}: not valid JSON")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {n}: not a JSON object")
            continue
        if record.get("record_sha256") != _record_sha256(record):
            problems.append(f"line {n}: edited record (its content no longer matches its record_sha256)")
        if n == 1 and record.get("prev_sha256") != GENESIS_SHA256:
            problems.append("line 1: broken chain (prev_sha256 is not 64 zeros: the records before it are gone)")
        elif n > 1 and record.get("prev_sha256") != sha256_bytes(lines[n - 2]):
            problems.append(f"line {n}: broken chain (prev_sha256 is not the sha256 of line {n - 1})")
        if isinstance(record.get("seq"), int):
            seqs.append((n, record["seq"]))
        else:
            problems.append(f"line {n}: seq missing or not an integer")
    problems += _seq_problems(seqs)
    return problems


def _seq_problems(seqs: list[tuple[int, int]]) -> list[str]:
    """Duplicate, out-of-order and missing seq numbers, given (line, seq) pairs in file order."""
    problems = []
    first_line: dict[int, int] = {}
    for n, seq in seqs:
        if seq in first_line:
            problems.append(f"line {n}: duplicate seq {seq} (also on line {first_line[seq]})")
        first_line.setdefault(seq, n)
    in_order = sorted(seqs, key=lambda pair: pair[1])
    for (n, seq), expected in zip(seqs, in_order):
        if (n, seq) != expected:
            problems.append(f"line {n}: seq {seq} out of order")
    if seqs:
        for missing in sorted(set(range(max(seq for _, seq in seqs) + 1)) - set(first_line)):
            before = min(n for n, seq in seqs if seq > missing)
            problems.append(f"line {before}: missing record seq {missing} (expected before this line)")
    return problems


def _carbon_intensity(carbon: CarbonConfig) -> tuple[float, str]:
    """Grid intensity in gCO2eq/kWh and where it came from; an unknown country is a `DfkdError`.

    Looked up once from codecarbon's offline table (the figure its own offline tracker applies),
    so it exists even when a stage's measured energy is zero or missing.
    """
    if carbon.grid_g_per_kwh is not None:
        return carbon.grid_g_per_kwh, "given by the user (carbon.grid_g_per_kwh)"
    from codecarbon.core.emissions import Emissions
    from codecarbon.core.units import Energy
    from codecarbon.external.geography import GeoMetadata
    from codecarbon.input import DataSource

    source = DataSource()
    country = carbon.country.upper()
    mix = source.get_global_energy_mix_data()
    if country not in mix:
        raise DfkdError(
            f"country {carbon.country!r} is not in codecarbon's energy-mix table: "
            "set carbon.country to another ISO-3166 alpha-3 code or give carbon.grid_g_per_kwh"
        )
    geo = GeoMetadata(country_iso_code=country)
    kg_per_kwh = Emissions(source).get_country_emissions(Energy.from_energy(kWh=1), geo)
    return kg_per_kwh * 1000, f"codecarbon offline energy mix, {country} ({mix[country]['country_name']})"


class _NvmlCounter:
    """A GPU's cumulative energy counter (mJ since the driver loaded), read through NVML."""

    def __init__(self, cuda_index: int) -> None:
        import pynvml

        self._pynvml = pynvml
        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(cuda_index)
        # NVML numbers GPUs its own way (CUDA_VISIBLE_DEVICES does not apply), so match the device itself.
        if hasattr(props, "pci_bus_id"):
            bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            self._handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        else:
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")
        self.nvml_index = int(pynvml.nvmlDeviceGetIndex(self._handle))

    def read_mj(self) -> int:
        return int(self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def close(self) -> None:
        self._pynvml.nvmlShutdown()


def _live_totals_output(sink: Callable[[Any], None]) -> Any:
    """A codecarbon output handler that passes each periodic measurement's running totals to `sink`."""
    from codecarbon.output_methods.base_output import BaseOutput

    class LiveTotals(BaseOutput):
        def live_out(self, total: Any, delta: Any) -> None:
            sink(total)

    return LiveTotals()


def _cpu_source(tracker: Any, scope: str) -> str:
    """How codecarbon obtains the CPU figure here; it has no public accessor, so its meters are inspected."""
    for hw in getattr(tracker, "_hardware", []):
        if type(hw).__name__ == "CPU":
            if hw._mode in ("intel_rapl", "windows_emi", "intel_power_gadget"):
                return f"RAPL counter (measured by codecarbon's {hw._mode} reader; {scope})"
            if hw._mode == "cpu_load":
                return f"TDP x load estimate (codecarbon, {hw._tdp:g} W TDP; {scope})"
            return f"constant estimate (codecarbon, half of {hw._tdp:g} W TDP; {scope})"
        if type(hw).__name__ in ("AppleSiliconChip", "Raspberry") and hw.chip_part == "CPU":
            return f"{type(hw).__name__} power reading (measured by codecarbon; {scope})"
    return "not measured (codecarbon set up no CPU meter)"


def _ram_source(tracker: Any, data: Any, scope: str) -> str:
    if any(type(hw).__name__ == "RAM" for hw in getattr(tracker, "_hardware", [])):
        return (
            f"fixed estimate ({data.ram_power:g} W for {data.ram_total_size:.1f} GB from codecarbon's "
            f"DIMM-count model, not measured; {scope})"
        )
    return f"board power reading (measured by codecarbon; {scope})"


class _EnergyMeters:
    """One stage's meters: codecarbon for CPU and RAM, NVML for the GPU, started and stopped together.

    `reported` is set after each codecarbon measurement, so snapshots can follow it.
    """

    def __init__(self, carbon: CarbonConfig, device: torch.device, reported: threading.Event) -> None:
        self.carbon = carbon
        self.device = device
        self.intensity, self.intensity_source = _carbon_intensity(carbon)
        self.failures: list[str] = []
        self._reported = reported
        self._latest: Any = None
        self._nvml: _NvmlCounter | None = None
        self._nvml_start_mj = 0
        self._tracker: Any = None

    def _codecarbon_meters_gpu(self) -> bool:
        return any(type(hw).__name__ == "GPU" for hw in getattr(self._tracker, "_hardware", []))

    def _receive(self, totals: Any) -> None:
        # Runs on codecarbon's scheduler thread after each measurement.
        self._latest = totals
        self._reported.set()

    def start(self) -> None:
        if self.device.type == "cuda":
            try:
                self._nvml = _NvmlCounter(self.device.index)
                self._nvml_start_mj = self._nvml.read_mj()
            except Exception as exc:  # no driver, no pynvml, or a GPU without the counter (pre-Volta)
                self._nvml = None
                self.failures.append(
                    f"NVML energy counter unavailable ({type(exc).__name__}: {exc}); the GPU figure is codecarbon's"
                )
        from codecarbon import OfflineEmissionsTracker

        options: dict[str, Any] = {}
        if self._nvml is not None:
            options["gpu_ids"] = [self._nvml.nvml_index]
        self._tracker = OfflineEmissionsTracker(
            country_iso_code=self.carbon.country.upper(),
            output_methods=[],
            output_handlers=[_live_totals_output(self._receive)],
            api_call_interval=1,
            allow_multiple_runs=True,
            measure_power_secs=self.carbon.flush_seconds,
            pue=1,
            tracking_mode="machine",
            **options,
        )
        self._tracker.start()

    def _nvml_kwh(self) -> tuple[float | None, list[str]]:
        if self._nvml is None:
            return None, []
        try:
            return (self._nvml.read_mj() - self._nvml_start_mj) / _MJ_PER_KWH, []
        except Exception as exc:  # pynvml raises its own NVMLError subclasses
            return None, [f"NVML energy counter could not be read ({type(exc).__name__}: {exc})"]

    def snapshot(self) -> dict[str, Any]:
        """Energy so far: codecarbon's totals at its last measurement, the GPU counter now."""
        nvml_kwh, failures = self._nvml_kwh()
        if self._latest is None:
            failures.append("codecarbon had not reported a measurement yet")
        return self._section(self._latest, nvml_kwh, failures)

    def stop(self) -> dict[str, Any]:
        """Stop every meter and return the stage's energy section of the record."""
        failures: list[str] = []
        if self.device.type == "cuda":
            try:
                # Queued kernels still draw power; wait for them so the counters include them.
                torch.cuda.synchronize(self.device)
            except RuntimeError as exc:
                failures.append(f"torch.cuda.synchronize failed ({exc}); GPU work still queued may be missing")
        nvml_kwh, nvml_failures = self._nvml_kwh()
        failures += nvml_failures
        if self._nvml is not None:
            self._nvml.close()
        self._tracker.stop()
        data = getattr(self._tracker, "final_emissions_data", None)
        if data is None:
            failures.append(
                "codecarbon reported no energy: it swallowed an error and returned None "
                "(set CODECARBON_LOG_LEVEL=warning to see it)"
            )
        return self._section(data, nvml_kwh, failures)

    def _section(self, data: Any, nvml_kwh: float | None, failures: list[str]) -> dict[str, Any]:
        cpu = data.cpu_energy if data is not None else None
        ram = data.ram_energy if data is not None else None
        gpu_codecarbon = data.gpu_energy if data is not None else None
        if self.device.type != "cuda":
            gpu, gpu_source = 0.0, "no GPU used"
        elif nvml_kwh is not None:
            gpu, gpu_source = nvml_kwh, "NVML total-energy counter (measured)"
        elif self._codecarbon_meters_gpu():
            gpu, gpu_source = gpu_codecarbon, "codecarbon's GPU figure (dfkd's NVML read failed)"
        else:
            # Neither NVML nor codecarbon saw the GPU: its 0 would be a guess, so the figure is missing.
            gpu, gpu_source = None, "not measured (no NVML counter and no codecarbon GPU meter)"
            failures.append("the GPU's energy was not measured: neither NVML nor codecarbon could read it")
        energy = {"cpu": cpu, "gpu": gpu, "ram": ram}
        energy["total"] = None if None in energy.values() else cpu + gpu + ram
        pue = self.carbon.pue
        with_pue = {key: None if value is None else value * pue for key, value in energy.items()}
        device = {"type": self.device.type, "name": str(self.device)}
        if self.device.type == "cuda":
            device["gpu_name"] = torch.cuda.get_device_name(self.device)
            device["gpu_count"] = torch.cuda.device_count()
        device["cpu_model"] = data.cpu_model if data is not None else None
        if data is None:
            cpu_source = ram_source = "not measured"
        else:
            scope = "whole machine" if data.tracking_mode == "machine" else "this process"
            cpu_source, ram_source = _cpu_source(self._tracker, scope), _ram_source(self._tracker, data, scope)
        all_failures = self.failures + failures
        return {
            "device": device,
            "energy_kwh": energy,
            "pue": pue,
            "energy_kwh_with_pue": with_pue,
            "energy_sources": {"cpu": cpu_source, "gpu": gpu_source, "ram": ram_source},
            "gpu_energy_nvml_kwh": nvml_kwh,
            "gpu_energy_codecarbon_kwh": gpu_codecarbon,
            "carbon_intensity_g_per_kwh": self.intensity,
            "carbon_intensity_source": self.intensity_source,
            "co2eq_g": None if with_pue["total"] is None else with_pue["total"] * self.intensity,
            "metering": {"ok": not all_failures, "failures": all_failures},
        }


def pending_path(ledger_path: Path, stage: str) -> Path:
    """Where the running stage's energy snapshot is kept, beside the ledger."""
    return Path(ledger_path).parent / f".pending-{re.sub(r'[^A-Za-z0-9_.-]', '_', stage)}.json"


class _Snapshots(threading.Thread):
    """Writes a snapshot after each codecarbon measurement, and at least every two flush periods.

    The fallback keeps the GPU counter and elapsed time landing if codecarbon falls silent. A
    failed write is kept in `error` (the stage goes on; only kill protection is lost).
    """

    def __init__(self, write: Callable[[], None], reported: threading.Event, flush_seconds: float) -> None:
        super().__init__(name="dfkd-meter-snapshots", daemon=True)
        self._write = write
        self._reported = reported
        self._timeout = 2 * flush_seconds
        self._stopping = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        while True:
            self._reported.wait(self._timeout)
            self._reported.clear()
            if self._stopping.is_set():
                return
            try:
                self._write()
            except OSError as exc:
                self.error = self.error or f"energy snapshots could not be written ({exc}); a kill would go unrecorded"

    def stop(self) -> None:
        self._stopping.set()
        self._reported.set()
        self.join()


class _Recorder:
    """Builds the stage's record, final or snapshot, from the fixed fields, the outcome and the energy."""

    def __init__(self, stage: str, info: dict[str, Any] | None, outcome: StageOutcome) -> None:
        self.fixed = {"stage": stage, "info": dict(info or {})}
        self.outcome = outcome
        self.versions = package_versions()
        self.start_utc = utc_now()
        self.started = time.perf_counter()

    def record(self, status: str, error: str | None, section: dict[str, Any]) -> dict[str, Any]:
        return {
            **self.fixed,
            "status": status,
            "error": error,
            "start_utc": self.start_utc,
            "end_utc": utc_now(),
            "duration_s": time.perf_counter() - self.started,
            **{key: value for key, value in section.items() if key != "metering"},
            "flops": self.outcome.flops,
            "flops_method": self.outcome.flops_method,
            "result": dict(self.outcome.result),
            "work": dict(self.outcome.work),
            "metering": section["metering"],
            "versions": self.versions,
        }


def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DfkdError(f"device {device} was asked for but CUDA is not available: use --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


@contextmanager
def meter(
    stage: str,
    ledger_path: Path,
    carbon: CarbonConfig,
    device: torch.device | str,
    info: dict[str, Any] | None = None,
) -> Iterator[StageOutcome]:
    """Meter the stage run inside the `with` block and append its record to the ledger on exit.

    The caller fills the yielded `StageOutcome`. An exception or Ctrl-C inside is recorded as
    `interrupted` with its type and message, then re-raised.
    """
    pending = pending_path(ledger_path, stage)
    reported = threading.Event()
    meters = _EnergyMeters(carbon, _resolve_device(device), reported)
    meters.start()
    outcome = StageOutcome()
    recorder = _Recorder(stage, info, outcome)

    def write_snapshot() -> None:
        atomic_write_json(pending, recorder.record("running", None, meters.snapshot()))

    write_snapshot()
    snapshots = _Snapshots(write_snapshot, reported, carbon.flush_seconds)
    snapshots.start()
    error: str | None = None
    try:
        yield outcome
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise
    finally:
        snapshots.stop()
        section = meters.stop()
        if snapshots.error:
            section["metering"] = {"ok": False, "failures": section["metering"]["failures"] + [snapshots.error]}
        append_record(ledger_path, recorder.record("interrupted" if error else "complete", error, section))
        pending.unlink(missing_ok=True)


def recover_pending(ledger_path: Path) -> list[dict[str, Any]]:
    """Turn snapshots left by killed processes into `interrupted` records; returns those appended.

    A snapshot whose stage already has its record (killed between appending and deleting it) is
    only deleted. Call it at the start of every stage, holding the run dir's lock.
    """
    ledger_path = Path(ledger_path)
    recorded = {(r.get("stage"), r.get("start_utc")) for r in read_ledger(ledger_path)}
    snapshots = []
    for path in ledger_path.parent.glob(".pending-*.json"):
        try:
            snapshots.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            raise DfkdError(f"meter snapshot {path} is unreadable ({exc}): delete it to go on") from None
    appended = []
    for path, snapshot in sorted(snapshots, key=lambda item: item[1]["start_utc"]):
        if (snapshot["stage"], snapshot["start_utc"]) not in recorded:
            snapshot["status"] = "interrupted"
            snapshot["error"] = f"process killed; energy measured up to the last flush at {snapshot['end_utc']}"
            appended.append(append_record(ledger_path, snapshot))
        path.unlink()
    # A kill during a snapshot write leaves atomic_write_json's temporary file behind.
    for leftover in ledger_path.parent.glob("..pending-*.tmp"):
        leftover.unlink()
    return appended
