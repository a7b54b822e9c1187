"""The report as one self-contained HTML file an auditor can open in any browser, offline.

Everything is inline: CSS, the SVG charts (energy per stage stacked CPU/GPU/RAM, CO2eq per stage,
generation vs compression per run) and each run's synthetic preview as a data URI. A
Content-Security-Policy forbids the page any network access, so what is seen is what was sent.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from dfkd.files import sha256_file
from dfkd.report.format import (
    ARTIFACT_HEADERS,
    COMPARISON_HEADERS,
    OVERVIEW_HEADERS,
    STAGE_HEADERS,
    TOTAL_HEADERS,
    artifact_rows,
    comparison_cells,
    number,
    overview_cells,
    stage_cells,
    totals_rows,
)

PART_COLOURS = {"CPU": "#4e79a7", "GPU": "#f28e2b", "RAM": "#59a14f"}
PHASE_COLOURS = {"generation": "#e15759", "compression": "#76b7b2", "teacher": "#b07aa1", "other": "#9c755f"}
_CHART_WIDTH, _LABEL_WIDTH, _BAR_WIDTH, _ROW_HEIGHT, _TOP = 1100, 330, 500, 24, 56

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2430;
  margin: 24px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 1px solid #d5dae1; }
h3 { font-size: 15px; margin: 18px 0 6px; } .meta { color: #5b6573; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0 10px; }
th, td { border: 1px solid #d5dae1; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #eef1f5; } tr.interrupted td { background: #fff4d6; } .warn { color: #b3261e; font-weight: 600; }
code, pre, td.hash { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; font-size: 12px; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; } .previews { display: flex; flex-wrap: wrap; gap: 24px; }
figure { margin: 0; max-width: 340px; } figcaption { overflow-wrap: anywhere; }
figure img { image-rendering: pixelated; width: 320px; border: 1px solid #d5dae1; }
svg text { font: 12px system-ui, sans-serif; fill: #1d2430; } svg .title { font-size: 15px; font-weight: 600; }
svg .missing { fill: #b3261e; font-weight: 600; } svg .axis { fill: #5b6573; font-size: 11px; }
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_HASH_CELL = ' class="hash"'


@dataclass
class Bar:
    """One horizontal bar: its label, coloured segments (name, value, colour), and the text after it."""

    label: str
    segments: list[tuple[str, float, str]]
    text: str
    missing: bool = False
    dashed: bool = False


def _table(
    headers: Sequence[str], rows: list[list[str]], row_classes: Sequence[str] = (), hash_column: int = -1
) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{row_classes[i]}"' if i < len(row_classes) and row_classes[i] else ""
        cells = "".join(f"<td{_HASH_CELL if j == hash_column else ''}>{escape(c)}</td>" for j, c in enumerate(row))
        body.append(f"<tr{css}>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _legend(items: dict[str, str], y: int) -> str:
    parts, x = [], _LABEL_WIDTH
    for name, colour in items.items():
        parts.append(
            f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{colour}"></rect>'
            f'<text x="{x + 17}" y="{y}">{escape(name)}</text>'
        )
        x += 30 + 8 * len(name)
    return "".join(parts)


def bar_chart(chart_id: str, title: str, unit: str, bars: list[Bar], legend: dict[str, str]) -> str:
    """A horizontal bar chart on one linear scale, bars stacked from their segments, as inline SVG."""
    largest = max((sum(value for _, value, _ in bar.segments) for bar in bars), default=0.0) or 1.0
    height = _TOP + _ROW_HEIGHT * len(bars) + 30
    parts = [f'<text class="title" x="0" y="18">{escape(title)}</text>', _legend(legend, 42)]
    for i in range(5):
        x = _LABEL_WIDTH + _BAR_WIDTH * i / 4
        parts.append(f'<line x1="{x:.1f}" y1="{_TOP - 4}" x2="{x:.1f}" y2="{height - 26}" stroke="#e3e7ec"></line>')
        parts.append(
            f'<text class="axis" x="{x:.1f}" y="{height - 10}" text-anchor="middle">{number(largest * i / 4)}</text>'
        )
    parts.append(f'<text class="axis" x="{_LABEL_WIDTH - 8}" y="{height - 10}" text-anchor="end">{escape(unit)}</text>')
    for row, bar in enumerate(bars):
        y = _TOP + row * _ROW_HEIGHT
        parts.append(f'<text x="{_LABEL_WIDTH - 8}" y="{y + 15}" text-anchor="end">{escape(bar.label)}</text>')
        x = float(_LABEL_WIDTH)
        for name, value, colour in bar.segments:
            width = _BAR_WIDTH * value / largest
            parts.append(
                f'<rect x="{x:.2f}" y="{y + 3}" width="{width:.2f}" height="{_ROW_HEIGHT - 6}" fill="{colour}">'
                f"<title>{escape(f'{bar.label}: {name} {number(value)} {unit}')}</title></rect>"
            )
            x += width
        if bar.dashed:
            parts.append(
                f'<rect x="{_LABEL_WIDTH}" y="{y + 2}" width="{max(x - _LABEL_WIDTH, 2):.2f}" '
                f'height="{_ROW_HEIGHT - 4}" '
                'fill="none" stroke="#1d2430" stroke-dasharray="4 3"></rect>'
            )
        css = ' class="missing"' if bar.missing else ""
        parts.append(f'<text{css} x="{x + 6:.2f}" y="{y + 15}">{escape(bar.text)}</text>')
    return (
        f'<svg id="{chart_id}" role="img" aria-label="{escape(title)}" width="{_CHART_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_CHART_WIDTH} {height}">{"".join(parts)}</svg>'
    )


def _row_label(run: dict[str, Any], row: dict[str, Any], several: bool) -> str:
    label = f"{run['name']} · {row['stage']}" if several else row["stage"]
    return label + (" (interrupted)" if row["status"] != "complete" else "")


def energy_bars(report: dict[str, Any]) -> list[Bar]:
    """Each record's energy with PUE, stacked CPU / GPU / RAM; an unmetered record says so instead of 0."""
    several = len(report["runs"]) > 1
    bars = []
    for run in report["runs"]:
        for row in run["rows"]:
            energy = row["energy_kwh_with_pue"]
            parts = [(name, energy[name.lower()], colour) for name, colour in PART_COLOURS.items()]
            known = [(name, value, colour) for name, value, colour in parts if value is not None]
            absent = [name for name, value, _ in parts if value is None]
            text = f"{number(energy['total'])} kWh" if not absent else f"{', '.join(absent)} not metered"
            bars.append(Bar(_row_label(run, row, several), known, text, bool(absent), row["status"] != "complete"))
    return bars


