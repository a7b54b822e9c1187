"""`dfkd run` and `dfkd study tau`: a recipe's stages in one run dir, through the stages' own library calls.

Synthesis and distillation run exactly as `dfkd synthesize` and `dfkd distill` run them
(`run_synthesis`, `distill_run`), each metered into the run's ledger; the evaluation on real test
data (`[evaluate] data`) is part of the distillation stage and of its record. Rerunning on the
same run dir resumes: a finished stage does no work and meters nothing.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from dfkd.checkpoints import read_meta
from dfkd.collective import agree, from_primary, job_lock, joined, use_local_gpu
from dfkd.config.deploy import InferenceSection
from dfkd.config.recipe import Recipe
from dfkd.data import Split, check_data_path, split_classes
from dfkd.device import resolve_device
from dfkd.distributed import SINGLE, check_single_process, current_world, world_of
from dfkd.errors import DfkdError
from dfkd.files import atomic_path, atomic_write_json, sha256_file
from dfkd.manifest import distillation_of, synthesis_of
from dfkd.report.build import build_report
from dfkd.report.payback import BENCHMARK
from dfkd.rundir import ESTIMATE_FILE, STUDENT_FILE, SYNTHETIC_DIR, RunDir
from dfkd.stages.distill import check_same_distillation, distill_run, recorded_identity, student_source
from dfkd.stages.evaluate import check_classes
from dfkd.stages.evaluation import evaluate_run_student
from dfkd.stages.export import check_request, default_out, export_source
from dfkd.stages.inference import benchmark_run, prepare_benchmark
from dfkd.stages.interleaved import check_same_interleaved, prepare_interleaved, run_interleaved
from dfkd.stages.runner import finished_record
from dfkd.stages.synthesis import check_same_synthesis, prepare_synthesis, run_synthesis
from dfkd.synthetic_set import SyntheticSet

RECIPE_FILE = "recipe.json"
STUDY_FILE = "tau-study.json"


def check_inputs(recipe: Recipe) -> None:
    """The teacher is there and is what the recipe expects, every data path the recipe names exists and is
    readable, and the runtimes of its exports are installed, before any run dir is made."""
    teacher = recipe.teacher
    if not Path(teacher.checkpoint).is_file():
        raise DfkdError(
            f"teacher checkpoint {teacher.checkpoint} does not exist: make it from your weights with "
            f"`{teacher.import_command()}`, or point teacher.checkpoint at one"
        )
    meta = read_meta(Path(teacher.checkpoint))
    wrong = teacher.mismatch(meta.arch, meta.num_classes, meta.input_size)
    if wrong:
        raise DfkdError(
            f"teacher checkpoint {teacher.checkpoint} holds {wrong}: import the weights the recipe is for with "
            f"`{teacher.import_command()}`, or change [teacher] in the recipe"
        )
    named: tuple[tuple[str, Split], ...] = (
        (recipe.evaluate.data, "test"),
        (recipe.distill.data, "train"),
        (recipe.distill.val_data, "train"),
    )
    for path, split in named:
        if path:
            check_data_path(path)
            check_classes(split_classes(path, split), meta, teacher.checkpoint)
    if recipe.export is not None:  # a runtime that is not installed is found now, not after the stages
        for fmt in recipe.export.formats:
            check_request(fmt, None, recipe.export.quantize or None if fmt == "onnx" else None)


# Settings that change no stage's output: how a run is described, where it runs, what its finished
# student is evaluated on, how its energy is accounted. They may differ on a rerun of the same run dir.
# So may the teacher section (its path, and what a user-provided teacher must be, checked before a run): the
# stages identify the teacher by its sha256 and refuse another one. So may the last steps ([export], [inference]):
# they run on the finished student and change none of the stages before them.
STEP_KEYS = (
    "run.description",
    "run.device",
    "teacher.",
    "evaluate.data",
    "evaluate.every",
    "distill.compile",
    "carbon.",
    "export.",
    "inference.",
)


def check_same_recipe(run: RunDir, recipe: Recipe) -> None:
    """A run dir made from another recipe (or other --set values) is refused, unless only `STEP_KEYS` differ."""
    resolved = recipe.resolved()
    existing = run.read_manifest().get("recipe")
    if existing is not None and existing != resolved:
        sections = dict.fromkeys([*resolved, *existing])
        changed = sorted(
            f"{section}.{key}"
            for section in sections
            for key in dict.fromkeys([*_keys(resolved.get(section)), *_keys(existing.get(section))])
            if (resolved.get(section) or {}).get(key) != (existing.get(section) or {}).get(key)
        )
        if resolved["name"] != existing.get("name"):
            changed.insert(0, "name")
        changed = [key for key in changed if not key.startswith(STEP_KEYS)]
        if not changed:
            return
        raise DfkdError(
            f"run dir {run.root} was made from another recipe or other settings ({', '.join(changed)} differ): "
            "use another --run or the same settings"
        )


def _keys(section: Any) -> list[str]:
    return list(section) if isinstance(section, dict) else []


def record_estimate(run: RunDir, recipe: Recipe, estimate: dict[str, Any]) -> None:
    """Keep a dry run's estimate in the run dir (hashed), where the report sets it beside what the run cost."""
    with run.locked():
        check_same_recipe(run, recipe)
        path = run.root / ESTIMATE_FILE
        digest = atomic_write_json(path, estimate)
        run.update_manifest(artifacts=run.artifact_entry(path, "estimate", "estimate", digest))


