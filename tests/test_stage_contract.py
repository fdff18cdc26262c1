"""The stage contract: dvc.yaml declares, for each stage, every project module its code imports (so DVC re-runs
it when any of them changes, and only then), and no stage imports another stage."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import REPO

COMMANDS = ("predict",)  # stages/ modules run by hand, not by DVC: they may not import stages either


def project_imports(module: Path) -> set[Path]:
    """The stages/*.py files `module` imports anywhere in its code (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            path = REPO / (name.replace(".", "/") + ".py")
            if name.startswith("stages.") and path.is_file():
                found.add(path)
    return found


def closure(module: Path) -> set[Path]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += project_imports(current)
    return seen


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
    stage_files = set(stage_modules().values()) | {REPO / "stages" / f"{name}.py" for name in COMMANDS}
    problems = []
    for module in sorted(stage_files):
        others = (closure(module) - {module}) & stage_files
        if others:
            problems.append(f"{module.name} imports {sorted(p.name for p in others)}")
    assert not problems, "\n".join(problems)


def test_stage_names_are_their_modules():
    """A reader finds any stage's code from its name in dvc.yaml: stage X is stages/X.py."""
    for name, module in stage_modules().items():
        assert module == REPO / "stages" / f"{name}.py"


def test_the_contract_test_sees_imports_inside_functions(tmp_path):
    module = REPO / "stages" / "files.py"  # imports torch inside save_torch, stages.errors at the top
    assert REPO / "stages" / "errors.py" in project_imports(module)
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from stages.cam import gradcam_target\n")
    assert project_imports(lazy) == {REPO / "stages" / "cam.py"}