def co2_bars(report: dict[str, Any]) -> list[Bar]:
    """Each record's CO2eq, coloured by phase (generation, compression, ...)."""
    several = len(report["runs"]) > 1
    bars = []
    for run in report["runs"]:
        for row in run["rows"]:
            value = row["co2eq_g"]
            segments = [] if value is None else [(row["phase"], value, PHASE_COLOURS[row["phase"]])]
            text = "not metered" if value is None else f"{number(value)} g"
            bars.append(Bar(_row_label(run, row, several), segments, text, value is None, row["status"] != "complete"))
    return bars


def split_bars(report: dict[str, Any]) -> list[Bar]:
    """Per run, its CO2eq split into phases; a lower bound is marked when records were not metered."""
    bars = []
    for run in report["runs"]:
        segments = [
            (phase, totals["co2eq_g"], PHASE_COLOURS[phase])
            for phase, totals in run["phases"].items()
            if totals["co2eq_g"] is not None
        ]
        totals = run["totals"]
        text = f"{number(totals['co2eq_g'])} g"
        if totals["missing"]["co2eq_g"]:
            text = f">= {text} ({totals['missing']['co2eq_g']} of {totals['records']} records not metered)"
        bars.append(Bar(run["name"], segments, text, bool(totals["missing"]["co2eq_g"])))
    return bars


def _preview_html(run: dict[str, Any]) -> str:
    """The synthetic preview inlined as a data URI, only while it still matches its manifest hash."""
    preview = run["preview"]
    if preview is None:
        return f"<p>{escape(run['name'])}: no synthetic preview.</p>"
    path = Path(run["path"]) / preview["path"]
    if not path.is_file():
        return f'<p class="warn">{escape(run["name"])}: {escape(str(path))} is gone: preview not shown.</p>'
    if sha256_file(path) != preview["sha256"]:
        return (
            f'<p class="warn">{escape(run["name"])}: {escape(str(path))} no longer matches its manifest hash: '
            "not shown; run dfkd audit.</p>"
        )
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="synthetic preview of {escape(run["name"])}">'
        f"<figcaption>{escape(run['name'])}: {escape(preview['path'])} (one row per class), "
        f"sha256 <code>{escape(preview['sha256'])}</code></figcaption></figure>"
    )


