"""docs/pipeline.md is checked against the code: its module table is generated from the library's docstrings and
the stages' imports (`python -m tests.test_docs` prints it), and every stage and every file a stage writes is named
in it."""

from __future__ import annotations

import ast
import re

import yaml

from tests.conftest import REPO, shipped_text
from tests.test_stage_contract import closure, stage_modules

LIBRARY = REPO / "finetune"
COMMANDS = REPO / "commands"


def summary(module) -> str:
    """A module docstring's first sentence, on one line."""
    docstring = ast.get_docstring(ast.parse(module.read_text())) or ""
    text = " ".join(docstring.split())
    match = re.search(r"(?<=[a-z0-9)`])(?<!e\.g)(?<!i\.e)\. ", text)
    return (text[:match.start() + 1] if match else text).replace("|", "\\|")


def users(module) -> list[str]:
    """The stages (in dvc.yaml's order) and commands whose code imports `module`: the stages it is a DVC
    dependency of."""
    stages = [name for name, entry in stage_modules().items() if module in closure(entry)]
    commands = [f"commands.{path.stem}" for path in sorted(COMMANDS.glob("*.py"))
                if path.stem != "__init__" and module in closure(path)]
    return stages + commands


def modules_table() -> str:
    lines = ["| Module | Holds | Used by (stages re-run when it changes; commands) |", "|---|---|---|"]
    for module in sorted(LIBRARY.glob("*.py")):
        if module.stem == "__init__":
            continue
        used = users(module)
        every_stage = set(stage_modules()) <= set(used)
        shown = ["every stage"] + [u for u in used if u.startswith("commands.")] if every_stage else used
        lines.append(f"| `{module.relative_to(REPO).as_posix()}` | {summary(module)} | "
                     f"{', '.join(shown) or '(benchmarks and tests only)'} |")
    return "\n".join(lines)


def test_the_module_table_is_the_one_the_code_gives():
    assert modules_table() in shipped_text("docs/pipeline.md"), (
        "docs/pipeline.md's module table is stale: paste the output of `python -m tests.test_docs`")


def test_every_stage_and_every_output_is_in_the_pipeline_doc():
    text = shipped_text("docs/pipeline.md")
    stages = yaml.safe_load(shipped_text("dvc.yaml"))["stages"]
    for name, stage in stages.items():
        assert f"| `{name}` |" in text, f"stage {name} is missing from docs/pipeline.md's stage table"
        for out in stage.get("outs", []):
            path = out if isinstance(out, str) else next(iter(out))
            assert path in text, f"{name}'s output {path} is not named in docs/pipeline.md"
    assert f"`dvc.yaml` has {len(stages)} stages" in text


if __name__ == "__main__":
    print(modules_table())
