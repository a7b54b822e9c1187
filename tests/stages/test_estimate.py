"""`dfkd run RECIPE --dry-run`: each stage's work, FLOPs, time, energy and CO2eq from a measured probe, before
anything runs; kept in the run dir, the report sets it beside what the run then cost (issue 12 item 10)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.ledger import read_ledger
from dfkd.cli import app
from dfkd.config.synthesis import SynthesisConfig
from dfkd.files import sha256_file
from dfkd.report.audit import audit_run
from dfkd.report.build import build_report
from dfkd.report.render import render
from dfkd.rundir import RunDir
from dfkd.stages.estimate import synthesis_seconds
from dfkd.stages.synthesis import batches_left, prepare_synthesis, run_synthesis

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "recipes" / "quickstart.toml")
FAST = str(REPO / "recipes" / "c10_wrn40_2-wrn16_1_fast.toml")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args: str) -> dict:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def test_dry_run_estimates_every_stage_runs_nothing_and_the_report_compares(
    tmp_path: Path, tiny_recipe_sets: list[str]
) -> None:
    run = tmp_path / "run"
    estimate = invoke("run", QUICKSTART, "--dry-run", "--run", str(run), *tiny_recipe_sets)
    synthesis, distillation = estimate["stages"]
    # 48 images x 3 steps; 3 epochs of the 43 training images (48 less 5 held out) in batches of 8: 5 x 8.
    assert (synthesis["stage"], synthesis["units"], synthesis["unit"]) == ("synthesis", 144, "image-step")
    assert (distillation["stage"], distillation["units"], distillation["unit"]) == (
        "distillation",
        120,
        "training image",
    )
    for stage in (synthesis, distillation):
        probe = stage["probe"]
        assert probe["units"] > 0 and probe["seconds"] > 0 and stage["flops"] > 0
        assert stage["seconds"] == pytest.approx(stage["units"] * probe["seconds"] / probe["units"])
        assert stage["energy_kwh_with_pue"] > 0 and stage["co2eq_g"] == pytest.approx(
            stage["energy_kwh_with_pue"] * 400
        )
    assert estimate["total"]["seconds"] == pytest.approx(synthesis["seconds"] + distillation["seconds"])
    # Nothing ran: no ledger record, no shard; the estimate is kept, hashed, for the report.
    assert not (run / "carbon.jsonl").exists() and not (run / "synthetic").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["artifacts"]["estimate.json"]["sha256"] == sha256_file(run / "estimate.json")
    assert build_report([run])["runs"][0]["estimate"][0]["actual"]["seconds"] is None

    invoke("run", QUICKSTART, "--run", str(run), *tiny_recipe_sets)
    entry = build_report([run])["runs"][0]
    by_stage = {row["stage"]: row for row in entry["estimate"]}
    records = {r["stage"]: r for r in read_ledger(run / "carbon.jsonl")}
    for stage in ("synthesis", "distillation"):
        assert by_stage[stage]["estimated"]["seconds"] == pytest.approx(
            next(s for s in estimate["stages"] if s["stage"] == stage)["seconds"]
        )
        assert by_stage[stage]["actual"]["seconds"] == pytest.approx(records[stage]["duration_s"])
    text = render(build_report([run]), "table", width=200)
    assert "estimate (dfkd run --dry-run) vs actual" in text
    assert "Estimate (`dfkd run --dry-run`) vs actual" in render(build_report([run]), "markdown")
    assert "Estimate (dfkd run --dry-run) vs actual" in render(build_report([run]), "html")
    assert audit_run(run) == []


def test_dry_run_of_an_interleaved_recipe_estimates_both_phases(tmp_path: Path, tiny_teacher: Path) -> None:
    sets = {
        "teacher.checkpoint": str(tiny_teacher),
        "run.device": "cpu",
        "synthesize.num_images": "48",
        "synthesize.batch_size": "8",
        "synthesize.iterations": "2",
        "synthesize.settings.nz": "16",
        "synthesize.settings.ngf": "8",
        "interleave.kd_steps": "4",
        "interleave.warmup_rounds": "1",
        "distill.student": "tiny",
        "distill.batch_size": "8",
    }
    estimate = invoke("run", FAST, "--dry-run", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")])
    generation, compression = estimate["stages"]
    assert (generation["stage"], generation["units"]) == ("interleaved: generation", 96)
    assert (compression["stage"], compression["units"]) == ("interleaved: compression", 5 * 4 * 8)  # 5 KD rounds
    assert not Path("runs").exists() or not any(Path("runs").glob("c10_wrn40_2-wrn16_1_fast*")), "no run dir made"


def test_a_rerun_is_estimated_by_what_is_left(tmp_path: Path, tiny_teacher: Path) -> None:
    """The cost guard of `dfkd synthesize` looks at what a rerun still has to make: nothing once finished."""
    config = SynthesisConfig(
        method="deepinversion", teacher=str(tiny_teacher), num_images=12, batch_size=4, device="cpu"
    )
    prepared = prepare_synthesis(config, iterations=1)
    assert batches_left(tmp_path / "new", prepared) == 3 and not (tmp_path / "new").exists()
    run = RunDir.open(tmp_path / "run")
    with run.locked():
        run_synthesis(prepared, run, CarbonConfig(grid_g_per_kwh=400), show_progress=False)
    assert batches_left(run.root, prepared) == 0 and synthesis_seconds(prepared, 0) == 0.0
    other = prepare_synthesis(dataclasses.replace(config, seed=1), iterations=1)
    assert batches_left(run.root, other) == 3, "another set: all of it"
