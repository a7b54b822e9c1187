"""How energy becomes CO2eq: the carbon settings every metered stage takes. No torch here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CarbonConfig:
    """How energy becomes CO2eq: PUE (the paper's 1.67, the 2019 global average) and the grid.

    Give either `country` (ISO-3166 alpha-3, codecarbon's offline energy-mix table) or an explicit
    `grid_g_per_kwh`; the explicit figure wins.
    """

    pue: float = 1.67
    country: str = "USA"
    grid_g_per_kwh: float | None = None
    flush_seconds: float = 15.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.pue <= 3.0:
            raise ValueError(f"pue must be within [1, 3], got {self.pue}")
        if len(self.country) != 3 or not self.country.isalpha():
            raise ValueError(f"country must be an ISO-3166 alpha-3 code such as USA or FRA, got {self.country!r}")
        if self.grid_g_per_kwh is not None and not 0 <= self.grid_g_per_kwh <= 2000:
            raise ValueError(f"grid_g_per_kwh must be within [0, 2000], got {self.grid_g_per_kwh}")
        if self.flush_seconds <= 0:
            raise ValueError("flush_seconds must be positive")
