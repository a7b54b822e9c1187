"""The report as one self-contained HTML file an auditor can open in any browser, offline.

Everything is inline: CSS, the SVG charts (energy per stage stacked CPU/GPU/RAM, CO2eq per stage,
generation vs compression per run, each trial's training loss and accuracy per epoch, and accuracy
against CO2eq when several runs are shown) and each run's synthetic preview as a data URI, its rows
labelled with their classes. Axes tick at 1, 2 or 5 times a power of ten. A Content-Security-Policy
forbids the page any network access, so what is seen is what was sent.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from dfkd.files import sha256_file
from dfkd.report.format import (
    ARTIFACT_HEADERS,
    COMPARISON_HEADERS,
    ENERGY_COLUMNS,
    ESTIMATE_HEADERS,
    OVERVIEW_HEADERS,
    PAYBACK_HEADERS,
    STAGE_HEADERS,
    TOTAL_HEADERS,
    WORK_COLUMNS,
    artifact_rows,
    comparison_cells,
    estimate_rows,
    headline_lines,
    number,
    overview_cells,
    payback_line,
    payback_rows,
    stage_cells,
    totals_rows,
)

PART_COLOURS = {"CPU": "#4e79a7", "GPU": "#f28e2b", "RAM": "#59a14f"}
LINE_COLOURS = ("#4e79a7", "#e15759", "#59a14f", "#b07aa1", "#f28e2b", "#76b7b2", "#9c755f", "#edc948")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PHASE_COLOURS = {
    "generation": "#e15759",
    "compression": "#76b7b2",
    "teacher": "#b07aa1",
    "inference": "#edc948",
    "other": "#9c755f",
}
_CHART_WIDTH, _LABEL_WIDTH, _BAR_WIDTH, _ROW_HEIGHT, _TOP = 1100, 330, 500, 24, 56

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2430;
  margin: 24px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 1px solid #d5dae1; }
h3 { font-size: 15px; margin: 18px 0 6px; } .meta { color: #5b6573; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0 10px; }
table.fit { max-width: 100%; } table.fit td { overflow-wrap: break-word; }
.preview { display: flex; gap: 6px; }
.rows { display: grid; height: 320px; font-size: 11px; text-align: right; white-space: nowrap; }
.rows span { display: flex; align-items: center; justify-content: flex-end; }
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
    headers: Sequence[str],
    rows: list[list[str]],
    row_classes: Sequence[str] = (),
    hash_column: int = -1,
    fit: bool = False,
) -> str:
    """A table; `fit` wraps long cells so it never needs a horizontal scrollbar (else it scrolls)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{row_classes[i]}"' if i < len(row_classes) and row_classes[i] else ""
        cells = "".join(f"<td{_HASH_CELL if j == hash_column else ''}>{escape(c)}</td>" for j, c in enumerate(row))
        body.append(f"<tr{css}>{cells}</tr>")
    table = f"<table{' class=fit' if fit else ''}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return table if fit else f'<div class="scroll">{table}</div>'


def nice_ticks(largest: float, count: int = 4) -> list[float]:
    """0 and then steps of 1, 2 or 5 times a power of ten up to the first tick at or above `largest`."""
    if not largest > 0 or not math.isfinite(largest):
        return [0.0, 1.0]
    raw = largest / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    steps = max(1, math.ceil(largest / step * (1 - 1e-9)))
    return [i * step for i in range(steps + 1)]


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
    ticks = nice_ticks(max((sum(value for _, value, _ in bar.segments) for bar in bars), default=0.0))
    largest = ticks[-1]
    height = _TOP + _ROW_HEIGHT * len(bars) + 30
    parts = [f'<text class="title" x="0" y="18">{escape(title)}</text>', _legend(legend, 42)]
    for tick in ticks:
        x = _LABEL_WIDTH + _BAR_WIDTH * tick / largest
        parts.append(f'<line x1="{x:.1f}" y1="{_TOP - 4}" x2="{x:.1f}" y2="{height - 26}" stroke="#e3e7ec"></line>')
        parts.append(f'<text class="axis" x="{x:.1f}" y="{height - 10}" text-anchor="middle">{number(tick)}</text>')
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


Series = tuple[str, str, list[tuple[float, float]]]  # name, colour, (x, y) points


