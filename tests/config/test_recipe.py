"""Recipes: every shipped one validates; bad keys, types and values are one-line errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dfkd.cli import app
from dfkd.config.recipe import EMBEDDED_TEACHER_PATH, RECIPES_DIR, load_recipe, recipe_paths
from dfkd.errors import DfkdError

REPO = Path(__file__).resolve().parents[2]


def fails(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2, (result.output, result.exception)
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message and "Traceback" not in result.output, message
    return message


def test_validate_passes_for_every_shipped_recipe() -> None:
    result = CliRunner().invoke(app, ["validate", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {Path(r["recipe"]).name for r in rows} == {p.name for p in recipe_paths()}
    assert len(rows) >= 9 and all(r["ok"] for r in rows)
    # The CIFAR-100 teacher is the user's to provide: noted, not an error.
    assert all(r["teacher_missing"] for r in rows if Path(r["recipe"]).name.startswith("c100_"))


def test_recipes_lists_each_with_one_line_and_opens_with_its_command() -> None:
    result = CliRunner().invoke(app, ["recipes", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert all(r["description"] for r in rows)
    for path in recipe_paths():
        assert path.read_text().splitlines()[0] == f"# dfkd run recipes/{path.name}" or path.name == "quickstart.toml"
    assert (REPO / "recipes" / "quickstart.toml").read_text().startswith("# dfkd run recipes/quickstart.toml")


def test_paper_recipes_cover_datasets_methods_and_tau_modes() -> None:
    names = {p.stem for p in recipe_paths()}
    for dataset in ("c10", "c100"):
        for method in ("cmi", "deepinversion"):
            for tau in ("stochastic", "grid"):
                name = f"{dataset}_wrn40_2-wrn16_1_{method}_{tau}"
                assert name in names
                recipe = load_recipe(REPO / "recipes" / f"{name}.toml")
                assert (recipe.synthesis.method, recipe.distill.tau, recipe.distill.student) == (method, tau, "wrn16_1")
                assert recipe.distill.epochs == 200


def test_quickstart_is_the_readme_main_job_at_cpu_scale() -> None:
    recipe = load_recipe(REPO / "recipes" / "quickstart.toml")
    s, d = recipe.synthesis, recipe.distill
    assert (s.method, s.num_images, s.batch_size, s.method_settings["iterations"]) == ("fast", 1600, 50, 5)
    assert s.method_settings["lr"] == 0.003 and (d.epochs, d.batch_size, d.tau) == (50, 32, "stochastic")
    readme = (REPO / "README.md").read_text()
    main_job = readme.split("**Run the main job**")[1].split("```bash\n")[1].split("\n")[0]
    assert main_job.endswith("dfkd run recipes/quickstart.toml --run runs/quickstart")


def test_overrides_apply_and_are_typed() -> None:
    recipe = load_recipe(
        REPO / "recipes" / "quickstart.toml", ["distill.epochs=3", "synthesize.settings.nz=16", "carbon.pue=1.2"]
    )
    assert recipe.distill.epochs == 3 and recipe.synthesis.method_settings["nz"] == "16" and recipe.carbon.pue == 1.2


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[distill]\nepoch = 3\n", ("distill.epoch", "epochs", "tau")),
        ("[distill]\nepochs = '3'\n", ("distill.epochs", "wrong type", "int")),
        ("[distill]\nepochs = 0\n", ("distill", "epochs")),
        ("[carbon]\npue = 5\n", ("carbon", "pue", "[1, 3]")),
        ("[synthesize.settings]\nnzz = 3\n", ("nzz", "nz", "bank_size")),
        ("[synthesize]\nmethod = 'gan'\n", ("synthesize.method", "cmi", "deepinversion")),
        ("[stuff]\n", ("stuff", "run, teacher, synthesize, distill, evaluate, carbon")),
        ("[teacher]\ncheckpoint = 'x.pth'\n", ("checkpoint", ".safetensors")),
        ("[distill\n", ("not valid TOML",)),
    ],
)
def test_bad_recipes_name_the_key_and_the_valid_ones(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    message = fails("validate", str(path))
    assert all(word in message for word in words), message
    with pytest.raises(DfkdError):
        load_recipe(path)


def test_bad_overrides(tmp_path: Path) -> None:
    assert "section.key=value" in fails(
        "run", str(REPO / "recipes" / "quickstart.toml"), "--set", "epochs=3", "--run", str(tmp_path / "r")
    )
    assert "epochs" in fails(
        "run", str(REPO / "recipes" / "quickstart.toml"), "--set", "distill.epochs=x", "--run", str(tmp_path / "r")
    )
    assert not (tmp_path / "r").exists()


def test_missing_recipe() -> None:
    assert "does not exist" in fails("run", "recipes/nope.toml")


def test_a_two_stage_recipe_resolves_as_before_modes_existed() -> None:
    """Run dirs made before `[run] mode` existed compare their saved recipe with this: it must not change."""
    resolved = load_recipe(REPO / "recipes" / "quickstart.toml").resolved()
    assert "mode" not in resolved["run"] and "interleave" not in resolved and resolved["distill"]["epochs"] == 50


def test_interleaved_recipes_validate_with_their_rounds() -> None:
    fast = load_recipe(REPO / "recipes" / "c10_wrn40_2-wrn16_1_fast.toml")
    assert fast.interleaved and fast.synthesis.method == "fast" and fast.distill.tau == "stochastic"
    assert fast.rounds == 200 and fast.interleave.kd_steps == 100
    resolved = fast.resolved()
    assert resolved["run"]["mode"] == "interleaved" and "epochs" not in resolved["distill"]
    assert resolved["interleave"] == {"kd_steps": 100, "warmup_rounds": 5}
    cmi = load_recipe(REPO / "recipes" / "c10_wrn40_2-wrn16_1_cmi_interleaved.toml")
    assert (cmi.synthesis.method, cmi.interleave.kd_steps, cmi.interleave.warmup_rounds) == ("cmi", 400, 20)
    assert cmi.synthesis.method_settings["adv_weight"] == 0.5


def test_an_interleave_section_in_a_two_stage_recipe_is_refused() -> None:
    with pytest.raises(DfkdError, match="interleave applies only with"):
        load_recipe(REPO / "recipes" / "quickstart.toml", ["interleave.kd_steps=3"])


# --- paths resolve from the recipe's folder (issue 12 item 5) -------------------------------------------


def test_relative_paths_resolve_from_the_recipe_folder_and_set_ones_from_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "project" / "recipes"
    folder.mkdir(parents=True)
    recipe = folder / "mine.toml"
    recipe.write_text(
        '[teacher]\ncheckpoint = "../teacher.safetensors"\n[synthesize]\nnum_images = 20\n'
        '[distill]\nepochs = 1\nbatch_size = 8\ndata = "data"\n[evaluate]\ndata = "/abs/test"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_recipe(recipe, ["distill.val_data=val"])
    assert loaded.teacher.checkpoint == str(tmp_path / "project" / "teacher.safetensors")
    assert loaded.synthesis.teacher == loaded.distill.teacher == loaded.teacher.checkpoint
    assert loaded.distill.data == str(folder / "data") and loaded.evaluate.data == "/abs/test"
    assert loaded.distill.val_data == str(elsewhere / "val"), "a --set path is the user's, typed in the cwd"


def test_a_shipped_recipe_finds_the_embedded_teacher_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    quickstart = load_recipe(REPO / "recipes" / "quickstart.toml")
    assert quickstart.teacher.checkpoint == str(EMBEDDED_TEACHER_PATH) and EMBEDDED_TEACHER_PATH.is_file()
    bare = tmp_path / "bare.toml"
    bare.write_text("[synthesize]\nnum_images = 20\n[distill]\nepochs = 1\nbatch_size = 8\n")
    assert load_recipe(bare).teacher.checkpoint == str(EMBEDDED_TEACHER_PATH), "no [teacher]: the embedded one"
    result = CliRunner().invoke(app, ["validate", str(REPO / "recipes" / "quickstart.toml"), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["missing"] == [], result.output


def test_validate_of_a_named_recipe_fails_on_a_missing_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[teacher]\ncheckpoint = "nowhere.safetensors"\n[synthesize]\nnum_images = 20\n'
        '[distill]\nepochs = 1\nbatch_size = 8\n[evaluate]\ndata = "no-data"\n'
    )
    message = fails("validate", str(recipe))
    assert f"teacher.checkpoint {tmp_path / 'nowhere.safetensors'} does not exist" in message, message
    assert f"evaluate.data {tmp_path / 'no-data'} does not exist" in message, message
    # The shipped catalogue only notes the teachers its users provide (CIFAR-100's).
    rows = json.loads(CliRunner().invoke(app, ["validate", "--json"]).stdout)
    assert all(row["missing"] == [] for row in rows if Path(row["recipe"]).name.startswith("c10_"))


def test_export_and_inference_sections_are_validated_and_resolved_only_when_present(tmp_path: Path) -> None:
    from dfkd.config.deploy import ExportSection, InferenceSection

    quickstart = (RECIPES_DIR / "quickstart.toml").read_text()
    base = quickstart[: quickstart.index("[export]")]  # the quickstart without its last steps
    base = base.replace("../checkpoints", str(RECIPES_DIR.parent / "checkpoints"))
    plain = tmp_path / "plain.toml"
    plain.write_text(base)
    recipe = load_recipe(plain)
    assert recipe.export is None and recipe.inference is None
    assert "export" not in recipe.resolved() and "inference" not in recipe.resolved()
    full = tmp_path / "full.toml"
    full.write_text(
        base + '\n[export]\nformats = ["onnx", "torchscript"]\nquantize = "dynamic"\n\n[inference]\nimages = 512\n'
    )
    recipe = load_recipe(full)
    assert recipe.export == ExportSection(("onnx", "torchscript"), "dynamic")
    assert recipe.inference == InferenceSection(images=512)
    assert recipe.resolved()["export"] == {"formats": ["onnx", "torchscript"], "quantize": "dynamic"}
    for section, error in (
        ('[export]\nformats = ["tflite"]', "formats must name each of onnx"),
        ('[export]\nformats = ["torchscript"]\nquantize = "dynamic"', "quantizes the ONNX export"),
        ("[inference]\nimages = 10\nbatch_size = 64", "at least one batch"),
        ("[inference]\nwarmup = 3", "unknown recipe key inference.warmup"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(base + "\n" + section + "\n")
        with pytest.raises(DfkdError, match=error):
            load_recipe(bad)
