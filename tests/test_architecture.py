"""The layers hold: no import cycle, a torch-free read side and config layer, a light CLI start.

The import graph is read from the source (ast), so these tests see every module, also ones no other
test imports; the subprocess tests then prove it for real: `dfkd audit`, `dfkd report --format json`
and `dfkd validate` run where `import torch` fails.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dfkd", "synthesizers")
HEAVY = {"torch", "torchvision", "kornia", "codecarbon", "pynvml"}
# The read side (report, audit) and the config layer: what an auditor's light install runs. Packages
# stand for every module in them.
TORCH_FREE_PACKAGES = ("dfkd.report", "dfkd.config")
TORCH_FREE_MODULES = (
    "dfkd.manifest",
    "dfkd.rundir",
    "dfkd.files",
    "dfkd.errors",
    "dfkd.carbon.ledger",
    "dfkd.carbon.config",
    "dfkd.models",
    "dfkd.models.registry",
    "dfkd.models.spec",
    "dfkd.models.zoo",
    "synthesizers",
    "synthesizers.registry",
    "synthesizers.configs",
)


def _module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


MODULES = _module_files()
TORCH_FREE = sorted(
    {name for name in MODULES if name.startswith(tuple(f"{package}." for package in TORCH_FREE_PACKAGES))}
    | set(TORCH_FREE_MODULES)
)


def test_the_torch_free_list_names_real_modules() -> None:
    """An entry that matched no module would pass the import check vacuously."""
    assert set(TORCH_FREE_MODULES) <= set(MODULES)
    for package in TORCH_FREE_PACKAGES:
        assert sum(name.startswith(f"{package}.") for name in MODULES) >= 5, package


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, module_level_only: bool) -> set[str]:
    """Modules `module` imports (internal ones by full name, external ones by top-level name)."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    found.add(submodule if submodule in MODULES else node.module)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and module_level_only:
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    visit([child for child in children if isinstance(child, ast.stmt | ast.ExceptHandler)])  # type: ignore[misc]

    visit(tree.body)
    return {name if name in MODULES else name.split(".")[0] for name in found}


def _loaded_with(module: str) -> set[str]:
    """Everything importing `module` imports: its module-level imports, transitively, with parent packages."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in MODULES:
            parents = [".".join(current.split(".")[:i]) for i in range(1, current.count(".") + 1)]
            todo += [*parents, *_imports(current, module_level_only=True)]
    return seen


@pytest.mark.parametrize("module", TORCH_FREE)
def test_read_side_and_config_layer_import_no_torch(module: str) -> None:
    heavy = _loaded_with(module) & HEAVY
    assert not heavy, f"importing {module} imports {sorted(heavy)}"


def test_cli_module_imports_heavy_modules_only_inside_commands() -> None:
    heavy = _loaded_with("dfkd.cli") & HEAVY
    assert not heavy, f"`dfkd --help` would import {sorted(heavy)}"


def test_no_import_cycle() -> None:
    graph = {name: {dep for dep in _imports(name, module_level_only=False) if dep in MODULES} for name in MODULES}
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep) :] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                walk(dep, [*path, dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, f"import cycles: {[' -> '.join(cycle) for cycle in cycles]}"


def test_the_graph_sees_the_known_edges() -> None:
    """The walk is not vacuous: it finds the imports the code is known to make."""
    assert "torch" in _loaded_with("dfkd.stages.distill")
    assert "kornia" in _loaded_with("synthesizers.cmi")
    assert "dfkd.carbon.ledger" in _imports("dfkd.report.build", module_level_only=True)
    assert "dfkd.models.wrn" in _imports("dfkd.models.zoo", module_level_only=False)
    assert "dfkd.models.wrn" not in _imports("dfkd.models.zoo", module_level_only=True)


BLOCK_TORCH = (
    "import atexit, sys\n"
    "for name in ('torch', 'torchvision', 'kornia'):\n"
    "    sys.modules[name] = None  # `import torch` now raises ImportError\n"
    "heavy = ('codecarbon', 'pynvml')\n"
    "atexit.register(lambda: print('heavy modules loaded:', [m for m in heavy if m in sys.modules], file=sys.stderr))\n"
    "from dfkd.cli import app\n"
    "app(sys.argv[1:], prog_name='dfkd')\n"
)


def _dfkd_without_torch(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    if result.returncode == 0:  # codecarbon is installed but slow to import: the light commands must not need it
        assert "heavy modules loaded: []" in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the finished run dir made before the issue-9 move (tests/fixtures/pre_move_run)."""
    import shutil

    target = tmp_path_factory.mktemp("light") / "finished"
    shutil.copytree(REPO / "tests" / "fixtures" / "pre_move_run" / "finished", target)
    return target


def test_audit_report_and_validate_run_with_torch_unimportable(finished_run: Path) -> None:
    probe = _dfkd_without_torch("--help")
    assert probe.returncode == 0 and "report" in probe.stdout, probe.stderr
    audit = _dfkd_without_torch("audit", str(finished_run), "--json")
    assert audit.returncode == 0, audit.stderr
    verdict = json.loads(audit.stdout)
    assert {k: verdict[k] for k in ("run", "ok", "problems")} == {"run": str(finished_run), "ok": True, "problems": []}
    assert any("ledger records: hash chain" in line for line in verdict["checked"])
    report = _dfkd_without_torch("report", str(finished_run), "--format", "json")
    assert report.returncode == 0, report.stderr
    runs = json.loads(report.stdout)["runs"]
    assert [row["stage"] for row in runs[0]["rows"]] == ["synthesis", "distillation"]
    validate = _dfkd_without_torch("validate", "--json")
    assert validate.returncode == 0, validate.stderr
    assert {Path(row["recipe"]).name for row in json.loads(validate.stdout)} >= {"quickstart.toml"}


def test_a_command_that_needs_torch_says_so_when_it_is_missing(tmp_path: Path) -> None:
    """The check above is real: a command that does need torch fails in the same environment."""
    result = _dfkd_without_torch("synthesize", "--run", str(tmp_path / "run"), "--device", "cpu")
    lines = [line for line in result.stderr.splitlines() if not line.startswith("heavy modules loaded")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: this command needs torch") and "pip install" in lines[0]
