"""Shared fixtures. Every test runs offline: the hub and torchvision's downloads must fail at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.synthetic import make_image_folder

REPO = Path(__file__).resolve().parents[1]

# A mistaken hub call fails at once instead of retrying; caches go to a throwaway place.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")


# The test files that take longest (seconds of one CI run, 2026-12-01), collected first: `make test` hands whole
# files to its two processes in collection order (--no-loadscope-reorder), so starting with these lets the short
# ones fill the gaps and both processes end together (the one-test README walk, 500 s, ran alone at the end when
# xdist ordered the files by their number of tests).
LONGEST_FILES = ["test_readme_path.py", "test_resume.py", "test_readme_recipes.py", "test_gpu_path.py",  # 500-720
                 "test_queue_and_remote.py", "test_distributed.py", "test_pipeline.py"]  # 390-280


def pytest_collection_modifyitems(items: list) -> None:
    order = {name: rank for rank, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: the rest keep their order


@pytest.fixture(autouse=True, scope="session")
def isolated_caches(tmp_path_factory):
    home = tmp_path_factory.mktemp("caches")
    os.environ["HF_HOME"] = str(home / "hf")
    os.environ["TORCH_HOME"] = str(home / "torch")
    yield


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """6 classes, 40 train + 15 test images each, plus odd-mode and broken files in one train class."""
    root = tmp_path_factory.mktemp("cars")
    make_image_folder(root, odd_files=True)
    return root


def shipped_text(path: str) -> str:
    """A file of the project as it ships, whatever the user's workspace holds: an applied experiment, an edited
    params.yaml, a trial's params committed as the README says. Read from the clone's origin (the project as
    cloned) when there is one, else from the last commit; outside git, the file itself."""
    for ref in ("origin/HEAD", "HEAD"):
        shown = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=REPO, capture_output=True, text=True)
        if shown.returncode == 0:
            return shown.stdout
    return (REPO / path).read_text()


def shipped_params() -> dict:
    """params.yaml's defaults as the project ships them (a fresh copy each call)."""
    return yaml.safe_load(shipped_text("params.yaml"))


def tiny_params(source: Path, **overrides) -> dict:
    """The shipped params.yaml with a run small enough for a 2-core CPU: resnet18 from scratch at 64 px."""
    params = shipped_params()
    params["data"]["source"] = str(source)
    params["prepare"].update(max_short_side=80, num_workers=2)
    params["model"].update(arch="resnet18", weights="none")
    params["train"].update(resolution=64, batch_size=32, epochs=6, lr=0.05, lr_step_epochs=4, num_workers=1)
    params["evaluate"].update(batch_size=64)
    params["gradcam"].update(num_samples=8, num_misclassified=4)
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    return params


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {}))
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_project(dest: Path, params: dict | str, with_tests: bool = False) -> Path:
    """A copy of this project (tracked and untracked-not-ignored files, no tests unless asked) in a fresh git + DVC
    repo; params: a dict, or params.yaml's text."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    skipped = ("metrics/", "plots/") if with_tests else ("tests/", "metrics/", "plots/")
    for name in files:
        if name.startswith(skipped) or name == "dvc.lock" or not (REPO / name).is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    (dest / "params.yaml").write_text(params if isinstance(params, str) else yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "tests@example.com"], dest)
    run(["git", "config", "user.name", "tests"], dest)
    if not (dest / ".dvc").is_dir():
        run(["dvc", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "project"], dest)
    return dest
