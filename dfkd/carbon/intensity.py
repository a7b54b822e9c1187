"""Grid carbon intensity: gCO2eq per kWh, given by the user or from codecarbon's offline table."""

from __future__ import annotations

from dfkd.carbon.config import CarbonConfig


def carbon_intensity(carbon: CarbonConfig) -> tuple[float, str]:
    """Grid intensity in gCO2eq/kWh and where it came from (`CarbonConfig` has checked the country).

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
    geo = GeoMetadata(country_iso_code=country)
    kg_per_kwh = Emissions(source).get_country_emissions(Energy.from_energy(kWh=1), geo)
    return kg_per_kwh * 1000, f"codecarbon offline energy mix, {country} ({mix[country]['country_name']})"
