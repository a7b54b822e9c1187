"""`dfkd report`'s model and renderers on real tiny runs: a grid-tuned and a stochastic distillation.

Each run is made by the library as the CLI makes it (DeepInversion on a tiny teacher, then
distillation metered per trial), so the ledgers hold real codecarbon records. The HTML is opened
in headless Chromium, screenshotted and its DOM read back.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.ledger import read_ledger
from dfkd.carbon.meter import pending_path, recover_pending
from dfkd.config.distill import DistillConfig
from dfkd.config.synthesis import SynthesisConfig
from dfkd.errors import DfkdError
from dfkd.files import atomic_write_json
from dfkd.report.build import REPORT_SCHEMA, build_report, load_report
from dfkd.report.format import number, result
from dfkd.report.html import CIFAR10_CLASSES, PART_COLOURS, PHASE_COLOURS, class_names, nice_ticks
from dfkd.report.render import render, render_markdown
from dfkd.rundir import RunDir
from dfkd.stages.distill import distill_run
from dfkd.stages.runner import StageReport, run_metered
from dfkd.stages.synthesis import prepare_synthesis, run_synthesis

CARBON = CarbonConfig(grid_g_per_kwh=400, flush_seconds=0.5)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_run(root: Path, teacher: Path, tau: str) -> Path:
    """A run dir made as `dfkd synthesize` then `dfkd distill --tau TAU` make it, at toy scale."""
    run = RunDir.open(root)
    with run.locked():
        config = SynthesisConfig(
            method="deepinversion", teacher=str(teacher), num_images=40, batch_size=20, device="cpu", quality_sample=20
        )
        prepared = prepare_synthesis(config, iterations=2)
        run_synthesis(prepared, run, CARBON, show_progress=False)
        distill_run(
            DistillConfig(student="tiny", tau=tau, epochs=1, batch_size=8, device="cpu"),
            run,
            CARBON,
            show_progress=False,
        )
    return root


def add_interrupted_attempts(root: Path) -> None:
    """Two interrupted distillation attempts: one that raised (metered), one killed before its first measurement.

    The second goes the way a SIGKILL does: the meter's snapshot (energy still null) is left behind
    and the next stage's `recover_pending` turns it into the record.
    """
    run = RunDir.open(root)
    info = {"student": "tiny", "loss": "hkd", "tau_mode": "stochastic", "trial": "tau=stochastic", "tau_per": "batch"}

    def fail() -> StageReport:
        raise RuntimeError("simulated crash in epoch 1")

    with run.locked(), pytest.raises(RuntimeError):
        run_metered(run, "distillation", CARBON, torch.device("cpu"), info, fail)
    killed = dict(read_ledger(run.ledger_path)[-1])
    for key in ("schema", "seq", "prev_sha256", "record_sha256"):
        del killed[key]
    killed.update(
        status="running", start_utc="2999-01-01T00:00:00.000Z", co2eq_g=None, flops=None, flops_method="not counted"
    )
    # What the meter records for a CPU stage when codecarbon has no measurement: GPU 0 (none used), the rest null.
    killed["energy_kwh"] = killed["energy_kwh_with_pue"] = {"cpu": None, "gpu": 0.0, "ram": None, "total": None}
    killed["energy_sources"] = {"cpu": "not measured", "gpu": "no GPU used", "ram": "not measured"}
    killed["metering"] = {"ok": False, "failures": ["codecarbon had not reported a measurement yet"]}
    atomic_write_json(pending_path(run.ledger_path, "distillation"), killed)
    with run.locked():
        recover_pending(run.ledger_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("report-runs")
    grid = make_run(base / "grid", tiny_teacher, "grid:2,4")
    stochastic = make_run(base / "stochastic", tiny_teacher, "stochastic")
    interrupted = base / "interrupted"
    shutil.copytree(stochastic, interrupted)
    add_interrupted_attempts(interrupted)
    return {"grid": grid, "stochastic": stochastic, "interrupted": interrupted}


@pytest.fixture(scope="module")
def report(runs: dict[str, Path]) -> dict[str, Any]:
    return build_report([runs["grid"], runs["stochastic"]])


def known_sum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return math.fsum(known) if known else None


def test_rows_mirror_the_ledger_one_to_one(report: dict[str, Any], runs: dict[str, Path]) -> None:
    grid = report["runs"][0]
    assert [r["stage"] for r in grid["rows"]] == [
        "synthesis",
        "distillation[tau=2]",
        "distillation[tau=4]",
        "selection",
    ]
    assert [r["phase"] for r in grid["rows"]] == ["generation", "compression", "compression", "compression"]
    for row, record in zip(grid["rows"], read_ledger(runs["grid"] / "carbon.jsonl")):
        assert row["record_sha256"] == record["record_sha256"]
        assert row["energy_kwh"] == record["energy_kwh"] and row["co2eq_g"] == record["co2eq_g"]
    synthesis, trial, _, selection = grid["rows"]
    assert (synthesis["method"], synthesis["result"]["metric"], synthesis["throughput"]["unit"]) == (
        "deepinversion",
        "target_agreement",
        "image-steps/s",
    )
    assert (trial["tau_mode"], trial["tau"], trial["result"]["metric"]) == ("grid", "2", "holdout_agreement")
    assert selection["result"]["winner"] in ("tau=2", "tau=4") and selection["flops"] is None


def test_totals_and_split_equal_the_sums_of_the_records(report: dict[str, Any], runs: dict[str, Path]) -> None:
    for entry, name in zip(report["runs"], ("grid", "stochastic")):
        records = read_ledger(runs[name] / "carbon.jsonl")
        totals = entry["totals"]
        assert totals["records"] == len(records) and totals["fully_metered"] and totals["unmetered"] == 0
        for key in ("energy_kwh", "energy_kwh_with_pue"):
            for part in ("cpu", "gpu", "ram", "total"):
                assert totals[key][part] == pytest.approx(known_sum([r[key][part] for r in records]), rel=1e-12)
        assert totals["co2eq_g"] == pytest.approx(known_sum([r["co2eq_g"] for r in records]), rel=1e-12)
        assert totals["flops"] == pytest.approx(known_sum([r["flops"] for r in records]), rel=1e-12)
        generation, compression = entry["phases"]["generation"], entry["phases"]["compression"]
        assert generation["records"] + compression["records"] == len(records)
        assert generation["co2eq_g"] + compression["co2eq_g"] == pytest.approx(totals["co2eq_g"], rel=1e-12)
        synthesis = [r for r in records if r["stage"] == "synthesis"]
        assert generation["energy_kwh_with_pue"]["total"] == pytest.approx(synthesis[0]["energy_kwh_with_pue"]["total"])


def test_grid_against_stochastic_is_the_papers_comparison(report: dict[str, Any]) -> None:
    (comparison,) = report["comparisons"]
    grid, stochastic = comparison["grid"], comparison["stochastic"]
    assert (grid["run"], stochastic["run"]) == ("grid", "stochastic")
    assert grid["stages"] == ["distillation[tau=2]", "distillation[tau=4]", "selection"] and stochastic["stages"] == [
        "distillation"
    ]
    compression = {entry["name"]: entry["phases"]["compression"] for entry in report["runs"]}
    expected = (
        compression["grid"]["energy_kwh_with_pue"]["total"] / compression["stochastic"]["energy_kwh_with_pue"]["total"]
    )
    assert comparison["energy_ratio"] == pytest.approx(expected)
    assert comparison["co2_ratio"] == pytest.approx(
        compression["grid"]["co2eq_g"] / compression["stochastic"]["co2eq_g"]
    )
    assert comparison["accuracy_metric"] == "holdout_agreement"
    assert comparison["accuracy_difference_pp"] == pytest.approx(
        stochastic["result"]["value"] - grid["result"]["value"]
    )
    assert any("not test accuracy" in note for note in comparison["notes"])


def test_json_round_trip_keeps_the_versioned_schema(report: dict[str, Any], tmp_path: Path) -> None:
    text = render(report, "json")
    assert json.loads(text) == report and json.loads(json.dumps(report)) == report
    assert report["schema"] == REPORT_SCHEMA == "dfkd.report/1"
    (tmp_path / "report.json").write_text(text)
    assert load_report(tmp_path / "report.json") == report
    (tmp_path / "other.json").write_text(json.dumps({**report, "schema": "dfkd.report/0"}))
    with pytest.raises(DfkdError, match="dfkd.report/1"):
        load_report(tmp_path / "other.json")


def test_markdown_and_table_show_every_stage_and_figure(report: dict[str, Any]) -> None:
    markdown, table = render_markdown(report), render(report, "table", width=200)
    for entry in report["runs"]:
        for row in entry["rows"]:
            for text in (
                row["stage"],
                number(row["energy_kwh_with_pue"]["total"]),
                number(row["co2eq_g"]),
                number(row["energy_kwh"]["ram"]),
            ):
                assert text in markdown and text in table
            assert result(row["result"]) in markdown
        for path, artifact in entry["artifacts"].items():
            assert path in markdown and artifact["sha256"] in markdown
        for note in entry["caveats"] + [p["how"] for p in entry["provenance"]]:
            assert note in markdown
        assert '"method": "deepinversion"' in markdown  # the resolved config
    assert f"{report['comparisons'][0]['energy_ratio']:.2f}x" in markdown and "Grid-tuned vs stochastic" in markdown


@pytest.mark.parametrize("width", [80, 100, 200])
def test_the_terminal_report_never_splits_a_figure_and_leads_with_a_headline(
    report: dict[str, Any], width: int
) -> None:
    """Issue 12: at any width every figure's cell appears whole (no number or word broken across lines), and
    the headline (student figure with its meaning, energy, CO2eq, split, time, ledger) comes before the tables."""
    from dfkd.report.format import comparison_cells, headline_lines, overview_cells, stage_cells, totals_rows

    text = render(report, "table", width=width)
    words = set(text.split())
    tables = [overview_cells(entry) for entry in report["runs"]] + [comparison_cells(c) for c in report["comparisons"]]
    for cell in (cell for row in tables for cell in row):
        assert all(word in words or word.strip("();,:") in words for word in cell.split()), (width, cell)
    for entry in report["runs"]:
        cells = [cell for row in entry["rows"] for cell in stage_cells(row)] + [
            cell for row in totals_rows(entry) for cell in row
        ]
        for cell in cells:
            missing = [word for word in cell.split() if word not in words and word.strip("()") not in words]
            assert not missing, (width, cell, missing)
        start = text.index(f"run {entry['name']} ")
        first_table = text.index("stages", start)
        for label, _ in headline_lines(entry):
            assert start < text.index(label, start) < first_table
        assert all(len(line) <= width for line in text.splitlines())


def test_interrupted_and_unmetered_attempts_are_shown_and_counted(runs: dict[str, Path]) -> None:
    entry = build_report([runs["interrupted"]])["runs"][0]
    crashed, killed = entry["rows"][-2:]
    assert crashed["status"] == killed["status"] == "interrupted"
    assert "simulated crash in epoch 1" in crashed["error"] and "process killed" in killed["error"]
    assert entry["totals"]["interrupted"] == entry["interrupted"]["records"] == 2
    # The killed attempt has no energy: the totals say so instead of adding 0.
    assert (entry["totals"]["unmetered"], entry["totals"]["fully_metered"]) == (1, False)
    metered = [
        r["energy_kwh_with_pue"]["total"] for r in entry["rows"] if r["energy_kwh_with_pue"]["total"] is not None
    ]
    assert entry["totals"]["energy_kwh_with_pue"]["total"] == pytest.approx(math.fsum(metered))
    assert entry["interrupted"]["energy_kwh_with_pue"]["total"] == pytest.approx(
        crashed["energy_kwh_with_pue"]["total"]
    )
    assert any("2 interrupted attempt(s)" in c for c in entry["caveats"]) and any(
        "lower bound" in c for c in entry["caveats"]
    )
    markdown = render(build_report([runs["interrupted"]]), "markdown")
    assert "INTERRUPTED: RuntimeError: simulated crash in epoch 1" in markdown
    assert "(1 of 4 not metered)" in markdown and "of which interrupted" in markdown


def test_an_unmetered_record_keeps_the_comparison_from_claiming_a_ratio(runs: dict[str, Path]) -> None:
    (comparison,) = build_report([runs["grid"], runs["interrupted"]])["comparisons"]
    assert comparison["energy_ratio"] is None and comparison["co2_ratio"] is None
    assert comparison["stochastic"]["totals"]["records"] == 3
    assert any("not metered" in note for note in comparison["notes"])


def test_bad_input_is_a_one_line_error_naming_the_fix(tmp_path: Path, report: dict[str, Any]) -> None:
    with pytest.raises(DfkdError, match="pass at least one run dir"):
        build_report([])
    with pytest.raises(DfkdError, match="not a dfkd run dir"):
        build_report([tmp_path])
    with pytest.raises(DfkdError, match="choose one of table, json, markdown, html"):
        render(report, "pdf")


def test_html_is_one_self_contained_file(report: dict[str, Any]) -> None:
    html = render(report, "html")
    assert "http://" not in html and "https://" not in html and "@import" not in html
    assert "default-src 'none'" in html and html.count('src="data:image/png;base64,') == 2
    for chart in ("energy-chart", "co2-chart", "split-chart"):
        assert f'<svg id="{chart}"' in html
    for entry in report["runs"]:
        for row in entry["rows"]:
            assert row["stage"] in html and number(row["co2eq_g"]) in html
        for artifact in entry["artifacts"].values():
            assert artifact["sha256"] in html


@pytest.mark.parametrize("largest", [1e-13, 0.00103, 0.00205, 0.0205, 1.0, 7.3, 380.0, 91.31])
def test_chart_axes_tick_at_1_2_5_times_a_power_of_ten(largest: float) -> None:
    ticks = nice_ticks(largest)
    step = ticks[1]
    assert round(step / 10 ** math.floor(math.log10(step)), 9) in (1, 2, 5)
    assert ticks[0] == 0 and ticks[-1] >= largest > ticks[-2] and 3 <= len(ticks) <= 6
    assert all(math.isclose(tick, i * step) for i, tick in enumerate(ticks))


def test_html_fits_the_page_names_classes_and_draws_training_curves(report: dict[str, Any]) -> None:
    """Issue 12 item 9: no table behind a scrollbar, ± as ±, training curves, accuracy against CO2eq for
    several runs, and a single run not called "runs side by side"."""
    html = render(report, "html")
    assert html.count("<table class=fit>") == 2 * len(report["runs"]), "two stage tables per run, wrapped"
    assert "\\u00b1" not in html and "±1" in html
    assert all(entry["curves"] for entry in report["runs"]), "every run logged its epochs"
    for chart in ("loss-chart", "accuracy-co2-chart"):
        assert f'<svg id="{chart}"' in html
    assert "Runs side by side" in html
    one = render(build_report([Path(report["runs"][0]["path"])]), "html")
    assert "Runs side by side" not in one and "<h2>The run</h2>" in one and "accuracy-co2-chart" not in one
    assert "<span>class 0</span>" in one, "a teacher of unknown classes: its preview rows are numbered"
    cifar = {
        "config": {"stages": {"synthesis": {"teacher": {"num_classes": 10, "dataset": "cifar10-jpeg (imagefolder)"}}}}
    }
    assert class_names(cifar) == list(CIFAR10_CLASSES)
    other = {"config": {"stages": {"synthesis": {"teacher": {"num_classes": 3, "dataset": "mine"}}}}}
    assert class_names(other) == ["class 0", "class 1", "class 2"]


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=90)


def colour_pixels(image: Image.Image, colour: str, tolerance: int = 6) -> int:
    target = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return sum(
        count for count, rgb in image.getcolors(1 << 24) if all(abs(a - b) <= tolerance for a, b in zip(rgb, target))
    )


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)")
def test_html_renders_in_a_real_browser(report: dict[str, Any], tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render(report, "html"))
    shot = tmp_path / "report.png"
    done = chromium([f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()], tmp_path / "profile-shot")
    assert shot.exists(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    colours = image.getcolors(1 << 24)
    non_white = sum(count for count, rgb in colours if min(rgb) < 240)
    assert non_white > 0.05 * 1200 * 2000 and len(colours) > 200, "the screenshot is (nearly) blank"
    # The charts were painted: the RAM segments and the generation / compression bars show in their colours.
    for colour in (PART_COLOURS["RAM"], PART_COLOURS["CPU"], PHASE_COLOURS["generation"], PHASE_COLOURS["compression"]):
        assert colour_pixels(image, colour) > 300, colour

    dom = chromium(["--dump-dom", page.as_uri()], tmp_path / "profile-dom").stdout
    for chart in ("energy-chart", "co2-chart", "split-chart", "loss-chart", "accuracy-co2-chart"):
        assert f'<svg id="{chart}"' in dom
    rows = [row for entry in report["runs"] for row in entry["rows"]]
    assert dom.count("<rect") >= 2 * len(rows)
    for entry in report["runs"]:
        for row in entry["rows"]:
            assert row["stage"] in dom and f"{number(row['energy_kwh_with_pue']['total'])} kWh" in dom
            assert f"{number(row['co2eq_g'])} g" in dom
    assert dom.count('src="data:image/png;base64,') == 2 and "Grid-tuned vs stochastic" in dom
