"""Distillation temperatures: samplers whose state survives a restart (the τ option is parsed in
`dfkd.config.tau`).

Rafat et al. (PLoS ONE 2023) compare a tuned τ (a grid search, one full distillation per τ over
Hinton's range 2..20) with their stochastic τ: a new τ ~ U[2, 20] for every batch, one run, no search.
A grid is run as one `FixedTau` per value; the caller loops over `TauSpec.grid`.
"""

from __future__ import annotations

import base64
import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from dfkd.config.tau import TauSpec
from dfkd.errors import DfkdError


class TauSampler(ABC):
    """Gives the τ for each batch. `state_dict()` is JSON-serialisable (plain numbers and strings)."""

    @abstractmethod
    def sample(self, batch_size: int) -> float | Tensor:
        """τ for the next batch of `batch_size` samples: a float, or a (batch_size,) CPU tensor."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same τ sequence after a restart, JSON-ready."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`; a state from a differently configured sampler is a `DfkdError`."""


def _check_same_config(state: dict[str, Any], own: dict[str, Any]) -> None:
    """A resumed run must draw τ the way the checkpointed one did, or its τ history would silently change."""
    saved = {k: state.get(k) for k in own}
    if saved != own:
        raise DfkdError(
            f"the checkpoint's temperature sampler was {saved} but this run's is {own}: "
            "resume with the same tau settings or start a fresh run"
        )


class FixedTau(TauSampler):
    """The same τ for every batch (a tuned or hand-picked temperature)."""

    def __init__(self, value: float) -> None:
        if not (math.isfinite(value) and value >= 1.0):
            raise ValueError(f"a fixed tau must be a finite number >= 1, got {value}")
        self.value = float(value)

    def sample(self, batch_size: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_same_config(state, self.state_dict())


class StochasticTau(TauSampler):
    """τ ~ U[low, high], drawn anew for every call (every batch), as in Rafat et al. (2023).

    Draws come from a private, seeded CPU `torch.Generator`, so sampling never touches or syncs the
    GPU and is independent of every other random stream in the run. With `per_sample=True` each
    sample of the batch gets its own τ, returned as a (batch_size,) float32 CPU tensor for the caller
    to move to the device with `non_blocking=True`; this per-sample variant is our extension, which
    the paper's per-batch scheme invites, not something the paper evaluates.
    """

    def __init__(self, low: float, high: float, seed: int, per_sample: bool = False) -> None:
        if not (math.isfinite(low) and math.isfinite(high) and 1.0 <= low < high):
            raise ValueError(f"stochastic tau needs 1 <= low < high, got low={low}, high={high}")
        self.low = float(low)
        self.high = float(high)
        self.per_sample = per_sample
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)

    def sample(self, batch_size: int) -> float | Tensor:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        span = self.high - self.low
        if self.per_sample:
            return self.low + span * torch.rand(batch_size, generator=self._generator, dtype=torch.float32)
        # float64 so the Python float carries the full precision of the draw.
        return self.low + span * torch.rand((), generator=self._generator, dtype=torch.float64).item()

    def _config(self) -> dict[str, Any]:
        return {"kind": "stochastic", "low": self.low, "high": self.high, "per_sample": self.per_sample}

    def state_dict(self) -> dict[str, Any]:
        """The configuration plus the generator's state (a uint8 tensor) as a base64 string."""
        raw = self._generator.get_state().numpy().tobytes()
        return {**self._config(), "generator": base64.b64encode(raw).decode("ascii")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_same_config(state, self._config())
        raw = base64.b64decode(state["generator"])
        self._generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def make_sampler(spec: TauSpec, tau_range: tuple[float, float], seed: int, per_sample: bool) -> TauSampler:
    """The sampler for a fixed or stochastic `spec`; a grid spec is run as one `FixedTau` per value."""
    if spec.mode == "grid":
        raise ValueError("a tau grid is one run per value: loop over spec.grid and build FixedTau(value) for each")
    if spec.mode == "fixed":
        if per_sample:
            raise DfkdError(
                f"per-sample tau needs stochastic tau, but tau is fixed at {spec.value:g}: "
                "use tau 'stochastic' or turn per-sample tau off"
            )
        assert spec.value is not None  # guaranteed by TauSpec.__post_init__
        return FixedTau(spec.value)
    low, high = tau_range
    return StochasticTau(low, high, seed, per_sample)
