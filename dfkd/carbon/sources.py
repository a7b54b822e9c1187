"""Where a stage's energy comes from: NVML's GPU counter and codecarbon's CPU and RAM meters.

Every figure is labelled with how it was obtained, a failed measurement is recorded as null with
the reason, never as zero, and PUE is applied here (codecarbon runs with PUE 1) so both the raw and
the PUE-scaled energy are kept. Energy comes from codecarbon's offline tracker (CPU via RAPL where
the machine exposes it, else its TDP estimate; RAM by its DIMM model) and NVML's cumulative energy
counter (GPU).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, cast

import torch

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.intensity import carbon_intensity

_MJ_PER_KWH = 3.6e9

# codecarbon logs each measurement at INFO and its fallbacks at WARNING, which would drown the
# CLI's output; its errors still show, and a CODECARBON_LOG_LEVEL the user set wins.
os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")


class _NvmlCounter:
    """A GPU's cumulative energy counter (mJ since the driver loaded), read through NVML."""

    def __init__(self, cuda_index: int) -> None:
        import pynvml

        self._pynvml = pynvml
        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(cuda_index)
        # NVML numbers GPUs its own way (CUDA_VISIBLE_DEVICES does not apply), so match the device itself.
        if hasattr(props, "pci_bus_id"):  # older torch builds lack the PCI fields
            props = cast(Any, props)
            bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            self._handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        else:
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")
        self.nvml_index = int(pynvml.nvmlDeviceGetIndex(self._handle))

    def read_mj(self) -> int:
        return int(self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def close(self) -> None:
        self._pynvml.nvmlShutdown()


def _totals_output(live: Callable[[Any], None], flushed: Callable[[Any], None]) -> Any:
    """A codecarbon output handler: each periodic measurement's running totals go to `live`, the totals
    of a flush (a measurement asked for now) to `flushed`."""
    from codecarbon.output_methods.base_output import BaseOutput

    class Totals(BaseOutput):
        def live_out(self, total: Any, delta: Any) -> None:
            live(total)

        def out(self, total: Any, delta: Any) -> None:
            flushed(total)

    return Totals()


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


class EnergyMeters:
    """One stage's meters: codecarbon for CPU and RAM, NVML for the GPU, started and stopped together.

    `reported` is set after each codecarbon measurement, so snapshots can follow it. Without `host` (the
    ranks of a torchrun job other than each node's local rank 0), only the GPU is metered: codecarbon
    measures the whole machine, so one rank per node meters its CPU and RAM.
    """

    def __init__(
        self, carbon: CarbonConfig, device: torch.device, reported: threading.Event, host: bool = True
    ) -> None:
        self.carbon = carbon
        self.host = host
        self.device = device
        self.intensity, self.intensity_source = carbon_intensity(carbon)
        self.failures: list[str] = []
        self._reported = reported
        self._latest: Any = None
        self._flushed: Any = None
        self._nvml: _NvmlCounter | None = None
        self._nvml_start_mj = 0
        self._tracker: Any = None

    def _codecarbon_meters_gpu(self) -> bool:
        return any(type(hw).__name__ == "GPU" for hw in getattr(self._tracker, "_hardware", []))

    def _receive(self, totals: Any) -> None:
        # Runs on codecarbon's scheduler thread after each measurement.
        self._latest = totals
        self._reported.set()

    def _receive_flush(self, totals: Any) -> None:
        self._flushed = totals

    def reading(self) -> dict[str, float | None]:
        """CPU, GPU and RAM energy in kWh since the stage started, measured now (a phase boundary).

        codecarbon measures on the spot (a flush) and the GPU counter is read after the queued work
        is done, so work before the boundary is billed to the phase before it. None where unmeasured.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._flushed = None
        if self._tracker is not None:
            self._tracker.flush()
        nvml_kwh, _ = self._nvml_kwh()
        energy = self._section(self._flushed, nvml_kwh, [])["energy_kwh"]
        return {part: energy[part] for part in ("cpu", "gpu", "ram")}

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
        if not self.host:
            return
        from codecarbon import OfflineEmissionsTracker

        options: dict[str, Any] = {}
        if self._nvml is not None:
            options["gpu_ids"] = [self._nvml.nvml_index]
        self._tracker = OfflineEmissionsTracker(
            country_iso_code=self.carbon.country.upper(),
            output_methods=[],
            output_handlers=[_totals_output(self._receive, self._receive_flush)],
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
        if self._latest is None and self.host:
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
        if self._tracker is None:
            return self._section(None, nvml_kwh, failures)
        self._tracker.stop()
        data = getattr(self._tracker, "final_emissions_data", None)
        if data is None:
            failures.append(
                "codecarbon reported no energy: it swallowed an error and returned None "
                "(set CODECARBON_LOG_LEVEL=warning to see it)"
            )
        return self._section(data, nvml_kwh, failures)

    def _section(self, data: Any, nvml_kwh: float | None, failures: list[str]) -> dict[str, Any]:
        gpu: float | None
        cpu = data.cpu_energy if data is not None else None if self.host else 0.0
        ram = data.ram_energy if data is not None else None if self.host else 0.0
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
        energy: dict[str, float | None] = {"cpu": cpu, "gpu": gpu, "ram": ram}
        energy["total"] = None if cpu is None or gpu is None or ram is None else cpu + gpu + ram
        pue = self.carbon.pue
        with_pue = {key: None if value is None else value * pue for key, value in energy.items()}
        device: dict[str, Any] = {"type": self.device.type, "name": str(self.device)}
        if self.device.type == "cuda":
            device["gpu_name"] = torch.cuda.get_device_name(self.device)
            device["gpu_count"] = torch.cuda.device_count()
        device["cpu_model"] = data.cpu_model if data is not None else None
        if not self.host:
            cpu_source = ram_source = "metered once for this node, by its local rank 0 (in that rank's share)"
        elif data is None:
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
