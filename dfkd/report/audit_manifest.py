"""Cross-checks of a run's manifest against its ledger and its shards, for `dfkd audit`.

The manifest is not hash-chained, so an edit to it shows only where it disagrees with something
that is: the ledger records of the stages (their results, settings and named outputs), the
metadata every shard carries, and the identity hash of the distillation config. Each check
compares the manifest with the last complete ledger record that produced what it states.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from safetensors import safe_open

from dfkd.config.distill import DistillConfig
from dfkd.errors import DfkdError
from dfkd.manifest import DistillationSection, Manifest, SynthesisSection
from dfkd.report.build import INTERLEAVED, phase_of

Record = tuple[int, dict[str, Any]]
_NAMED_OUTPUTS = ("preview", "student")


def short(value: Any) -> str:
    """A value as it appears in an audit line: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _last(records: list[Record], wanted: Callable[[dict[str, Any]], bool]) -> Record | None:
    found = [(line, record) for line, record in records if record.get("status") == "complete" and wanted(record)]
    return found[-1] if found else None


def _compare(place: str, stated: Any, recorded: Any, line: int) -> list[str]:
    """`place` in the manifest states `stated`; ledger line `line` recorded `recorded`."""
    if stated == recorded:
        return []
    if isinstance(stated, dict) and isinstance(recorded, dict):
        keys = sorted(set(stated) | set(recorded))
        return [
            f"manifest.json {place}.{key}: {short(stated.get(key))} "
            f"but ledger line {line} records {short(recorded.get(key))}"
            for key in keys
            if stated.get(key) != recorded.get(key)
        ]
    return [f"manifest.json {place}: {short(stated)} but ledger line {line} records {short(recorded)}"]


def _named_outputs(record: Record, artifacts: dict[str, Any]) -> list[str]:
    """Outputs a vouching record names must still be listed (and so hashed) in the manifest."""
    line, content = record
    return [
        f"manifest.json artifacts: lacks {content['result'][key]}, which ledger line {line} names as its {key}"
        for key in _NAMED_OUTPUTS
        if isinstance(content["result"].get(key), str) and content["result"][key] not in artifacts
    ]


