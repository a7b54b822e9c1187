"""How each figure of a report was obtained, and what to keep in mind, in plain words.

The ledger labels every figure with the meter's own wording (`energy_sources`, `flops_method`,
`carbon_intensity_source`); an auditor needs to know which figures were measured and which were
estimated or assumed, so each label is translated here, and the caveats that follow from the
records (interrupted attempts, failed metering, whole-machine scope, PUE) are spelt out.
"""

from __future__ import annotations

import re
from typing import Any

# (figure, start of the meter's label, plain words); the first match wins.
_PLAIN: tuple[tuple[str, str, str], ...] = (
    ("CPU energy", "RAPL counter", "measured: the CPU's own energy counter (RAPL), read by codecarbon"),
    (
        "CPU energy",
        "TDP x load estimate",
        "estimated, not measured: codecarbon multiplies the CPU's rated power (TDP) by its load",
    ),
    (
        "CPU energy",
        "constant estimate",
        "rough estimate: codecarbon assumes the CPU draws half its rated power (TDP) throughout",
    ),
    ("CPU energy", "not measured", "not measured: the figure is missing"),
    ("GPU energy", "NVML total-energy counter", "measured: the GPU's own cumulative energy counter (NVML)"),
    (
        "GPU energy",
        "codecarbon's GPU figure",
        "codecarbon's figure from sampled GPU power, because the GPU's energy counter could not be read",
    ),
    ("GPU energy", "no GPU used", "no GPU was used: zero by definition"),
    (
        "RAM energy",
        "fixed estimate",
        "estimated, not measured: codecarbon's fixed power per memory module times the duration",
    ),
    ("RAM energy", "not measured", "not measured: the figure is missing"),
    (
        "FLOPs",
        "counted by torch.utils.flop_counter",
        "counted: torch's FLOP counter on one representative step, times the number of steps",
    ),
    ("FLOPs", "not counted", "not counted for this stage"),
    ("carbon intensity", "given by the user", "given by the user (--grid-intensity), not looked up from a grid table"),
)
_FIGURES = (
    ("CPU energy", "cpu"),
    ("GPU energy", "gpu"),
    ("RAM energy", "ram"),
    ("FLOPs", "flops"),
    ("carbon intensity", "carbon_intensity"),
)


def plain_words(figure: str, source: str) -> str:
    """What the meter's label for `figure` means for how far the figure can be trusted."""
    for known_figure, prefix, plain in _PLAIN:
        if figure == known_figure and source.startswith(prefix):
            return plain
    mix = re.match(r"codecarbon offline energy mix, \w+ \((.+)\)", source)
    if figure == "carbon intensity" and mix:
        return (
            f"the yearly average of {mix.group(1)}'s electricity mix (codecarbon's offline table), "
            "not the grid at the hour the stage ran"
        )
    if "(measured by codecarbon" in source:
        return f"measured by a power sensor, read by codecarbon ({source})"
    return f"as the meter labelled it: {source}"


def provenance(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per figure and way of obtaining it, naming the stages it applies to."""
    entries: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        for figure, key in _FIGURES:
            stages = entries.setdefault((figure, plain_words(figure, row["sources"][key])), [])
            if row["stage"] not in stages:
                stages.append(row["stage"])
    return [{"figure": figure, "how": how, "stages": stages} for (figure, how), stages in entries.items()]


def _stages(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"{row['stage']} seq {row['seq']}" for row in rows)


def caveats(rows: list[dict[str, Any]], ledger_problems: list[str]) -> list[str]:
    """What a reader of the figures must keep in mind, most serious first."""
    notes = [
        f"The ledger fails its integrity check ({problem}): these figures cannot be trusted; run `dfkd audit`."
        for problem in ledger_problems
    ]
    unmetered = [r for r in rows if r["energy_kwh"]["total"] is None]
    if unmetered:
        notes.append(
            f"{len(unmetered)} record(s) have no energy figure because metering failed "
            f"({_stages(unmetered)}): every total is a lower bound and says how many records it lacks."
        )
    notes += [
        f"{r['stage']} (ledger seq {r['seq']}): metering problem: {failure}"
        for r in rows
        for failure in r["metering_failures"]
    ]
    interrupted = [r for r in rows if r["status"] != "complete"]
    if interrupted:
        notes.append(
            f"{len(interrupted)} interrupted attempt(s) ({_stages(interrupted)}) are included in "
            "the totals: that energy was spent. A killed process is recorded up to its last energy snapshot, so its "
            "last seconds are missing."
        )
    if any("whole machine" in str(r["sources"].get(part)) for r in rows for part in ("cpu", "ram")):
        notes.append(
            "CPU and RAM figures cover the whole machine, not only dfkd: "
            "anything else running at the same time is counted too."
        )
    pues = sorted({r["pue"] for r in rows})
    if pues:
        notes.append(
            f"'with PUE' multiplies the energy by the PUE ({', '.join(f'{p:g}' for p in pues)}), "
            "an assumed data-centre "
            "overhead, not a measurement; CO2eq is computed from the energy with PUE."
        )
    if any(r["flops"] is not None for r in rows):
        notes.append(
            "FLOPs are counted on one representative step and multiplied by the steps: evaluation passes and a "
            "last partial batch are not counted exactly."
        )
    return notes
