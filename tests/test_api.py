"""The Python API (issue 12 item 11): `import dfkd` stays light, its functions run the real stages, and the
CLI's commands call them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import dfkd
import dfkd.api
from dfkd.cli import app
from dfkd.errors import DfkdError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_CMI = {"nz": 16, "ngf": 8, "head_dim": 16, "bank_size": 64, "num_negatives": 8}


def test_import_dfkd_loads_no_torch_and_names_its_functions() -> None:
    probe = "import sys, dfkd; print(sorted(m for m in ('torch', 'kornia', 'codecarbon') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert set(dfkd.__all__) == {"audit", "benchmark_inference", "carbon_report", "distill", "estimate", "evaluate",
                                 "export", "load_model", "run", "synthesize"}  # fmt: skip
    assert all(callable(getattr(dfkd, name)) and getattr(dfkd, name).__doc__ for name in dfkd.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dfkd.nothing  # noqa: B018


def test_a_notebook_session_end_to_end(tmp_path: Path, tiny_teacher: Path, cifar_jpeg_root: Path) -> None:
    run = tmp_path / "nb"
    teacher, meta = dfkd.load_model(tiny_teacher)
    assert meta.arch == "tiny" and not teacher.training
    made = dfkd.synthesize(
        run, teacher=tiny_teacher, num_images=24, batch_size=8, iterations=2, device="cpu", settings=TINY_CMI,
        progress=False,
    )  # fmt: skip
    assert made["quality"]["images"] == 24 and made["shards"] == 3
    taught = dfkd.distill(run, epochs=2, student="tiny", batch_size=8, lr=0.4, device="cpu", progress=False)
    assert 0 <= taught["holdout_agreement"] <= 100 and Path(run / taught["student"]).is_file()
    scored = dfkd.evaluate(run / "student" / "student.safetensors", cifar_jpeg_root, device="cpu")
    assert scored["units"]["accuracy, precision, recall, f1, macro_*"] == "percent" and scored["count"] == 10_000
    report = dfkd.carbon_report(run)
    assert [row["stage"] for row in report["runs"][0]["rows"]] == ["synthesis", "distillation"]
    assert "synthesis" in dfkd.carbon_report(run, format="markdown")
    assert dfkd.audit(run) == []
    with pytest.raises(DfkdError, match="unknown method 'gan'"):
        dfkd.synthesize(tmp_path / "bad", teacher=tiny_teacher, num_images=8, method="gan", progress=False)
    assert not (tmp_path / "bad").exists(), "validated before the run dir is made"


def test_the_cli_commands_call_the_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def recorder(name: str, answer: dict[str, Any]) -> Any:
        def call(*args: Any, **kwargs: Any) -> dict[str, Any]:
            seen[name] = (args, kwargs)
            return answer

        return call

    quality = {"images": 1, "target_agreement": 0.0, "mean_confidence": 0.0, "diversity_mean_cosine": 0.0}
    monkeypatch.setattr(dfkd.api, "synthesize", recorder("synthesize", {"run": "r", "quality": quality}))
    monkeypatch.setattr(dfkd.api, "distill", recorder("distill", {"run": "r", "holdout_agreement": 1.0}))
    runner = CliRunner()
    args = ["synthesize", "--method", "fast", "--num-images", "8", "--set", "settings.nz=16", "--run", str(tmp_path)]
    assert runner.invoke(app, [*args, "--json"]).exit_code == 0
    assert json.loads(runner.invoke(app, ["distill", "--run", str(tmp_path), "--epochs", "3", "--json"]).stdout) == {
        "run": "r",
        "holdout_agreement": 1.0,
    }
    _, synthesize_kwargs = seen["synthesize"]
    assert (synthesize_kwargs["method"], synthesize_kwargs["num_images"], synthesize_kwargs["settings"]) == (
        "fast",
        8,
        {"nz": "16"},
    )
    assert seen["distill"][1]["epochs"] == 3
