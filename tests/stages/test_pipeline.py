"""`dfkd run` and `dfkd study tau` end to end through the CLI, on the quickstart recipe shrunk to a tiny model.

The quickstart at its own scale (a few minutes on 2 CPU cores) is checked by hand, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import image_folder
from typer.testing import CliRunner

from dfkd.carbon.ledger import read_ledger
from dfkd.cli import app
from dfkd.report.audit import audit_run

QUICKSTART = str(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.toml")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args: str) -> dict:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def test_quickstart_runs_every_stage_metered_resumes_and_audits(tmp_path: Path, tiny_recipe_sets: list[str]) -> None:
    run = tmp_path / "run"
    summary = invoke("run", QUICKSTART, "--run", str(run), *tiny_recipe_sets)
    assert summary["synthesis"]["quality"]["images"] == 48 and summary["synthesis"]["shards"] == 12
    # Issue 12: `dfkd run --json` carries the run's energy and CO2eq (the report's headline figures).
    carbon = summary["carbon"]
    assert carbon["energy_kwh_with_pue"] > 0 and carbon["co2eq_g"] > 0 and carbon["ledger_intact"]
    # Seeded golden value: the tiny student matches the tiny teacher on every held-out image.
    assert summary["distillation"]["holdout_agreement"] == pytest.approx(100.0)
    assert [(r["stage"], r["status"]) for r in read_ledger(run / "carbon.jsonl")] == [
        ("synthesis", "complete"),
        ("distillation", "complete"),
        ("inference-benchmark", "complete"),  # issue 14: the quickstart's [inference]
    ]
    assert (run / "student" / "student.safetensors").exists()
    # Issue 14: the quickstart's [export]: the student as ONNX, checked and hashed in the manifest.
    (exported,) = summary["export"]
    assert exported["format"] == "onnx" and exported["max_abs_diff"] <= 1e-3
    assert summary["inference"]["models"]["student"]["onnx"] is not None  # the benchmark timed that export
    saved = json.loads((run / "recipe.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    assert saved == manifest["recipe"] and saved["distill"]["epochs"] == 3 and saved["name"] == "quickstart"
    assert manifest["artifacts"]["recipe.json"]["role"] == "recipe"
    assert audit_run(run) == []

    written = Path(exported["path"]).stat().st_mtime_ns
    # The same command again: nothing to do, nothing metered.
    again = invoke("run", QUICKSTART, "--run", str(run), *tiny_recipe_sets)
    assert again["synthesis_work"]["already_finished"] and len(read_ledger(run / "carbon.jsonl")) == 3
    assert again["export"][0]["sha256"] == exported["sha256"] and again["export"][0]["path"] == exported["path"]
    assert Path(exported["path"]).stat().st_mtime_ns == written, "an intact export of this student is not redone"

    # Other settings on the same run dir are refused, naming what differs.
    result = CliRunner().invoke(
        app, ["run", QUICKSTART, "--run", str(run), *tiny_recipe_sets, "--set", "distill.epochs=4"]
    )
    assert result.exit_code == 2 and "distill.epochs" in result.stderr


def test_run_prints_the_report(tmp_path: Path, tiny_recipe_sets: list[str]) -> None:
    result = CliRunner().invoke(
        app, ["run", QUICKSTART, "--run", str(tmp_path / "run"), *tiny_recipe_sets], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "dfkd carbon report" in result.stdout and "agreement with the teacher" in result.stdout


def test_study_tau_shares_one_synthetic_set_and_compares(tmp_path: Path, tiny_recipe_sets: list[str]) -> None:
    study = tmp_path / "study"
    out = invoke("study", "tau", QUICKSTART, "--run", str(study), *tiny_recipe_sets, "--set", "distill.tau=grid:2,4")
    (comparison,) = out["comparisons"]
    assert comparison["grid"]["stages"] == ["distillation[tau=2]", "distillation[tau=4]", "selection"]
    assert comparison["stochastic"]["stages"] == ["distillation"]
    assert comparison["grid"]["synthetic_set"] == comparison["stochastic"]["synthetic_set"]
    assert comparison["energy_ratio"] is not None and comparison["accuracy_metric"] == "holdout_agreement"
    assert (
        json.loads((study / "tau-study.json").read_text())["comparisons"][0]["energy_ratio"]
        == comparison["energy_ratio"]
    )
    grid_shards = sorted(p.name for p in (study / "grid" / "synthetic").glob("shard-*"))
    assert (
        grid_shards == sorted(p.name for p in (study / "stochastic" / "synthetic").glob("shard-*"))
        and len(grid_shards) == 12
    )
    for p in grid_shards:
        assert (study / "grid" / "synthetic" / p).read_bytes() == (study / "stochastic" / "synthetic" / p).read_bytes()
    # The images are made (and metered) once, in the stochastic run.
    assert [r["stage"] for r in read_ledger(study / "grid" / "carbon.jsonl")] == [
        "distillation[tau=2]",
        "distillation[tau=4]",
        "selection",
    ]
    assert audit_run(study / "grid") == [] and audit_run(study / "stochastic") == []


def test_a_finished_run_gains_an_evaluation_without_redoing_its_stages(
    tmp_path: Path, tiny_recipe_sets: list[str]
) -> None:
    """Issue 12: evaluation is a step on a finished run; only settings that change a stage's output refuse."""
    run = tmp_path / "run"
    first = invoke("run", QUICKSTART, "--run", str(run), *tiny_recipe_sets)
    assert "test_acc" not in first["distillation"]
    data = image_folder(tmp_path / "data", 10)
    extended = invoke("run", QUICKSTART, "--run", str(run), *tiny_recipe_sets, "--set", f"evaluate.data={data}")
    assert 0 <= extended["distillation"]["test_acc"] <= 100
    assert extended["distillation"]["test_data"] == str(data.resolve())
    stages = [r["stage"] for r in read_ledger(run / "carbon.jsonl")]
    # The quickstart's [inference] ran on the first call; the later data adds only the evaluation.
    assert stages == ["synthesis", "distillation", "inference-benchmark", "evaluation"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recipe"]["evaluate"]["data"] == str(data)  # the recorded recipe is the latest
    assert manifest["stages"]["evaluation"]["result"]["test_acc"] == extended["distillation"]["test_acc"]
    assert audit_run(run) == []

    # Asked again: recorded, nothing metered. A description or the carbon settings may change too.
    again = invoke(
        "run", QUICKSTART, "--run", str(run), *tiny_recipe_sets, "--set", f"evaluate.data={data}",
        "--set", "run.description=renamed", "--set", "carbon.pue=1.2",
    )  # fmt: skip
    assert again["distillation"]["test_acc"] == extended["distillation"]["test_acc"]
    assert len(read_ledger(run / "carbon.jsonl")) == 4

    # Another recipe (here: the same settings under another name) is still refused, naming what differs once.
    renamed = tmp_path / "renamed.toml"
    renamed.write_text(Path(QUICKSTART).read_text())
    result = CliRunner().invoke(app, ["run", str(renamed), "--run", str(run), *tiny_recipe_sets])
    assert result.exit_code == 2 and "(name differ)" in result.stderr


def test_a_batch_larger_than_the_set_is_refused_before_any_work(tmp_path: Path, tiny_recipe_sets: list[str]) -> None:
    result = CliRunner().invoke(
        app, ["run", QUICKSTART, "--run", str(tmp_path / "run"), *tiny_recipe_sets, "--set", "distill.batch_size=64"]
    )
    assert result.exit_code == 2
    assert "distill.batch_size = 64 is larger than the 43 training images" in result.stderr
    assert not (tmp_path / "run").exists()
