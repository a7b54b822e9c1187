"""The report as a rich table for people at a terminal, as markdown, or as text in any format.

Both layouts show the cells of `dfkd.report.format`, so they carry the same figures; `render`
is the one entry point for `dfkd report --format ... [--out FILE]`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from dfkd.errors import DfkdError
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
    overview_cells,
    payback_rows,
    stage_cells,
    totals_rows,
)

FORMATS = ("table", "json", "markdown", "html")


def _rich_table(title: str, headers: Sequence[str], rows: list[list[str]], highlight: str = "INTERRUPTED") -> Table:
    """A table whose cells are plain text (a stage named `distillation[tau=2]` is not rich markup)."""
    table = Table(title=Text(title), box=box.SIMPLE_HEAD, title_justify="left")
    for header in headers:
        table.add_column(Text(header), overflow="fold")
    for row in rows:
        table.add_row(*map(Text, row), style="yellow" if any(highlight in cell for cell in row) else None)
    return table


def _columns(rows: list[list[str]], columns: Sequence[int]) -> list[list[str]]:
    return [[row[i] for i in columns] for row in rows]


# Below this width the stage and total tables would squeeze their columns until numbers split: each
# record is shown as a card of label/value lines instead.
WIDE_MIN = 180


class _Records:
    """Rows of cells as tables where the terminal is wide enough, else as one card per row, so that no
    number or word is ever split across lines (rich folds a word only when its column is narrower)."""

    def __init__(self, tables: list[tuple[str, Sequence[str], list[list[str]]]], title: str, key: int = 1) -> None:
        self.tables, self.title, self.key = tables, title, key

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:  # noqa: ARG002
        if options.max_width >= WIDE_MIN:
            for title, headers, rows in self.tables:
                yield _rich_table(title, headers, rows)
            return
        yield Text(self.title, style="bold")
        merged = [dict(zip(headers, row)) for _, headers, rows in self.tables[:1] for row in rows]
        for _, headers, rows in self.tables[1:]:
            for fields, row in zip(merged, rows):
                fields.update(zip(headers, row))
        for fields in merged:
            card = Table.grid(padding=(0, 2))
            card.add_column(no_wrap=True, style="dim")
            card.add_column()
            name = list(fields.values())[self.key]
            for label, value in fields.items():
                card.add_row(Text(label), Text(value))
            yield Text(f"  {name}", style="bold yellow" if "INTERRUPTED" in " ".join(fields.values()) else "bold")
            yield Padding(card, (0, 0, 0, 4))


def _run_renderables(run: dict[str, Any]) -> list[RenderableType]:
    ledger = run["ledger"]
    state = "intact" if ledger["intact"] else f"FAILS ITS CHECK ({len(ledger['problems'])} problems)"
    cells = [stage_cells(r) for r in run["rows"]]
    how = [[e["figure"], e["how"], ", ".join(e["stages"])] for e in run["provenance"]]
    header = Text(f"\nrun {run['name']}  {run['path']}  ledger {ledger['records']} records, ", style="bold")
    header.append(state, style=None if ledger["intact"] else "red")
    headline = Table.grid(padding=(0, 2))
    headline.add_column(style="bold", no_wrap=True)
    headline.add_column()
    for label, text in headline_lines(run):
        headline.add_row(Text(label), Text(text))
    stages = _Records(
        [
            ("stages: the work", [STAGE_HEADERS[i] for i in WORK_COLUMNS], _columns(cells, WORK_COLUMNS)),
            ("stages: energy and carbon", [STAGE_HEADERS[i] for i in ENERGY_COLUMNS], _columns(cells, ENERGY_COLUMNS)),
        ],
        "stages",
    )
    totals_title = "totals (kWh without PUE per part; CO2eq from the energy with PUE)"
    totals = _Records([(totals_title, TOTAL_HEADERS, totals_rows(run))], totals_title, key=0)
    estimate_title = "estimate (dfkd run --dry-run) vs actual"
    estimate = [_Records([(estimate_title, ESTIMATE_HEADERS, estimate_rows(run))], estimate_title, key=0)]
    payback_title = "carbon payback (from the inference benchmark)"
    payback: list[RenderableType] = (
        [
            _Records([(payback_title, PAYBACK_HEADERS, payback_rows(run["payback"]))], payback_title, key=0),
            Text("payback caveats:\n" + "\n".join(f"  - {note}" for note in run["payback"]["caveats"])),
        ]
        if "payback" in run
        else []
    )
    return [
        header,
        headline,
        stages,
        totals,
        *(estimate if "estimate" in run else []),
        *payback,
        _rich_table("how each figure was obtained", ("figure", "how", "stages"), how, highlight="not measured"),
        Text("caveats:\n" + "\n".join(f"  - {note}" for note in run["caveats"])),
    ]


def _comparison_renderables(report: dict[str, Any]) -> list[RenderableType]:
    if not report["comparisons"]:
        return []
    title = "grid-tuned vs stochastic τ (" + report["comparisons"][0]["basis"] + ")"
    table = _Records([(title, COMPARISON_HEADERS, [comparison_cells(c) for c in report["comparisons"]])], title, 0)
    notes = [
        f"  - {c['grid']['run']} vs {c['stochastic']['run']}: {note}"
        for c in report["comparisons"]
        for note in c["notes"]
    ]
    return [table, Text("\n".join(notes))] if notes else [table]


def render_table(report: dict[str, Any]) -> RenderableType:
    """The report for a terminal: per run its stages, totals, provenance and caveats; then the comparisons."""
    parts: list[RenderableType] = [
        Text(f"dfkd carbon report ({report['schema']}, {report['generated_utc']})", style="bold")
    ]
    if len(report["runs"]) > 1:
        overview = [overview_cells(run) for run in report["runs"]]
        parts.append(_Records([("runs side by side", OVERVIEW_HEADERS, overview)], "runs side by side", key=0))
    for run in report["runs"]:
        parts += _run_renderables(run)
    return Group(*parts, *_comparison_renderables(report))


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_cell, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _run_markdown(run: dict[str, Any]) -> list[str]:
    ledger, manifest = run["ledger"], run["manifest"]
    problems = [f"- **ledger problem:** {p}" for p in ledger["problems"]]
    preview = (
        f"Synthetic preview: `{run['path']}/{run['preview']['path']}`" if run["preview"] else "No synthetic preview."
    )
    return [
        f"## Run `{run['name']}`",
        "\n".join(f"- **{label}:** {text}" for label, text in headline_lines(run)),
        f"Path `{run['path']}`; ledger `{ledger['file']}` with {ledger['records']} records, "
        f"{'intact' if ledger['intact'] else '**FAILS ITS CHECK**'}, sha256 `{ledger['sha256']}`, "
        f"last record `{ledger['head_record_sha256']}`; manifest sha256 `{manifest['sha256']}`; "
        f"git commit `{manifest['git_commit']}`.",
        *problems,
        "### Stages (one row per ledger record)",
        markdown_table(STAGE_HEADERS, [stage_cells(r) for r in run["rows"]]),
        "### Totals",
        "Per-part energy is without PUE; CO2eq is computed from the energy with PUE.",
        markdown_table(TOTAL_HEADERS, totals_rows(run)),
        *(
            ["### Estimate (`dfkd run --dry-run`) vs actual", markdown_table(ESTIMATE_HEADERS, estimate_rows(run))]
            if "estimate" in run
            else []
        ),
        *(
            [
                "### Carbon payback (from the inference benchmark)",
                markdown_table(PAYBACK_HEADERS, payback_rows(run["payback"])),
                "\n".join(f"- {note}" for note in run["payback"]["caveats"]),
            ]
            if "payback" in run
            else []
        ),
        "### How each figure was obtained",
        "\n".join(f"- **{e['figure']}** ({', '.join(e['stages'])}): {e['how']}" for e in run["provenance"]),
        "### Caveats",
        "\n".join(f"- {note}" for note in run["caveats"]) or "None.",
        preview,
        "### Resolved config",
        "```json\n" + json.dumps(run["config"], indent=2) + "\n```",
        "### Artifacts",
        markdown_table(ARTIFACT_HEADERS, artifact_rows(run)),
    ]


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report as a markdown document (tables, provenance, caveats, config and hashes)."""
    parts = [
        "# dfkd carbon report",
        f"Schema `{report['schema']}`, generated {report['generated_utc']} by dfkd {report['dfkd_version']}.",
        "## Runs side by side",
        markdown_table(OVERVIEW_HEADERS, [overview_cells(run) for run in report["runs"]]),
    ]
    if report["comparisons"]:
        parts += [
            "## Grid-tuned vs stochastic τ",
            report["comparisons"][0]["basis"].capitalize() + ".",
            markdown_table(COMPARISON_HEADERS, [comparison_cells(c) for c in report["comparisons"]]),
            "\n".join(
                f"- {c['grid']['run']} vs {c['stochastic']['run']}: {n}"
                for c in report["comparisons"]
                for n in c["notes"]
            ),
        ]
    for run in report["runs"]:
        parts += _run_markdown(run)
    return "\n\n".join(part for part in parts if part) + "\n"


def render(report: dict[str, Any], fmt: str, width: int = 160) -> str:
    """The report as text in `fmt` (one of FORMATS); `table` is rendered without colour at `width` columns."""
    if fmt == "json":
        return json.dumps(report, indent=2) + "\n"
    if fmt == "markdown":
        return render_markdown(report)
    if fmt == "html":
        from dfkd.report.html import render_html

        return render_html(report)
    if fmt == "table":
        buffer = io.StringIO()
        Console(file=buffer, width=width, color_system=None, soft_wrap=False).print(render_table(report))
        return buffer.getvalue()
    raise DfkdError(f"unknown report format {fmt!r}: choose one of {', '.join(FORMATS)}")