def xy_chart(chart_id: str, title: str, x_unit: str, y_unit: str, series: list[Series], lines: bool = True) -> str:
    """Points (joined by lines, or a scatter) on linear axes from 0 with 1-2-5 ticks, as inline SVG."""
    left, top, width, height = 70, 50, 640, 220
    x_ticks = nice_ticks(max((x for _, _, points in series for x, _ in points), default=0.0))
    y_ticks = nice_ticks(max((y for _, _, points in series for _, y in points), default=0.0))

    def at(x: float, y: float) -> tuple[float, float]:
        return left + width * x / x_ticks[-1], top + height - height * y / y_ticks[-1]

    parts = [f'<text class="title" x="0" y="18">{escape(title)}</text>']
    for tick in x_ticks:
        x, _ = at(tick, 0)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + height}" stroke="#e3e7ec"></line>')
        parts.append(
            f'<text class="axis" x="{x:.1f}" y="{top + height + 16}" text-anchor="middle">{number(tick)}</text>'
        )
    for tick in y_ticks:
        _, y = at(0, tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}" stroke="#e3e7ec"></line>')
        parts.append(f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{number(tick)}</text>')
    parts.append(
        f'<text class="axis" x="{left + width}" y="{top + height + 34}" text-anchor="end">{escape(x_unit)}</text>'
        f'<text class="axis" x="{left - 6}" y="{top - 10}" text-anchor="end">{escape(y_unit)}</text>'
    )
    for index, (name, colour, points) in enumerate(series):
        placed = [at(x, y) for x, y in points]
        if lines and len(placed) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in placed)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"></polyline>')
        for (x, y), (raw_x, raw_y) in zip(placed, points):
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{2.5 if lines else 5}" fill="{colour}">'
                f"<title>{escape(f'{name}: {number(raw_x)} {x_unit}, {number(raw_y)} {y_unit}')}</title></circle>"
            )
        legend_y = top + 14 + 18 * index
        parts.append(
            f'<rect x="{left + width + 20}" y="{legend_y - 10}" width="12" height="12" fill="{colour}"></rect>'
            f'<text x="{left + width + 37}" y="{legend_y}">{escape(name)}</text>'
        )
    total_height = top + height + 44
    return (
        f'<svg id="{chart_id}" role="img" aria-label="{escape(title)}" width="{_CHART_WIDTH}" height="{total_height}" '
        f'viewBox="0 0 {_CHART_WIDTH} {total_height}">{"".join(parts)}</svg>'
    )


def curve_series(report: dict[str, Any], key: str) -> list[Series]:
    """One line per run and trial: `key` (loss, test_acc or holdout_agreement) over the epochs or rounds."""
    several = len(report["runs"]) > 1
    series: list[Series] = []
    for run in report["runs"]:
        for trial, points in run.get("curves", {}).items():
            values = [(float(p["step"]), float(p[key])) for p in points if key in p and p[key] is not None]
            if values:
                name = f"{run['name']} · {trial}" if several else trial
                series.append((name, LINE_COLOURS[len(series) % len(LINE_COLOURS)], values))
    return series


def accuracy_co2_series(report: dict[str, Any]) -> list[Series]:
    """Per run with both figures, its student's headline figure against its total CO2eq."""
    series: list[Series] = []
    for run in report["runs"]:
        head = run["headline"]
        if head["student"] is not None and head["co2eq_g"] is not None:
            point = [(float(head["co2eq_g"]), float(head["student"]["value"]))]
            series.append((run["name"], LINE_COLOURS[len(series) % len(LINE_COLOURS)], point))
    return series


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
    """Each record's CO2eq, coloured by phase (generation, compression, ...); a record metered in phases (the
    interleaved mode's, the inference benchmark's) stacks its parts, each in its own phase's colour."""
    several = len(report["runs"]) > 1
    bars = []
    for run in report["runs"]:
        for row in run["rows"]:
            value = row["co2eq_g"]
            parts = (
                [(p["phase"], p["co2eq_g"]) for p in row["parts"].values()]
                if "parts" in row
                else [(row["phase"], value)]
            )
            segments = [] if value is None else [(phase, co2, PHASE_COLOURS[phase]) for phase, co2 in parts if co2]
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
    names = class_names(run)
    rows = "".join(f"<span>{escape(name)}</span>" for name in names)
    return (
        f'<figure><div class="preview"><div class="rows" style="grid-template-rows: repeat({len(names)}, 1fr)">'
        f'{rows}</div><img src="data:image/png;base64,{data}" alt="synthetic preview of {escape(run["name"])}">'
        f"</div><figcaption>{escape(run['name'])}: {escape(preview['path'])} (one row per class), "
        f"sha256 <code>{escape(preview['sha256'])}</code></figcaption></figure>"
    )


def class_names(run: dict[str, Any]) -> list[str]:
    """The preview's row labels: the class names the teacher's checkpoint records, else CIFAR-10's for a
    10-class teacher whose checkpoint says it was trained on CIFAR-10, else the class indices."""
    teacher = run["config"]["stages"].get("synthesis", {}).get("teacher", {})
    if teacher.get("class_names"):
        return [str(name) for name in teacher["class_names"]]
    classes = int(teacher.get("num_classes") or 0) or 10
    dataset = str(teacher.get("dataset", "")).lower().replace("-", "").replace("_", "")
    if classes == 10 and "cifar10" in dataset:
        return list(CIFAR10_CLASSES)
    return [f"class {c}" for c in range(classes)]


def _estimate_html(run: dict[str, Any]) -> str:
    if "estimate" not in run:
        return ""
    return f"<h3>Estimate (dfkd run --dry-run) vs actual</h3>\n{_table(ESTIMATE_HEADERS, estimate_rows(run), fit=True)}"


