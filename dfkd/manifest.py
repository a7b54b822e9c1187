"""The run dir's manifest, typed: one section per stage, one reader and one writer.

`manifest.json` holds the resolved configs, versions, seeds, the sha256 of every artifact and the
ledger head. Its keys are the ones dfkd has always written (schema `dfkd.manifest/1`), so a run dir
made by an earlier version reads unchanged; the TypedDicts below name them so that every stage,
the report and the audit agree on them. No torch here.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any, TypedDict

from dfkd.errors import DfkdError
from dfkd.files import atomic_write_json, git_commit, package_versions, utc_now

MANIFEST_SCHEMA = "dfkd.manifest/1"
MANIFEST_FILE = "manifest.json"


class ArtifactEntry(TypedDict):
    """One hashed file of the run, keyed in `artifacts` by its path relative to the run dir."""

    sha256: str
    bytes: int
    stage: str
    role: str


class LedgerHead(TypedDict):
    """The ledger's last record when a stage ended: a record cut from the ledger's end shows here."""

    seq: int
    record_sha256: str


class TeacherRef(TypedDict, total=False):
    path: str
    sha256: str
    arch: str
    num_classes: int  # what chance is (1 / num_classes), for the report's headline
    test_acc: float | None  # the teacher's own test accuracy, as its checkpoint records it
    dataset: str  # what its checkpoint says it was trained on (the report names CIFAR-10's classes by it)
    class_names: list[str]  # in label order, when its checkpoint records them (the preview's row labels)


class SynthesisSection(TypedDict, total=False):
    """Stage 1: its settings (written when it starts) and its results (written when it finishes)."""

    config: dict[str, Any]
    method_config: dict[str, Any]
    config_hash: str
    teacher: TeacherRef
    targets: str
    device: str
    precision: str  # "bf16" or "fp32", what the stage computes in (absent in runs made before it was recorded)
    quality: dict[str, Any]
    shards: int
    images: int
    shared_from: str  # a `dfkd study` sibling that copied this run's set
    mode: str  # "interleaved" when made in rounds against a student; absent for a two-stage set


class DistillationSection(TypedDict, total=False):
    """Stage 2: its settings and identity, the result of each trial, the run's result."""

    config: dict[str, Any]
    identity: str
    identity_source: str
    trials_planned: list[str]
    teacher: TeacherRef
    train_images: int
    holdout_images: int
    source: str
    selection: str
    precision: str  # "bf16" or "fp32" (absent in runs made before it was recorded)
    trials: dict[str, dict[str, Any]]
    result: dict[str, Any]
    finished_utc: str
    interleave: dict[str, Any]  # the interleaved mode's settings, when the student was trained in rounds


class TeacherTrainingSection(TypedDict, total=False):
    """`dfkd teacher train`: its settings, per-epoch log and the checkpoint it wrote."""

    config: dict[str, Any]
    log: list[dict[str, Any]]
    checkpoint: str
    checkpoint_sha256: str
    input_size: int  # measured on the training data, as the checkpoint records
    mean: list[float]
    std: list[float]


class EvaluationSection(TypedDict, total=False):
    """The evaluation step on a finished run: the test data, the student it scored, its result."""

    data: str
    student_sha256: str
    result: dict[str, Any]
    finished_utc: str


class ExportEntry(TypedDict, total=False):
    """A deployable file made by `dfkd export`, keyed in `exports` by its path relative to the run dir: what
    it was checked against, so a reader can tell which student it came from and how faithful it is."""

    format: str  # onnx, torchscript or exported-program
    sha256: str
    bytes: int
    opset: int  # ONNX only
    quantize: str | None  # "dynamic" for int8 weights, None for fp32
    max_abs_diff: float  # of the file's logits against the PyTorch student's, on `checked_on`
    checked_on: str
    source_sha256: str  # the student it was exported from
    top1_agreement: float  # quantized only: % of `checked_on` where its top-1 is the fp32 student's
    accuracy: dict[str, Any]  # quantized with test data: fp32 and int8 accuracy on the whole test split


class Stages(TypedDict, total=False):
    synthesis: SynthesisSection
    distillation: DistillationSection
    teacher: TeacherTrainingSection
    evaluation: EvaluationSection


class Manifest(TypedDict, total=False):
    schema: str
    created: str
    updated: str
    versions: dict[str, str]
    git_commit: str | None
    host: dict[str, str]
    stages: Stages
    artifacts: dict[str, ArtifactEntry]
    exports: dict[str, ExportEntry]
    carbon: dict[str, Any]
    recipe: dict[str, Any]
    ledger_head: LedgerHead


def new_manifest() -> Manifest:
    """The skeleton of a run that has written nothing yet."""
    return {
        "schema": MANIFEST_SCHEMA,
        "created": utc_now(),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "host": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "stages": {},
        "artifacts": {},
    }


def load_manifest(path: Path) -> Manifest | None:
    """The manifest at `path`, or None when there is none; an unreadable one is a `DfkdError`."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DfkdError(f"manifest {path} is unreadable ({exc}): restore it from a backup") from None
    if not isinstance(manifest, dict):
        raise DfkdError(f"manifest {path} is not a JSON object: restore it from a backup")
    manifest.setdefault("stages", {})
    manifest.setdefault("artifacts", {})
    return manifest  # type: ignore[return-value]


def save_manifest(path: Path, manifest: Manifest) -> None:
    """Stamp the manifest as updated now and write it atomically."""
    manifest["updated"] = utc_now()
    atomic_write_json(path, manifest)


def synthesis_of(manifest: Manifest) -> SynthesisSection:
    """The synthesis section (empty when the run has none)."""
    return manifest.get("stages", {}).get("synthesis", {})


def evaluation_of(manifest: Manifest) -> EvaluationSection:
    return manifest.get("stages", {}).get("evaluation", {})


def distillation_of(manifest: Manifest) -> DistillationSection:
    """The distillation section (empty when the run has none)."""
    return manifest.get("stages", {}).get("distillation", {})
