"""What a run was made from, stated so that it reads the same on any machine: local paths shown relative to the
project (or by their name outside it: the rest is this machine's), and the params that differ from the last
commit's params.yaml.

Why the last commit: `dvc exp run -S` changes params.yaml in the workspace and leaves it changed after the run,
so the next experiment silently inherits the last one's values unless the user resets them (`git checkout
params.yaml`). check names every such difference when a run starts, and the report and the model card list them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from finetune.params import PARAMS_FILE, ParamsError, parse_params

RECORDED_SECTIONS = ("data", "model", "train")  # what shapes the model; the others shape how it is measured
GIT_TIMEOUT_S = 10


def shown_path(value: str) -> str:
    """A param value as committed outputs show it: an absolute path inside the project relative to it, one
    outside by `…/` and its name; anything else (a hub id, a weights name, a relative path) as it is."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        return value
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except (ValueError, OSError):
        return f"…/{path.name}"


def flat(sections: dict, only: tuple[str, ...] | None = None) -> dict[str, object]:
    """{"train.lr": 0.1, ...} of a params dict (one level of sections)."""
    return {f"{section}.{key}": value for section, values in sections.items() if isinstance(values, dict)
            and (only is None or section in only) for key, value in values.items()}


def committed_params(path: Path = PARAMS_FILE) -> tuple[dict | None, str]:
    """(params.yaml as the last commit holds it, as the stages read it, "") or (None, why not): no git, no
    repository, no commit, or a file that was never committed."""
    try:
        result = subprocess.run(["git", "show", f"HEAD:./{path.as_posix()}"], capture_output=True, text=True,
                                timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"git could not be run ({type(error).__name__})"
    if result.returncode != 0:
        return None, "no committed params.yaml to compare with (not a git repository, or no commit yet)"
    try:
        loaded = yaml.safe_load(result.stdout)
    except yaml.YAMLError:
        return None, "the committed params.yaml is not valid YAML"
    if not isinstance(loaded, dict):
        return None, "the committed params.yaml holds no sections"
    try:  # as the run's own params are compared: nulls filled in from data.preset, as the stages read them
        return parse_params(loaded, look_up_models=False).model_dump(), ""
    except ParamsError:
        return loaded, ""  # an older schema: compared as written


def changed_params(current: dict, committed: dict, only: tuple[str, ...] | None = None) -> list[dict]:
    """One row per param whose value differs from the committed one (or that one of the two lacks)."""
    now, before = flat(current, only), flat(committed, only)
    missing = object()
    return [{"param": key, "committed": before.get(key, "(none)"), "now": now.get(key, "(none)")}
            for key in sorted(now.keys() | before.keys(), key=lambda k: (k.split(".")[0], k))
            if now.get(key, missing) != before.get(key, missing)]


def format_value(value) -> str:
    if isinstance(value, str) and value != "(none)":
        return shown_path(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def changes_line(rows: list[dict], limit: int = 12) -> str:
    """`train.lr 0.05 (committed: 0.1), ...` for a log line."""
    shown = [f"{r['param']} {format_value(r['now'])} (committed: {format_value(r['committed'])})"
             for r in rows[:limit]]
    return ", ".join(shown) + (f", and {len(rows) - limit} more" if len(rows) > limit else "")

def print_changes(current: dict) -> None:
    """The params that differ from the last commit's: a `dvc exp run -S` leaves its values in params.yaml, and
    the next experiment inherits them unless they are reset."""
    committed, why_not = committed_params()
    if committed is None:
        print(f"check: {why_not}")
        return
    rows = changed_params(current, committed)
    if rows:
        print(f"check: params.yaml differs from the last commit's in {len(rows)} param(s): {changes_line(rows)}. "
              f"Values a previous `dvc exp run -S` left are among them: `git checkout params.yaml` resets them")