def _run_html(run: dict[str, Any], index: int) -> str:
    ledger, manifest = run["ledger"], run["manifest"]
    state = "intact" if ledger["intact"] else '<span class="warn">FAILS ITS INTEGRITY CHECK</span>'
    problems = "".join(f'<li class="warn">{escape(p)}</li>' for p in ledger["problems"])
    provenance = "".join(
        f"<li><b>{escape(e['figure'])}</b> ({escape(', '.join(e['stages']))}): {escape(e['how'])}</li>"
        for e in run["provenance"]
    )
    caveats = "".join(f"<li>{escape(note)}</li>" for note in run["caveats"])
    row_classes = ["interrupted" if r["status"] != "complete" else "" for r in run["rows"]]
    return f"""
<section class="run" id="run-{index}">
<h2>Run {escape(run["name"])}</h2>
<p class="meta">{escape(run["path"])} · ledger {escape(ledger["file"])}: {ledger["records"]} records, {state},
sha256 <code>{escape(str(ledger["sha256"]))}</code>,
last record <code>{escape(str(ledger["head_record_sha256"]))}</code> ·
manifest sha256 <code>{escape(str(manifest["sha256"]))}</code> ·
git commit <code>{escape(str(manifest["git_commit"]))}</code></p>
<ul>{problems}</ul>
<h3>Stages (one row per ledger record)</h3>
{_table(STAGE_HEADERS, [stage_cells(r) for r in run["rows"]], row_classes)}
<h3>Totals</h3>
<p class="meta">Per-part energy without PUE; CO2eq from the energy with PUE.</p>
{_table(TOTAL_HEADERS, totals_rows(run))}
<h3>How each figure was obtained</h3>
<ul>{provenance}</ul>
<h3>Caveats</h3>
<ul>{caveats}</ul>
<h3>Resolved config</h3>
<details open><summary>manifest stages and carbon settings</summary>
<pre>{escape(json.dumps(run["config"], indent=2))}</pre></details>
<h3>Artifacts and their sha256</h3>
{_table(ARTIFACT_HEADERS, artifact_rows(run), hash_column=4)}
</section>"""


def _comparison_html(report: dict[str, Any]) -> str:
    comparisons = report["comparisons"]
    if not comparisons:
        return ""
    notes = "".join(
        f"<li>{escape(c['grid']['run'])} vs {escape(c['stochastic']['run'])}: {escape(note)}</li>"
        for c in comparisons
        for note in c["notes"]
    )
    return f"""
<section id="comparison">
<h2>Grid-tuned vs stochastic τ</h2>
<p>{escape(comparisons[0]["basis"].capitalize())}.</p>
{_table(COMPARISON_HEADERS, [comparison_cells(c) for c in comparisons])}
<ul>{notes}</ul>
</section>"""


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one HTML document with no external resources."""
    runs = report["runs"]
    phases = {row["phase"] for run in runs for row in run["rows"]}
    phase_legend = {phase: colour for phase, colour in PHASE_COLOURS.items() if phase in phases}
    charts = "".join(
        f'<div class="scroll">{chart}</div>'
        for chart in (
            bar_chart(
                "energy-chart",
                "Energy per stage, with PUE (stacked CPU / GPU / RAM)",
                "kWh",
                energy_bars(report),
                PART_COLOURS,
            ),
            bar_chart("co2-chart", "CO2eq per stage", "g CO2eq", co2_bars(report), phase_legend),
            bar_chart(
                "split-chart", "CO2eq per run: generation vs compression", "g CO2eq", split_bars(report), phase_legend
            ),
        )
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<title>dfkd carbon report: {escape(", ".join(run["name"] for run in runs))}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>dfkd carbon report</h1>
<p class="meta">schema {escape(report["schema"])} · generated {escape(report["generated_utc"])}
by dfkd {escape(report["dfkd_version"])}</p>
<h2>Runs side by side</h2>
{_table(OVERVIEW_HEADERS, [overview_cells(run) for run in runs])}
<h2>Charts</h2>
{charts}
{_comparison_html(report)}
<h2>Synthetic previews</h2>
<div class="previews">{"".join(_preview_html(run) for run in runs)}</div>
{"".join(_run_html(run, i) for i, run in enumerate(runs))}
</body>
</html>
"""
