"""Recipes: one TOML file per experiment, validated into typed configs before any work starts.

A recipe has the sections [run], [teacher], [synthesize], [distill], [evaluate] and [carbon], and
[interleave] when `[run] mode = "interleaved"` (see `dfkd.config.interleave`), and optionally [export] and
[inference], the last steps (see `dfkd.config.deploy`). The
stage sections are the existing configs (`SynthesisConfig`, `DistillConfig`, `CarbonConfig`) filled
through `apply_overrides`, so a recipe and the CLI flags are checked by the same rules; only the
keys that belong to another section are left out (the teacher, the device, the evaluation data).
`[synthesize]` also takes `iterations` and a `[synthesize.settings]` table of method settings.

Relative paths in a recipe resolve from the recipe file's folder (`--set` ones from the current directory).
Validation checks structure and values, not that a user-provided file exists: the CIFAR-100,
Tiny-ImageNet and ImageNet teachers are the user's to supply, and `dfkd run` names the command that
imports one when it is missing.
No torch here: the synthesizer registry validates the method settings without loading the methods.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfkd.carbon.config import CarbonConfig
from dfkd.config.deploy import ExportSection, InferenceSection
from dfkd.config.distill import DistillConfig
from dfkd.config.interleave import InterleaveConfig
from dfkd.config.overrides import apply_overrides, config_dict
from dfkd.config.synthesis import SynthesisConfig
from dfkd.errors import DfkdError
from synthesizers import list_synthesizers, method_config_class, student_term

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = REPO_ROOT / "recipes"
# The embedded default teacher (a recipe without a [teacher] section distils it).
EMBEDDED_TEACHER_PATH = REPO_ROOT / "checkpoints" / "wrn40_2_cifar10.safetensors"


MODES = ("two-stage", "interleaved")


@dataclass(frozen=True)
class RunSection:
    """What the run is, where it runs, and how its stages run: `two-stage` (synthesise the whole set,
    then distil) or `interleaved` (rounds of student-aware synthesis and distillation)."""

    description: str = ""
    device: str = "auto"
    mode: str = "two-stage"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass(frozen=True)
class TeacherSection:
    """The teacher's checkpoint and, for a teacher the user provides, what it must be: `arch`, `num_classes`
    and `input_size` (0 / empty: anything). They are checked against the checkpoint before a run starts, and
    a missing checkpoint is refused with the `dfkd checkpoint import` command that makes one."""

    checkpoint: str = str(EMBEDDED_TEACHER_PATH)
    arch: str = ""
    num_classes: int = 0
    input_size: int = 0

    def __post_init__(self) -> None:
        if not self.checkpoint.endswith(".safetensors"):
            raise ValueError(f"checkpoint must be a .safetensors file, got {self.checkpoint!r}")
        if self.num_classes < 0 or self.num_classes == 1 or self.input_size < 0:
            raise ValueError("num_classes must be 0 (any) or at least 2, input_size 0 (any) or positive")

    def import_command(self) -> str:
        """The command that turns the user's own weights into this teacher checkpoint."""
        arch = self.arch or "<architecture>"
        classes = self.num_classes or "<classes>"
        size = f" --input-size {self.input_size}" if self.input_size else ""
        return f"dfkd checkpoint import YOUR_WEIGHTS.pth {self.checkpoint} --arch {arch} --num-classes {classes}{size}"

    def mismatch(self, arch: str, num_classes: int, input_size: int) -> str | None:
        """What differs between this section's expectations and a checkpoint's metadata, or None."""
        expected = {"arch": (self.arch, arch), "num_classes": (self.num_classes, num_classes)}
        expected["input_size"] = (self.input_size, input_size)
        wrong = [
            f"{key} {found} (the recipe expects {want})"
            for key, (want, found) in expected.items()
            if want and want != found
        ]
        return ", ".join(wrong) or None