def record_recipe(run: RunDir, recipe: Recipe) -> None:
    """Save the resolved recipe; a run dir made from another recipe (or other --set values) is refused."""
    check_same_recipe(run, recipe)
    resolved = recipe.resolved()
    path = run.root / RECIPE_FILE
    digest = atomic_write_json(path, resolved)
    run.update_manifest(recipe=resolved, artifacts=run.artifact_entry(path, "run", "recipe", digest))


def run_recipe(recipe: Recipe, root: Path, show_progress: bool = True) -> dict[str, Any]:
    """Synthesize, distil (and evaluate) in `root`, resuming where an earlier attempt stopped: two stages,
    or the rounds of the interleaved mode as one stage.

    Under torchrun (two stages only) every rank takes part in both stages; rank 0 alone checks and records the
    recipe, evaluates, exports and benchmarks, and returns the run's whole result (the others, their stages').
    """
    world = current_world()
    check_inputs(recipe)
    if recipe.interleaved:
        check_single_process('the interleaved mode (mode = "interleaved")')
        return _run_interleaved(recipe, root, show_progress)
    use_local_gpu()  # under torchrun, before `auto` resolves
    with joined(resolve_device(recipe.synthesis.device)):
        prepared = agree(lambda: prepare_synthesis(recipe.synthesis))
        with job_lock(root) as run:

            def check_and_record() -> None:
                # Every refusal comes before the first write: a refused run leaves the run dir as it was.
                check_same_recipe(run, recipe)
                check_same_synthesis(run, prepared.config_hash)
                source = student_source(recipe.distill, prepared.config_hash, prepared.teacher_sha256)
                recorded = distillation_of(run.read_manifest())
                check_same_distillation(run, recorded_identity(recipe.distill, source, recorded)[0])
                record_recipe(run, recipe)

            from_primary(check_and_record)
            synthesis, work = run_synthesis(prepared, run, recipe.carbon, show_progress=show_progress)
            distillation = distill_run(recipe.distill, run, recipe.carbon, show_progress=show_progress)
            distillation = from_primary(lambda: _with_evaluation(recipe, run, distillation, prepared.device))
    stages = {"run": str(run.root), "synthesis": synthesis, "synthesis_work": work, "distillation": distillation}
    if not world.primary:
        return stages
    with world_of(SINGLE):  # the steps on the finished student are rank 0's alone, once the others are done
        return {**stages, **last_steps(recipe, run, show_progress), "carbon": carbon_summary(run.root)}


def last_steps(recipe: Recipe, run: RunDir, show_progress: bool) -> dict[str, Any]:
    """`[export]` then `[inference]` on the finished student, each done once: an export of this very student
    that is still intact, or a benchmark record of this teacher and student, is not made again. They take the
    run's lock themselves, so they run after the stages have released it."""
    steps: dict[str, Any] = {}
    if recipe.export is None and recipe.inference is None:
        return steps
    student_sha = sha256_file(run.root / STUDENT_FILE)  # once, for every step's "already done?"
    if recipe.export is not None:
        wanted: list[tuple[str, str | None]] = [(fmt, None) for fmt in recipe.export.formats]
        wanted += [("onnx", recipe.export.quantize)] if recipe.export.quantize else []
        steps["export"] = [_export_once(recipe, run, student_sha, fmt, quantize) for fmt, quantize in wanted]
    if recipe.inference is not None:
        steps["inference"] = _benchmark_once(recipe, recipe.inference, run, student_sha, show_progress)
    return steps


def _export_once(recipe: Recipe, run: RunDir, student_sha: str, fmt: str, quantize: str | None) -> dict[str, Any]:
    path = default_out(run, fmt, quantize)
    entry = run.read_manifest().get("exports", {}).get(run.relative(path))
    if entry is not None and entry.get("source_sha256") == student_sha and run.artifact_intact(path):
        return {"path": str(path), **entry}
    data = Path(recipe.evaluate.data) if recipe.evaluate.data else None
    # Exported on the CPU whatever the run's device, so a TorchScript or exported-program file loads anywhere.
    return export_source(run.root, fmt, None, quantize or None, data, "cpu")


def _benchmark_once(
    recipe: Recipe, section: InferenceSection, run: RunDir, student_sha: str, show_progress: bool
) -> dict[str, Any]:
    teacher_sha = sha256_file(Path(recipe.teacher.checkpoint))

    def same(record: dict[str, Any]) -> bool:
        info = record.get("info", {})
        return (
            record.get("stage") == BENCHMARK
            and info.get("teacher", {}).get("sha256") == teacher_sha
            and info.get("student", {}).get("sha256") == student_sha
            and section.images in (0, info.get("images"))
            and section.batch_size in (0, info.get("batch_size"))
        )

    found = finished_record(run, same)
    if found is not None:
        return {"run": str(run.root), **found["result"]}
    prepared = prepare_benchmark(
        Path(recipe.teacher.checkpoint),
        run.root,
        run.root,
        resolve_device(recipe.run.device),
        data=Path(recipe.evaluate.data) if recipe.evaluate.data else None,
        images=section.images or None,
        batch_size=section.batch_size or None,
    )
    with run.locked():
        return benchmark_run(prepared, run, recipe.carbon, show_progress)


