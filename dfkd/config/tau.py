"""The τ option: "stochastic", a fixed number ≥ 1 ("4", "2.5"), "grid" (the integers 2..20) or
"grid:2,4,8,16". No torch here; the samplers that draw τ live in `dfkd.tau`.

Rafat et al. (PLoS ONE 2023) compare a tuned τ (a grid search, one full distillation per τ over
Hinton's range 2..20) with their stochastic τ: a new τ ~ U[2, 20] for every batch, one run, no search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from dfkd.errors import DfkdError

HINTON_GRID: tuple[float, ...] = tuple(float(v) for v in range(2, 21))
_TAU_FORMS = "use 'stochastic', a number >= 1 such as 4 or 2.5, 'grid' (2..20) or 'grid:2,4,8,16'"


@dataclass(frozen=True)
class TauSpec:
    """A parsed τ option: `value` is set only for "fixed", `grid` only for "grid"."""

    mode: Literal["stochastic", "fixed", "grid"]
    value: float | None = None
    grid: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if (self.mode == "fixed") != (self.value is not None) or (self.mode == "grid") != bool(self.grid):
            raise ValueError(f"inconsistent TauSpec: mode {self.mode!r}, value {self.value}, grid {self.grid}")


def _temperature(text: str) -> float | None:
    """`text` as a finite float ≥ 1, or None when it is not one."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 1.0 else None


def parse_tau(spec: str) -> TauSpec:
    """Parse the τ option; anything but the accepted forms is a `DfkdError` listing them."""
    text = spec.strip().lower()
    if text == "stochastic":
        return TauSpec("stochastic")
    if text == "grid":
        return TauSpec("grid", grid=HINTON_GRID)
    if text.startswith("grid:"):
        values = [_temperature(item) for item in text[len("grid:") :].split(",")]
        if any(v is None for v in values):
            raise DfkdError(f"tau {spec!r} has an entry that is not a number >= 1: {_TAU_FORMS}")
        if len(set(values)) != len(values):
            raise DfkdError(f"tau {spec!r} repeats a value: list each temperature once, e.g. 'grid:2,4,8,16'")
        return TauSpec("grid", grid=tuple(v for v in values if v is not None))
    value = _temperature(text)
    if value is None:
        raise DfkdError(f"tau {spec!r} is not valid: {_TAU_FORMS}")
    return TauSpec("fixed", value=value)


def parse_tau_range(text: str) -> tuple[float, float]:
    """`"2,20"` -> `(2.0, 20.0)`: the bounds of stochastic τ, with 1 ≤ low < high."""
    parts = text.split(",")
    low, high = (_temperature(parts[0]), _temperature(parts[1])) if len(parts) == 2 else (None, None)
    if low is None or high is None or low >= high:
        raise DfkdError(f"tau range {text!r} is invalid: give 'low,high' with 1 <= low < high, e.g. '2,20'")
    return low, high