@dataclass(frozen=True)
class EvaluateSection:
    """The real test data the student is scored on (empty: agreement with the teacher on held-out synthetic images)."""

    data: str = ""
    every: int = 0

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"every must be >= 0 (0 = only at the end), got {self.every}")


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: the stage configs exactly as the stages take them."""

    name: str
    run: RunSection
    teacher: TeacherSection
    synthesis: SynthesisConfig
    distill: DistillConfig
    evaluate: EvaluateSection
    carbon: CarbonConfig
    interleave: InterleaveConfig = InterleaveConfig()
    # The last steps, only where the recipe has the section.
    export: ExportSection | None = None
    inference: InferenceSection | None = None

    @property
    def interleaved(self) -> bool:
        return self.run.mode == "interleaved"

    def resolved(self) -> dict[str, Any]:
        """The recipe as sections of plain values (what is saved in the run dir and compared on resume)."""
        synthesis = config_dict(self.synthesis)
        settings = synthesis.pop("method_settings")
        for key in ("teacher", "device"):
            synthesis.pop(key)
        distill = config_dict(self.distill)
        for key in _DISTILL_ELSEWHERE:
            distill.pop(key)
        run = config_dict(self.run)
        # A two-stage recipe resolves as it did before modes existed, so those run dirs still resume.
        extra: dict[str, Any] = {}
        if self.interleaved:
            distill.pop("epochs")  # the rounds set the length of an interleaved distillation
            extra["interleave"] = config_dict(self.interleave)
        else:
            run.pop("mode")
        for key, section in (("export", self.export), ("inference", self.inference)):
            if section is not None:  # absent otherwise, so recipes without them resolve as before
                extra[key] = config_dict(section)
        # Through JSON, so it compares equal to the copy read back from the run dir (tuples become lists).
        return json.loads(
            json.dumps(
                {
                    "name": self.name,
                    "run": run,
                    "teacher": config_dict(self.teacher),
                    "synthesize": {**synthesis, "settings": settings},
                    "distill": distill,
                    "evaluate": config_dict(self.evaluate),
                    "carbon": config_dict(self.carbon),
                    **extra,
                }
            )
        )

    @property
    def rounds(self) -> int:
        """Rounds of the interleaved mode: one per synthesis batch."""
        return -(-self.synthesis.num_images // self.synthesis.batch_size)


# Keys of the stage configs that a recipe sets in another section.
_SYNTHESIS_ELSEWHERE = ("teacher", "device", "method_settings")
_DISTILL_ELSEWHERE = ("teacher", "device", "eval_data", "eval_every")
SCALE_KEYS = (("synthesize", "num_images"), ("distill", "epochs"))
INTERLEAVED_SCALE_KEYS = (("synthesize", "num_images"), ("interleave", "kd_steps"))
_SECTIONS = ("run", "teacher", "synthesize", "distill", "evaluate", "carbon", "interleave", "export", "inference")
# Distillation settings the interleaved mode has no use for: it trains on its own rounds' images, one trial.
_NOT_INTERLEAVED = {
    "epochs": "the rounds set its length (synthesize.num_images / synthesize.batch_size rounds x interleave.kd_steps)",
    "data": "it trains on the images its rounds synthesise, not on real data",
    "val_data": "it trains one student, so there is no grid winner to select on validation data",
    "train_subset": "it trains on every image its rounds synthesise",
}


def _keys(config_class: type, excluded: tuple[str, ...], extra: tuple[str, ...] = ()) -> list[str]:
    return sorted({f.name for f in dataclasses.fields(config_class) if f.name not in excluded} | set(extra))


def _check_type(section: str, key: str, value: Any, annotation: Any) -> None:
    """TOML already types its values: a string where a number belongs is an error, not a conversion."""
    expected = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}.get(annotation)
    if expected is None:
        return
    if isinstance(value, bool) and annotation is not bool or not isinstance(value, expected):
        raise DfkdError(f"recipe key {section}.{key} = {value!r} has the wrong type: it must be {annotation.__name__}")


def _section(section: str, raw: dict[str, Any], default: Any, valid: list[str], from_file: set[str]) -> Any:
    """`default` with the section's keys applied; an unknown key is an error that lists the valid ones."""
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise DfkdError(
            f"unknown recipe key {section}.{unknown[0]}: valid keys of section {section} are {', '.join(valid)}"
        )
    hints = typing.get_type_hints(type(default))
    for key in raw:
        if key in from_file and key in hints:
            _check_type(section, key, raw[key], hints[key])
    return apply_overrides(default, raw, f"{section} setting")


def _method_settings(method: str, settings: dict[str, Any], iterations: Any) -> dict[str, Any]:
    """The method's settings, checked against its config now rather than when the stage starts."""
    try:
        config_class = method_config_class(method)
    except ValueError:
        raise DfkdError(
            f"recipe key synthesize.method = {method!r}: choose one of {', '.join(list_synthesizers())}"
        ) from None
    merged = {**settings, **({"iterations": iterations} if iterations is not None else {})}
    apply_overrides(config_class(), merged, f"synthesize.settings ({method})")
    return merged