def carbon_summary(root: Path) -> dict[str, Any]:
    """The run's energy with PUE, CO2eq and generation share, as its report's headline states them."""
    head = build_report([root])["runs"][0]["headline"]
    keys = ("energy_kwh_with_pue", "co2eq_g", "generation_share", "duration_s", "fully_metered", "ledger_intact")
    return {key: head[key] for key in keys}


def _with_evaluation(recipe: Recipe, run: RunDir, result: dict[str, Any], device: Any) -> dict[str, Any]:
    """The finished run's result with its student's accuracy on `[evaluate] data`, measured now if it
    was named only after the distillation (a step on the finished run, metered as `evaluation`)."""
    if not recipe.evaluate.data:
        return result
    evaluation = evaluate_run_student(run, recipe.evaluate.data, recipe.carbon, device)
    return {**result, "test_acc": evaluation["test_acc"], "test_data": evaluation["data"]}


def _run_interleaved(recipe: Recipe, root: Path, show_progress: bool) -> dict[str, Any]:
    prepared = prepare_interleaved(recipe)
    run = RunDir.open(root)
    with run.locked():
        # Every refusal comes before the first write: a refused run leaves the run dir as it was.
        check_same_recipe(run, recipe)
        check_same_interleaved(run, prepared)
        record_recipe(run, recipe)
        result = run_interleaved(prepared, run, recipe.carbon, show_progress=show_progress)
        result = _with_evaluation(recipe, run, result, prepared.synthesis.device)
    return {
        "run": str(run.root),
        "mode": "interleaved",
        "synthesis": {"quality": result["quality"]},
        "distillation": result,
        **last_steps(recipe, run, show_progress),
    }


def share_synthetic(source: RunDir, target: RunDir) -> None:
    """Copy `source`'s synthetic set into `target` with its manifest entries, so both distil from the same images.

    The copied synthesis section keeps what identifies the set (config hash, teacher) but not its
    results: those belong to the ledger record in `source`, which made the images. Files are copied
    before their entries are written, so a kill in between leaves uncounted files, never counted bad ones.
    """
    manifest = source.read_manifest()
    section = synthesis_of(manifest)
    existing = synthesis_of(target.read_manifest())
    if existing:
        if existing.get("config_hash") != section.get("config_hash"):
            raise DfkdError(f"run dir {target.root} holds another synthetic set: use another study dir")
        if len(SyntheticSet(target).valid_shards()) == section.get("shards"):
            return
    entries = {key: entry for key, entry in manifest["artifacts"].items() if key.startswith(f"{SYNTHETIC_DIR}/")}
    for key in entries:
        with atomic_path(target.root / key) as tmp:
            shutil.copyfile(source.root / key, tmp)
    shared = {key: value for key, value in section.items() if key not in ("quality", "shards", "images")}
    target.update_manifest(stages={"synthesis": {**shared, "shared_from": str(source.root)}}, artifacts=entries)


def study_tau(recipe: Recipe, root: Path, show_progress: bool = True) -> dict[str, Any]:
    """One synthetic set, two students: stochastic τ in `root/stochastic`, grid-tuned τ in `root/grid`.

    Returns the report of both runs; its `comparisons` hold the paper's Table-6 figures (energy and
    CO2 of each, their ratio, the accuracy of each and the difference), also saved in `root/tau-study.json`.
    """
    if recipe.interleaved:
        raise DfkdError(
            "dfkd study tau compares tau settings on one shared synthetic set, but an interleaved run makes its own "
            "set against its student: study tau on a two-stage recipe "
            "(recipes/c10_wrn40_2-wrn16_1_fast_tau_study.toml uses the fast method)"
        )
    grid_tau = recipe.distill.tau if recipe.distill.tau.startswith("grid") else "grid"
    stochastic = dataclasses.replace(recipe, distill=dataclasses.replace(recipe.distill, tau="stochastic"))
    grid = dataclasses.replace(recipe, distill=dataclasses.replace(recipe.distill, tau=grid_tau))
    root = Path(root)
    run_recipe(stochastic, root / "stochastic", show_progress)
    grid_run = RunDir.open(root / "grid")
    with grid_run.locked():
        record_recipe(grid_run, grid)
        share_synthetic(RunDir(root / "stochastic"), grid_run)
        distill_run(grid.distill, grid_run, grid.carbon, show_progress=show_progress)
    report = build_report([root / "stochastic", root / "grid"])
    atomic_write_json(root / STUDY_FILE, {"recipe": recipe.name, "comparisons": report["comparisons"]})
    return report
