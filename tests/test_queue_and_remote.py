"""A sweep through DVC's experiment queue, and a finished run shared through a DVC remote, offline."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, make_project, run, tiny_params

pytestmark = pytest.mark.slow  # real stages, DVC runs or several processes

QUEUED = {"lr-low": "0.005", "lr-high": "0.02"}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, image_folder) -> Path:
    """A finished, committed run: data and model in the DVC cache, metrics in git."""
    project = make_project(tmp_path_factory.mktemp("baseline"),
                           tiny_params(image_folder, **{"train.epochs": 2, "train.lr": 0.01}))
    run(["dvc", "repro"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline run"], project)
    return project


def wait_for_queue(project: Path, timeout_s: float = 900) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = run(["dvc", "queue", "status"], project).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout_s} s:\n{status}"
        time.sleep(3)


def experiments_by_name(project: Path) -> dict[str, dict]:
    """`dvc exp show --json`: name -> {params, metrics} of every experiment of the baseline commit."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    found = {}
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            for revision in experiment["revs"]:
                data = revision["data"]
                found[revision["name"]] = {"params": data["params"]["params.yaml"]["data"], "rev": data["rev"],
                                           "metrics": {path: value["data"] for path, value in data["metrics"].items()}}
    return found


def test_queued_sweep_runs_each_experiment_with_its_own_params_and_metrics(baseline):
    for name, lr in QUEUED.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}"], baseline)
    run(["dvc", "queue", "start", "-j", "2"], baseline)
    status = wait_for_queue(baseline)
    assert status.count("Success") == len(QUEUED), status

    experiments = experiments_by_name(baseline)
    accuracies = set()
    for name, lr in QUEUED.items():
        experiment = experiments[name]
        assert experiment["params"]["train"]["lr"] == float(lr)
        evaluation = experiment["metrics"]["metrics/eval.json"]
        assert 0 < evaluation["top1"] <= 1
        live = json.loads(run(["git", "show", f"{experiment['rev']}:metrics/train/metrics.json"], baseline).stdout)
        accuracies.add((evaluation["top1"], live["train"]["loss"]))
        logs = run(["dvc", "queue", "logs", name], baseline).stdout
        assert "Stage 'prepare' didn't change, skipping" in logs and "Running stage 'train'" in logs
    assert len(accuracies) == len(QUEUED)  # each experiment measured its own model


def readme_block(heading: str) -> list[str]:
    """The commands of the first ```bash block under a README heading, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(heading):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_the_readmes_comparing_commands_work_after_two_experiments(baseline, tmp_path):
    """Run after the queued sweep above: its two experiments are the ones compared, by their names."""
    names = sorted(experiments_by_name(baseline))
    assert set(QUEUED) <= set(names)
    first, second = QUEUED
    for command in readme_block("### Comparing runs"):
        command = command.replace("<exp-1>", first).replace("<exp-2>", second)
        result = run(shlex.split(command), baseline, check=False)
        output = result.stdout + result.stderr
        assert result.returncode == 0 and "ERROR" not in output, f"{command}:\n{output}"
        if command.startswith("dvc exp list"):
            assert all(name in result.stdout for name in QUEUED)
        if command.startswith("dvc metrics diff"):  # --all: every headline metric, changed or not
            assert all(word in result.stdout for word in ("metrics/eval.json", "top1", "kept_epoch", first, second))
        if command.startswith("dvc plots diff"):
            page = (baseline / "dvc_plots/index.html").read_text()
            assert "<script src=" not in page and page.count("vegaEmbed('#") >= 3
    run(["git", "checkout", "--", "."], baseline)  # `dvc exp apply` changed the workspace: back to the baseline
    run(["dvc", "checkout", "--force"], baseline)


def test_pushed_run_is_pulled_elsewhere_without_rerunning_anything(baseline, tmp_path):
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], baseline)
    run(["git", "commit", "-qam", "a shared remote"], baseline)
    run(["dvc", "push"], baseline)

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(baseline), str(clone)], check=True)
    assert not (clone / "models/model.pt").exists()
    run(["dvc", "pull"], clone)
    assert (clone / "models/model.pt").stat().st_size == (baseline / "models/model.pt").stat().st_size
    assert run(["dvc", "status", "--json"], clone).stdout.strip() == "{}"
    repro = run(["dvc", "repro"], clone)
    assert "Running stage" not in repro.stdout and "didn't change, skipping" in repro.stdout


def test_a_run_queued_before_the_trial_is_committed_restores_prepare(tmp_path, image_folder):
    """A trial (`dvc exp run`) in a fresh clone with no dvc.lock committed, then a queued experiment before the
    commit the README asks for. Before: every queued run prepared the data again (prepare's `cache: false` outputs
    switched the run-cache off). prepare is restored from the run-cache now, committed or not; the README's own
    order (commit, then queue: no `No file hash info found` warnings either) is walked in test_readme_path.py."""
    project = make_project(tmp_path, tiny_params(image_folder, **{"train.epochs": 1, "train.resolution": 32,
                                                                   "gradcam.num_samples": 2,
                                                                   "gradcam.num_misclassified": 1}))
    run(["dvc", "exp", "run", "-n", "trial"], project)
    run(["dvc", "exp", "run", "--queue", "-n", "uncommitted", "-S", "train.lr=0.01"], project)
    run(["dvc", "queue", "start", "-j", "1"], project)
    assert wait_for_queue(project).count("Success") == 1
    logs = run(["dvc", "queue", "logs", "uncommitted"], project).stdout
    assert "Running stage 'prepare'" not in logs and "Running stage 'fetch'" not in logs, logs
    assert "Running stage 'train'" in logs