def parse_recipe_overrides(items: list[str] | None) -> dict[str, dict[str, str]]:
    """`["distill.epochs=3", "synthesize.settings.nz=16"]`
    -> `{"distill": {"epochs": "3"}, "synthesize": {"settings.nz": "16"}}`."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise DfkdError(f"--set {item!r} is not of the form section.key=value (e.g. distill.epochs=3)")
        out.setdefault(section, {})[name] = value.strip()
    return out


def _merge(data: dict[str, Any], overrides: dict[str, dict[str, str]]) -> tuple[dict[str, Any], dict[str, set[str]]]:
    """The file's sections with the overrides applied; also which keys came from the file (typed by TOML)."""
    merged = {name: dict(content) if isinstance(content, dict) else content for name, content in data.items()}
    from_file = {name: set(content) if isinstance(content, dict) else set() for name, content in data.items()}
    for section, values in overrides.items():
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            break
        for key, value in values.items():
            if section == "synthesize" and key.startswith("settings."):
                target.setdefault("settings", {})[key.removeprefix("settings.")] = value
            else:
                target[key] = value
                from_file.get(section, set()).discard(key)
    return merged, from_file


# Keys that name a file or folder. A relative one is resolved from the recipe file's folder when the
# recipe sets it, and from the current directory when `--set` does (where the user typed it).
PATH_KEYS = (("teacher", "checkpoint"), ("evaluate", "data"), ("distill", "data"), ("distill", "val_data"))


def _resolve_paths(merged: dict[str, Any], from_file: dict[str, set[str]], base: Path) -> None:
    for section, key in PATH_KEYS:
        value = merged.get(section, {}).get(key)
        if isinstance(value, str) and value:
            folder = base if key in from_file.get(section, set()) else Path.cwd()
            merged[section][key] = os.path.normpath(folder / Path(value).expanduser())


def build_recipe(
    name: str, data: dict[str, Any], overrides: dict[str, dict[str, str]] | None = None, base: Path | None = None
) -> Recipe:
    """Validate parsed TOML (plus `--set` overrides) into a `Recipe`; every problem is a `DfkdError`.

    Relative paths of the file resolve from `base` (the recipe's folder; default: the current directory).
    """
    merged, from_file = _merge(data, overrides or {})
    for section, content in merged.items():
        if section not in _SECTIONS:
            raise DfkdError(f"unknown recipe section {section!r}: valid sections are {', '.join(_SECTIONS)}")
        if not isinstance(content, dict):
            raise DfkdError(f"recipe section {section!r} must be a table of key = value lines")
    _resolve_paths(merged, from_file, (base or Path.cwd()).resolve())
    run = _section("run", merged.get("run", {}), RunSection(), _keys(RunSection, ()), from_file.get("run", set()))
    teacher = _section(
        "teacher",
        merged.get("teacher", {}),
        TeacherSection(),
        _keys(TeacherSection, ()),
        from_file.get("teacher", set()),
    )
    raw_synthesis = dict(merged.get("synthesize", {}))
    settings = raw_synthesis.pop("settings", {})
    if not isinstance(settings, dict):
        raise DfkdError(
            "recipe key synthesize.settings must be a table of method settings (a synthesize.settings section)"
        )
    iterations = raw_synthesis.pop("iterations", None)
    synthesis = _section(
        "synthesize",
        raw_synthesis,
        SynthesisConfig(teacher=teacher.checkpoint, device=run.device),
        _keys(SynthesisConfig, _SYNTHESIS_ELSEWHERE, ("iterations", "settings")),
        from_file.get("synthesize", set()),
    )
    synthesis = dataclasses.replace(synthesis, method_settings=_method_settings(synthesis.method, settings, iterations))
    evaluate = _section(
        "evaluate",
        merged.get("evaluate", {}),
        EvaluateSection(),
        _keys(EvaluateSection, ()),
        from_file.get("evaluate", set()),
    )
    distill = _section(
        "distill",
        merged.get("distill", {}),
        DistillConfig(
            teacher=teacher.checkpoint, device=run.device, eval_data=evaluate.data, eval_every=evaluate.every
        ),
        _keys(DistillConfig, _DISTILL_ELSEWHERE),
        from_file.get("distill", set()),
    )
    carbon = _section(
        "carbon", merged.get("carbon", {}), CarbonConfig(), _keys(CarbonConfig, ()), from_file.get("carbon", set())
    )
    interleave = _section(
        "interleave",
        merged.get("interleave", {}),
        InterleaveConfig(),
        _keys(InterleaveConfig, ()),
        from_file.get("interleave", set()),
    )
    export, inference = (
        None
        if key not in merged
        else _section(key, merged[key], default, _keys(type(default), ()), from_file.get(key, set()))
        for key, default in (("export", ExportSection()), ("inference", InferenceSection()))
    )
    recipe = Recipe(name, run, teacher, synthesis, distill, evaluate, carbon, interleave, export, inference)
    if recipe.interleaved:
        _check_interleaved(recipe, merged)
    else:
        if "interleave" in merged:
            raise DfkdError('recipe section interleave applies only with [run] mode = "interleaved": remove it')
        # The defaults are the paper's scale (50,000 images, 200 epochs: GPU-hours); a recipe says its own.
        for section, key in SCALE_KEYS:
            if key not in merged.get(section, {}):
                raise DfkdError(
                    f"recipe sets no {section}.{key}: a recipe states its scale (synthesize.num_images and "
                    "distill.epochs); the defaults would be the paper's 50,000 images and 200 epochs"
                )
        _check_batch_fits(recipe)
    return recipe