def _without_test_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The manifest keeps a result without its bulky per-class test metrics."""
    return {key: value for key, value in result.items() if key != "test_metrics"}


def _shard_problems(section: SynthesisSection, artifacts: dict[str, Any], run_root: Path) -> list[str]:
    """Every listed shard carries the manifest's method, config hash and teacher hash and its own index and
    image count in its metadata; a shard file the manifest does not list is reported."""
    problems = []
    shards = sorted(
        path for path, entry in artifacts.items() if isinstance(entry, dict) and entry.get("role") == "shard"
    )
    problems += [
        f"{path.relative_to(run_root).as_posix()}: a shard file the manifest does not list "
        "(left by a killed run or added by hand; it is not part of the synthetic set)"
        for path in sorted((run_root / "synthetic").glob("shard-*.safetensors"))
        if path.relative_to(run_root).as_posix() not in shards
    ]
    if section.get("shards") is not None and len(shards) != section["shards"]:
        problems.append(
            f"manifest.json stages.synthesis.shards: {section['shards']} but artifacts list {len(shards)} shards"
        )
    common = {
        "method": section.get("config", {}).get("method"),
        "config_hash": section.get("config_hash"),
        "teacher_sha256": section.get("teacher", {}).get("sha256"),
    }
    for path in shards:
        try:
            with safe_open(str(run_root / path), framework="numpy") as f:
                metadata = f.metadata() or {}
                images = f.get_slice("images").get_shape()[0]
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            problems.append(f"{path}: cannot be read as safetensors ({type(exc).__name__})")
            continue
        expected = {**common, "index": str(int(Path(path).stem.removeprefix("shard-"))), "count": str(images)}
        problems += [
            f"{path}: its metadata {key} {short(metadata.get(key))} differs from {short(value)} "
            f"({'its place and its images' if key in ('index', 'count') else 'manifest.json'})"
            for key, value in expected.items()
            if metadata.get(key) != value
        ]
    return problems


def _synthesis_problems(section: SynthesisSection, records: list[Record], artifacts: dict[str, Any]) -> list[str]:
    if "quality" not in section:
        return []  # started, not finished: the manifest states no result yet
    found = _last(records, lambda r: r.get("stage") in ("synthesis", INTERLEAVED))
    if found is None:
        return ["manifest.json stages.synthesis: states results, but the ledger has no complete synthesis record"]
    line, record = found
    config, info = section.get("config", {}), record["info"]
    return [
        *_compare("stages.synthesis.quality", section["quality"], record["result"].get("quality"), line),
        *_compare("stages.synthesis.shards", section.get("shards"), record["result"].get("shards"), line),
        *[
            problem
            for key in ("method", "num_images", "batch_size")
            for problem in _compare(f"stages.synthesis.config.{key}", config.get(key), info.get(key), line)
        ],
        *_compare(
            "stages.synthesis.method_config.iterations",
            section.get("method_config", {}).get("iterations"),
            record["work"].get("iterations"),
            line,
        ),
        *_named_outputs(found, artifacts),
    ]


def _identity_problems(section: DistillationSection) -> list[str]:
    """The distillation config must still hash to the identity recorded beside it (and in every resume state)."""
    config = dict(section.get("config", {}))
    source = section.get("identity_source", "")
    try:
        distill = DistillConfig(**{**config, "tau_range": tuple(config.get("tau_range", ()))})
    except (TypeError, ValueError, DfkdError) as exc:
        return [f"manifest.json stages.distillation.config: not a valid distillation config ({exc})"]
    # Runs recorded before the identity left the teacher's path out hashed it as given.
    identities = {distill.identity(source), distill.identity(source, teacher_path=distill.teacher)}
    if section.get("identity") not in identities:
        return [
            "manifest.json stages.distillation.config: no longer hashes to its recorded identity "
            "(the config or the identity was edited)"
        ]
    return []


def _trains_student(record: dict[str, Any]) -> bool:
    """A distillation record: a trial, a selection, or the interleaved stage (which also made the set)."""
    stage = str(record.get("stage"))
    return phase_of(stage) == "compression" or stage == INTERLEAVED


def _is_trial(record: dict[str, Any], trial: str) -> bool:
    return _trains_student(record) and record.get("info", {}).get("trial") == trial


def _distillation_problems(section: DistillationSection, records: list[Record], artifacts: dict[str, Any]) -> list[str]:
    problems = _identity_problems(section)
    config = section.get("config", {})
    for trial, stated in section.get("trials", {}).items():
        found = _last(records, partial(_is_trial, trial=trial))
        if found is None:
            problems.append(
                f"manifest.json stages.distillation.trials[{trial}]: the ledger has no complete record of this trial"
            )
            continue
        line, record = found
        problems += _compare(
            f"stages.distillation.trials[{trial}]", stated, _without_test_metrics(record["result"]), line
        )
        for key in ("student", "loss", "tau_per"):
            problems += _compare(f"stages.distillation.config.{key}", config.get(key), record["info"].get(key), line)
        problems += _compare(
            "stages.distillation.config.epochs", config.get("epochs"), record["work"].get("epochs"), line
        )
        problems += _named_outputs(found, artifacts)
    if "result" in section:
        found = _last(records, _trains_student)
        if found is None:
            problems.append("manifest.json stages.distillation.result: the ledger has no complete distillation record")
        else:
            problems += _compare(
                "stages.distillation.result", section["result"], _without_test_metrics(found[1]["result"]), found[0]
            )
    return problems


def _export_problems(exports: dict[str, Any], artifacts: dict[str, Any]) -> list[str]:
    """Each export the manifest lists must be one of its hashed artifacts, with the same sha256 (the artifact
    check then re-hashes the file itself)."""
    problems = []
    for path, entry in exports.items():
        artifact = artifacts.get(path)
        if artifact is None:
            problems.append(f"manifest.json: export {path} is not among the hashed artifacts")
        elif not isinstance(entry, dict) or entry.get("sha256") != artifact.get("sha256"):
            recorded = entry.get("sha256") if isinstance(entry, dict) else entry
            problems.append(
                f"manifest.json: export {path} records sha256 {short(recorded)}, its artifact entry "
                f"{short(artifact.get('sha256'))}"
            )
    return problems


def manifest_problems(manifest: Manifest, records: list[Record], run_root: Path) -> list[str]:
    """Where the manifest's stage sections disagree with the ledger or with the shards' own metadata."""
    stages, artifacts = manifest.get("stages", {}), manifest.get("artifacts", {})
    problems = []
    if "synthesis" in stages:
        problems += _synthesis_problems(stages["synthesis"], records, artifacts)
        problems += _shard_problems(stages["synthesis"], artifacts, run_root)
    if "distillation" in stages:
        problems += _distillation_problems(stages["distillation"], records, artifacts)
    return problems + _export_problems(manifest.get("exports", {}), artifacts)
