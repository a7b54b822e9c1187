"""How energy becomes CO2eq: the carbon settings every metered stage takes. No torch here.

The country is checked against codecarbon's offline energy-mix table when the config is made, so an
unknown code is refused before any run dir is touched. The table is read as the JSON file codecarbon
ships, without importing codecarbon (which is slow to import and not needed to validate).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_MIX_TABLE = ("data", "private_infra", "global_energy_mix.json")


@cache
def energy_mix_countries() -> dict[str, str]:
    """ISO-3166 alpha-3 code -> country name, as in codecarbon's offline energy-mix table."""
    spec = importlib.util.find_spec("codecarbon")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("codecarbon is not installed: install dfkd's dependencies (pip install -e .)")
    table = Path(next(iter(spec.submodule_search_locations))).joinpath(*_MIX_TABLE)
    mix = json.loads(table.read_text())
    return {code: str(entry.get("country_name", code)) for code, entry in mix.items()}


def _country_problem(country: str) -> str | None:
    """Why `country` cannot be used, with the closest codes or the code of a country named so; None if fine."""
    countries = energy_mix_countries()
    if country.upper() in countries:
        return None
    by_name = {name.lower(): code for code, name in countries.items()}
    close = difflib.get_close_matches(country.upper(), list(countries), n=3, cutoff=0.6)
    close += [by_name[name] for name in difflib.get_close_matches(country.lower(), list(by_name), n=3, cutoff=0.7)]
    hint = f"did you mean {', '.join(dict.fromkeys(close))}?" if close else "e.g. USA, FRA, DEU"
    return f"country {country!r} is not in codecarbon's energy-mix table ({hint}); or give grid_g_per_kwh"


@dataclass(frozen=True)
class CarbonConfig:
    """How energy becomes CO2eq: PUE (the paper's 1.67, the 2019 global average) and the grid.

    Give either `country` (ISO-3166 alpha-3, codecarbon's offline energy-mix table) or an explicit
    `grid_g_per_kwh`; the explicit figure wins. codecarbon's tracker takes the country either way.
    """

    pue: float = 1.67
    country: str = "USA"
    grid_g_per_kwh: float | None = None
    flush_seconds: float = 15.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.pue <= 3.0:
            raise ValueError(f"pue must be within [1, 3], got {self.pue}")
        problem = _country_problem(self.country)
        if problem:
            raise ValueError(problem)
        if self.grid_g_per_kwh is not None and not 0 <= self.grid_g_per_kwh <= 2000:
            raise ValueError(f"grid_g_per_kwh must be within [0, 2000], got {self.grid_g_per_kwh}")
        if not (math.isfinite(self.flush_seconds) and self.flush_seconds > 0):
            raise ValueError(f"flush_seconds must be a positive number, got {self.flush_seconds}")