def _check_batch_fits(recipe: Recipe) -> None:
    """A distillation batch larger than the synthetic images it trains on is refused now, not after synthesis."""
    distill = recipe.distill
    if distill.data:
        return  # real data: its size is known only once it is read
    images = recipe.synthesis.num_images
    if distill.train_subset:
        images = min(images, distill.train_subset)
    held = max(1, round(images * distill.holdout))  # as the distillation splits off its held-out slice
    if images - held < distill.batch_size:
        raise DfkdError(
            f"distill.batch_size = {distill.batch_size} is larger than the {images - held} training images that "
            f"{images} synthetic images leave after the held-out slice ({held}): lower distill.batch_size or "
            "raise synthesize.num_images"
        )


def _check_interleaved(recipe: Recipe, merged: dict[str, Any]) -> None:
    """What only the interleaved mode needs: a student-aware method, its scale, one trial, rounds to distil in."""
    method = recipe.synthesis.method
    if not student_term(method):
        raise DfkdError(
            f"method {method} cannot take a student, so it cannot run interleaved: choose a student-aware method "
            f'({", ".join(m for m in list_synthesizers() if student_term(m))}) or run.mode = "two-stage"'
        )
    for section, key in INTERLEAVED_SCALE_KEYS:
        if key not in merged.get(section, {}):
            raise DfkdError(
                f"recipe sets no {section}.{key}: an interleaved recipe states its scale (synthesize.num_images "
                "and interleave.kd_steps); the defaults would be the paper's 50,000 images and 400 steps per round"
            )
    for key, why in _NOT_INTERLEAVED.items():
        if key in merged.get("distill", {}):
            raise DfkdError(f"recipe key distill.{key} does not apply to the interleaved mode ({why}): remove it")
    if recipe.distill.tau_spec.mode == "grid":
        raise DfkdError(
            "tau = grid does not run interleaved yet (every trial would synthesise its own student-aware set): "
            'use tau = "stochastic" or a fixed tau, or compare them on one set with `dfkd study tau` and '
            'run.mode = "two-stage"'
        )
    if recipe.rounds <= recipe.interleave.warmup_rounds:
        raise DfkdError(
            f"interleave.warmup_rounds = {recipe.interleave.warmup_rounds} leaves no round to distill in "
            f"({recipe.synthesis.num_images} images in batches of {recipe.synthesis.batch_size} make "
            f"{recipe.rounds} rounds): lower warmup_rounds or make more images"
        )


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate the recipe at `path`, with `--set section.key=value` overrides."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DfkdError(f"recipe {path} does not exist: `dfkd recipes` lists the shipped ones") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DfkdError(f"recipe {path} is unreadable ({exc}): pass a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise DfkdError(f"recipe {path} is not valid TOML ({exc}): fix that line") from None
    try:
        return build_recipe(path.stem, data, parse_recipe_overrides(overrides), base=path.parent)
    except DfkdError as exc:
        raise DfkdError(f"{path}: {exc}") from None


def missing_files(recipe: Recipe) -> list[str]:
    """`key path` for every file or folder the recipe names that is not there (the teacher a file, data a folder)."""
    named = {
        "teacher.checkpoint": (recipe.teacher.checkpoint, Path.is_file),
        "evaluate.data": (recipe.evaluate.data, Path.is_dir),
        "distill.data": (recipe.distill.data, Path.is_dir),
        "distill.val_data": (recipe.distill.val_data, Path.is_dir),
    }
    return [f"{key} {value}" for key, (value, exists) in named.items() if value and not exists(Path(value))]


def recipe_paths(folder: Path = RECIPES_DIR) -> list[Path]:
    return sorted(Path(folder).glob("*.toml"))


def describe(path: Path) -> str:
    """One line about a recipe: its [run] description, else its first comment line that is not the command."""
    recipe = load_recipe(path)
    if recipe.run.description:
        return recipe.run.description
    for line in Path(path).read_text().splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.startswith("dfkd "):
            return text
    return ""
