"""The evaluation step of a run: the run's student scored on real test data, as a step on a finished run.

A distillation that was given test data (`[evaluate] data`, `--eval-data`) scores its student itself,
inside its own record. Test data named only later — `dfkd run RECIPE --set evaluate.data=PATH` on a
finished run — needs no new synthesis or distillation: this step loads the published student, scores
it on the test split, and records the result as its own metered ledger record (stage `evaluation`)
and in the manifest (`stages.evaluation`), keyed by the data and the student's sha256, so asking
again does nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dfkd.carbon.config import CarbonConfig
from dfkd.carbon.meter import recover_pending
from dfkd.checkpoints import load_checkpoint
from dfkd.config.overrides import config_dict
from dfkd.data import load_split
from dfkd.device import default_precision, prepare_model
from dfkd.errors import DfkdError
from dfkd.files import sha256_file, utc_now
from dfkd.manifest import distillation_of, evaluation_of
from dfkd.rundir import STUDENT_FILE, RunDir
from dfkd.stages.distill import resolved_data
from dfkd.stages.evaluate import check_classes, evaluate_on
from dfkd.stages.runner import StageReport, finished_record, run_metered

STAGE = "evaluation"


def measured_on(run: RunDir, data: str) -> dict[str, Any] | None:
    """The student's recorded test accuracy on `data`, by its distillation or an earlier evaluation step."""
    manifest = run.read_manifest()
    wanted = resolved_data(data)
    result = distillation_of(manifest).get("result", {})
    if result.get("test_data") == wanted and "test_acc" in result:
        return {"test_acc": result["test_acc"], "data": wanted, "by": "distillation"}
    student = run.root / STUDENT_FILE
    recorded = evaluation_of(manifest)
    if recorded.get("data") == wanted and student.is_file() and recorded.get("student_sha256") == sha256_file(student):
        if finished_record(run, lambda r: r.get("stage") == STAGE and r["result"].get("data") == wanted):
            return {"test_acc": recorded.get("result", {})["test_acc"], "data": wanted, "by": STAGE}
    return None


def evaluate_run_student(run: RunDir, data: str, carbon: CarbonConfig, device: torch.device) -> dict[str, Any]:
    """Score the run's published student on the test split of `data` (metered), unless that is recorded.

    The caller holds the run's lock and has finished the run's distillation.
    """
    recover_pending(run.ledger_path)
    found = measured_on(run, data)
    if found is not None:
        return found
    student_path = run.root / STUDENT_FILE
    if not run.artifact_intact(student_path):
        raise DfkdError(f"run dir {run.root} has no intact student to evaluate: finish its distillation first")
    wanted = resolved_data(data)
    model, meta = load_checkpoint(student_path)
    test_set = load_split(Path(wanted), "test", meta.input_size, stream=True)
    check_classes(test_set, meta, student_path)
    digest = sha256_file(student_path)

    precision = default_precision(device)

    def work() -> StageReport:
        prepared = prepare_model(model, device, precision)
        metrics = evaluate_on(prepared, test_set, meta.mean, meta.std, device, precision=precision)
        result = {"test_acc": metrics["accuracy"], "data": wanted, "student": run.relative(student_path)}
        return StageReport(result={**result, "test_metrics": metrics}, work={"images": len(test_set)})

    run.update_manifest(carbon=config_dict(carbon))
    info = {"student_sha256": digest, "data": wanted, "arch": meta.arch, "precision": precision}
    report = run_metered(run, STAGE, carbon, device, info, work)
    result = {k: v for k, v in report.result.items() if k != "test_metrics"}
    run.update_manifest(
        stages={STAGE: {"data": wanted, "student_sha256": digest, "result": result, "finished_utc": utc_now()}}
    )
    return {"test_acc": result["test_acc"], "data": wanted, "by": STAGE}
