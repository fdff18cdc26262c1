"""The README's CPU path, walked literally by a new user on generated photos (the install aside): a fresh clone, a
CPU trial, a second experiment, the comparison, two queued runs, a commit, the earlier runs shown, and then the
suite itself in that same used clone."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, make_project, project_env, run, shipped_text
from tests.synthetic import make_image_folder

pytestmark = pytest.mark.slow  # real stages, DVC runs and the fast suite in a subprocess


# The fast test files that read params.yaml, dvc.yaml, the docs or an experiment's outputs from the project.
WORKSPACE_READERS = ["tests/test_params.py", "tests/test_stage_contract.py", "tests/test_check.py",
                     "tests/test_compare.py", "tests/test_offline_plots.py"]


def readme_cpu_trial_offline() -> str:
    """The offline CPU-trial command of README 'Try it on a CPU', as the user pastes it."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Try it on a CPU"):text.index("## Results")]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    (command,) = [block for block in blocks if "model.weights=none" in block]
    return command.replace("\\\n", " ").strip()


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return run(command, cwd)


def test_the_readme_cpu_path_from_trial_to_comparing_runs_in_a_used_clone(tmp_path):
    upstream = make_project(tmp_path / "upstream", shipped_text("params.yaml"), with_tests=True)  # as published
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(upstream), str(clone)], check=True)
    make_image_folder(clone / "my_images", num_classes=3, per_class={"train": 15})

    trial = readme_cpu_trial_offline()
    assert "-n cpu-trial-offline" in trial and "$PWD/my_images" in trial
    shell(trial, clone)
    shell(trial.replace("-n cpu-trial-offline", "-n cpu-trial-lr").replace("train.lr=0.025", "train.lr=0.05"), clone)

    table = shell(f"{sys.executable} -m commands.compare --width 150", clone).stdout
    lines = table.splitlines()
    assert max(map(len, lines)) <= 150 and lines[0].split()[-1] == "lr", table
    assert any("cpu-trial-offline" in line and "0.025" in line for line in lines)
    assert "Within noise? Each run against the best" in table and "exact McNemar" in table  # paired, issue 31

    shell("git add -A && git commit -qm 'CPU trial'", clone)  # before queueing (docs/operations.md)
    assert "my_images" not in shell("git show --stat HEAD", clone).stdout  # the photos stay out of git
    for lr in ("0.01", "0.1"):
        shell(f"dvc exp run --queue -n queued-{lr} -S train.lr={lr}", clone)
    shell("dvc queue start -j 1", clone)
    deadline = time.monotonic() + 900
    while any(word in (status := shell("dvc queue status", clone).stdout) for word in ("Queued", "Running")):
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 2, status
    for lr in ("0.01", "0.1"):
        logs = shell(f"dvc queue logs queued-{lr}", clone).stdout
        assert "Running stage 'prepare'" not in logs and "WARNING" not in logs, logs

    shell("dvc exp apply queued-0.1 && git add -A && git commit -qm 'the best run'", clone)  # README's last step
    assert "cpu-trial-lr" not in shell("dvc exp show --json", clone).stdout  # of the new commit only
    shown = shell("dvc exp show -A --json", clone).stdout
    assert all(name in shown for name in ("cpu-trial-offline", "cpu-trial-lr", "queued-0.01", "queued-0.1"))
    compare = f"{sys.executable} -m commands.compare --width 150"
    assert "cpu-trial-lr" not in shell(compare, clone).stdout  # the current commit's runs, as dvc exp show
    assert "cpu-trial-lr" in shell(f"{compare} --all-commits", clone).stdout

    # The tests in this same used clone (an applied experiment's params.yaml, metrics and plots in the workspace):
    # they read the params, docs and README as the project ships them. The files that read what an experiment
    # changes run here; the rest read nothing of the workspace.
    assert (clone / "params.yaml").read_text() != shipped_text("params.yaml")  # the applied run's params
    fast = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", "-x",
                           *WORKSPACE_READERS], cwd=clone, capture_output=True, text=True, env=project_env())
    assert fast.returncode == 0, fast.stdout[-3000:] + fast.stderr[-2000:]
