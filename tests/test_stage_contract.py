"""The stage contract: dvc.yaml declares, for each stage, every project module its code imports (so DVC re-runs
it when any of them changes, and only then), and no stage imports another stage."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import yaml

from tests.conftest import REPO

LIBRARY = "finetune"  # the shared machinery; stages/ holds the DVC stages' entry points and nothing else
COMMANDS = REPO / "commands"  # what a user runs by hand (predict, compare): they may not import stages either


@functools.cache  # the files do not change during a run; the docs' table asks for each closure many times
def project_imports(module: Path) -> frozenset[Path]:
    """The project modules (stages/*.py, finetune/*.py) `module` imports anywhere in its code (top level or inside
    functions)."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            path = REPO / (name.replace(".", "/") + ".py")
            if name.startswith(("stages.", f"{LIBRARY}.")) and path.is_file():
                found.add(path)
    return frozenset(found)


@functools.cache
def closure(module: Path) -> frozenset[Path]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += project_imports(current)
    return frozenset(seen)


def stage_modules() -> dict[str, Path]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    modules = {}
    for name, stage in stages.items():
        command = stage["cmd"]
        assert command.startswith("python -m stages."), f"{name}: {command}"
        modules[name] = REPO / (command.split()[2].replace(".", "/") + ".py")
    return modules


def test_every_imported_project_module_is_a_declared_dependency():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, module in stage_modules().items():
        imported = {p.relative_to(REPO).as_posix() for p in closure(module)}
        declared = {dep for dep in stages[name]["deps"] if isinstance(dep, str) and dep.endswith(".py")}
        if missing := sorted(imported - declared):
            problems.append(f"{name}: imports but does not declare {missing}")
        if extra := sorted(declared - imported):
            problems.append(f"{name}: declares but does not import {extra}")
    assert not problems, "\n".join(problems)


def test_no_stage_imports_another_stage():
    stage_files = set(stage_modules().values())
    problems = []
    for module in sorted(stage_files | set(COMMANDS.glob("*.py")) | set((REPO / LIBRARY).glob("*.py"))):
        others = (closure(module) - {module}) & stage_files
        if others:
            problems.append(f"{module.name} imports {sorted(p.name for p in others)}")
    assert not problems, "\n".join(problems)


def test_stage_names_are_their_modules():
    """A reader finds any stage's code from its name in dvc.yaml: stage X is stages/X.py."""
    for name, module in stage_modules().items():
        assert module == REPO / "stages" / f"{name}.py"


def test_stages_holds_the_stages_of_dvc_yaml_and_nothing_else():
    """A newcomer names every stage from `ls stages/`: its modules are exactly dvc.yaml's stages."""
    assert sorted(p.stem for p in (REPO / "stages").glob("*.py")) == sorted(stage_modules())
    assert not [p for p in (REPO / "stages").iterdir() if p.suffix != ".py" and p.name != "__pycache__"]


def test_nothing_imports_a_stage_entry_point():
    """Tests, benchmarks, commands and the library call the library; a stage is run, never imported."""
    importers = [*REPO.glob("finetune/*.py"), *REPO.glob("commands/*.py"), *REPO.glob("benchmarks/*.py"),
                 *REPO.glob("tests/*.py")]
    stage_files = set(stage_modules().values())
    assert not [p.name for p in importers if project_imports(p) & stage_files]


def test_the_contract_test_sees_imports_inside_functions(tmp_path):
    module = REPO / LIBRARY / "files.py"  # imports torch inside save_torch, finetune.errors at the top
    assert REPO / LIBRARY / "errors.py" in project_imports(module)
    lazy = tmp_path / "lazy.py"
    lazy.write_text(f"def f():\n    from {LIBRARY}.cam import gradcam_target\n")
    assert project_imports(lazy) == {REPO / LIBRARY / "cam.py"}