def payback_series(payback: dict[str, Any]) -> list[Series]:
    """Cumulative CO2eq against inferences served: the teacher from zero, the student from the run's cost, up
    to twice the break-even (where the lines cross); no lines when a figure is missing or nothing is repaid."""
    cost, repay = payback["cost"]["co2eq_g"], payback["inferences_to_repay"]
    teacher, student = payback["teacher_per_1000"]["co2eq_g"], payback["student_per_1000"]["co2eq_g"]
    if cost is None or repay is None or teacher is None or student is None:
        return []
    end = 2 * repay
    return [
        ("teacher (no distillation)", LINE_COLOURS[1], [(0.0, 0.0), (end, end * teacher / 1000)]),
        ("student (after the run's cost)", LINE_COLOURS[0], [(0.0, cost), (end, cost + end * student / 1000)]),
    ]


def _payback_html(run: dict[str, Any], index: int) -> str:
    if "payback" not in run:
        return ""
    payback = run["payback"]
    series = payback_series(payback)
    chart = (
        xy_chart(f"payback-chart-{index}", "Cumulative CO2eq against inferences served", "inferences",
                 "g CO2eq", series)
        if series
        else ""
    )  # fmt: skip
    caveats = "".join(f"<li>{escape(note)}</li>" for note in payback["caveats"])
    line = payback_line(payback)
    return f"""<h3>Carbon payback (from the inference benchmark)</h3>
<p>{escape(line[:1].upper() + line[1:])}.</p>
{_table(PAYBACK_HEADERS, payback_rows(payback))}
{f'<div class="scroll">{chart}</div>' if chart else ""}
<ul>{caveats}</ul>"""


def _stage_table(columns: Sequence[int], rows: list[list[str]], row_classes: list[str]) -> str:
    """Some of the stage columns: two such tables fit a page, where one of all 18 needed a scrollbar."""
    headers = [STAGE_HEADERS[i] for i in columns]
    return _table(headers, [[cells[i] for i in columns] for cells in rows], row_classes, fit=True)


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
    stage_rows = [stage_cells(r) for r in run["rows"]]
    headline = "".join(f"<li><b>{escape(label)}</b>: {escape(text)}</li>" for label, text in headline_lines(run))
    return f"""
<section class="run" id="run-{index}">
<h2>Run {escape(run["name"])}</h2>
<p class="meta">{escape(run["path"])} · ledger {escape(ledger["file"])}: {ledger["records"]} records, {state},
sha256 <code>{escape(str(ledger["sha256"]))}</code>,
last record <code>{escape(str(ledger["head_record_sha256"]))}</code> ·
manifest sha256 <code>{escape(str(manifest["sha256"]))}</code> ·
git commit <code>{escape(str(manifest["git_commit"]))}</code></p>
<ul>{problems}</ul>
<ul class="headline">{headline}</ul>
<h3>Stages: the work (one row per ledger record)</h3>
{_stage_table(WORK_COLUMNS, stage_rows, row_classes)}
<h3>Stages: energy and carbon</h3>
{_stage_table(ENERGY_COLUMNS, stage_rows, row_classes)}
<h3>Totals</h3>
<p class="meta">Per-part energy without PUE; CO2eq from the energy with PUE.</p>
{_table(TOTAL_HEADERS, totals_rows(run))}
{_estimate_html(run)}
{_payback_html(run, index)}
<h3>How each figure was obtained</h3>
<ul>{provenance}</ul>
<h3>Caveats</h3>
<ul>{caveats}</ul>
<h3>Resolved config</h3>
<details open><summary>manifest stages and carbon settings</summary>
<pre>{escape(json.dumps(run["config"], indent=2, ensure_ascii=False))}</pre></details>
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


def _curve_charts(report: dict[str, Any]) -> list[str]:
    """Training curves from the trials' logs, and accuracy against CO2eq when several runs are shown."""
    charts = []
    loss = curve_series(report, "loss")
    if loss:
        charts.append(xy_chart("loss-chart", "Training loss per epoch (or round)", "epoch", "loss", loss))
    for key, what in (
        ("test_acc", "Test accuracy"),
        ("holdout_agreement", "Agreement with the teacher on held-out images"),
    ):
        series = curve_series(report, key)
        if any(len(points) > 1 for _, _, points in series):
            charts.append(xy_chart(f"{key}-chart", f"{what} per epoch (or round)", "epoch", "%", series))
    scatter = accuracy_co2_series(report)
    if len(scatter) > 1:
        charts.append(
            xy_chart("accuracy-co2-chart", "Student's figure against the run's CO2eq", "g CO2eq", "%", scatter, False)
        )
    return charts


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one HTML document with no external resources."""
    runs = report["runs"]
    phases = {row["phase"] for run in runs for row in run["rows"]}
    phases |= {part["phase"] for run in runs for row in run["rows"] for part in row.get("parts", {}).values()}
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
            *_curve_charts(report),
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
<h2>{"Runs side by side" if len(runs) > 1 else "The run"}</h2>
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
