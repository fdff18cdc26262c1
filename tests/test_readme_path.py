"""The README's CPU path, walked literally by a new user on generated photos (the install aside): a fresh clone, a
CPU trial, a second experiment, the comparison, two queued runs, the README's comparing commands, a commit, the
earlier runs shown, the suite itself in that same used clone, and the finished run shared through a DVC remote.

One walk serves every test here (its runs are the file's cost): the queue's and the remote's tests read the same
experiments a user would have made, in the order they made them."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, make_project, project_env, run, shipped_text, wait_for_queue
from tests.synthetic import make_image_folder

pytestmark = pytest.mark.slow  # real stages, DVC runs and the fast suite in a subprocess

QUEUED = {"queued-0.01": "0.01", "queued-0.1": "0.1"}  # the two runs the walk queues: name -> train.lr


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


def readme_block(heading: str) -> list[str]:
    """The commands of the first ```bash block under a README heading, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(heading):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def experiments_by_name(clone: Path) -> dict[str, dict]:
    """`dvc exp show --json`: name -> {params, metrics, rev} of every experiment of the current commit."""
    shown = json.loads(shell("dvc exp show --json", clone).stdout)
    found = {}
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            for revision in experiment["revs"]:
                data = revision["data"]
                found[revision["name"]] = {"params": data["params"]["params.yaml"]["data"], "rev": data["rev"],
                                           "metrics": {path: value["data"] for path, value in data["metrics"].items()}}
    return found


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> dict:
    """The README's CPU path up to its last commit; what each step printed, and what a test must read before a
    later step changes it (the queued runs' experiments before that commit), by step."""
    root = tmp_path_factory.mktemp("walk")
    upstream = make_project(root / "upstream", shipped_text("params.yaml"), with_tests=True)  # as published
    clone = root / "clone"
    subprocess.run(["git", "clone", "-q", str(upstream), str(clone)], check=True)
    make_image_folder(clone / "my_images", num_classes=3, per_class={"train": 15})
    seen = {"clone": clone, "trial": readme_cpu_trial_offline()}
    shell(seen["trial"], clone)
    shell(seen["trial"].replace("-n cpu-trial-offline", "-n cpu-trial-lr").replace("train.lr=0.025", "train.lr=0.05"),
          clone)
    seen["compare"] = shell(f"{sys.executable} -m commands.compare --width 150", clone).stdout

    shell("git add -A && git commit -qm 'CPU trial'", clone)  # before queueing (docs/operations.md)
    seen["committed"] = shell("git show --stat HEAD", clone).stdout
    for name, lr in QUEUED.items():
        shell(f"dvc exp run --queue -n {name} -S train.lr={lr}", clone)
    shell("dvc queue start -j 1", clone)
    seen["queue_status"] = wait_for_queue(clone)
    seen["queue_logs"] = {name: shell(f"dvc queue logs {name}", clone).stdout for name in QUEUED}
    seen["experiments"] = experiments_by_name(clone)
    seen["comparing"] = comparing_commands_run(clone)

    shell("dvc exp apply queued-0.1 && git add -A && git commit -qm 'the best run'", clone)  # README's last step
    seen["shown"] = shell("dvc exp show --json", clone).stdout
    seen["shown_all"] = shell("dvc exp show -A --json", clone).stdout
    compare = f"{sys.executable} -m commands.compare --width 150"
    seen["compare_after"] = shell(compare, clone).stdout
    seen["compare_all"] = shell(f"{compare} --all-commits", clone).stdout
    return seen


def comparing_commands_run(clone: Path) -> dict[str, subprocess.CompletedProcess]:
    """README "Comparing runs", every command with the two queued runs' names put in, in order (its last,
    `dvc exp apply`, changes the workspace: the walk applies and commits its best run next)."""
    first, second = QUEUED
    results = {}
    for command in readme_block("### Comparing runs"):
        command = command.replace("<exp-1>", first).replace("<exp-2>", second)
        results[command] = run(shlex.split(command), clone, check=False)
        if command.startswith("dvc plots diff"):
            results["page"] = (clone / "dvc_plots/index.html").read_text()
    return results


def test_the_readme_cpu_path_from_trial_to_comparing_runs_in_a_used_clone(walk):
    clone, trial = walk["clone"], walk["trial"]
    assert "-n cpu-trial-offline" in trial and "$PWD/my_images" in trial
    table = walk["compare"]
    lines = table.splitlines()
    assert max(map(len, lines)) <= 150 and lines[0].split()[-1] == "lr", table
    assert any("cpu-trial-offline" in line and "0.025" in line for line in lines)
    assert "Within noise? Each run against the best" in table and "exact McNemar" in table  # paired, issue 31

    assert "my_images" not in walk["committed"]  # the photos stay out of git
    assert walk["queue_status"].count("Success") == 2, walk["queue_status"]
    for logs in walk["queue_logs"].values():
        assert "Running stage 'prepare'" not in logs and "WARNING" not in logs, logs

    assert "cpu-trial-lr" not in walk["shown"]  # of the new commit only
    assert all(name in walk["shown_all"] for name in ("cpu-trial-offline", "cpu-trial-lr", *QUEUED))
    assert "cpu-trial-lr" not in walk["compare_after"]  # the current commit's runs, as dvc exp show
    assert "cpu-trial-lr" in walk["compare_all"]

    # The tests in this same used clone (an applied experiment's params.yaml, metrics and plots in the workspace):
    # they read the params, docs and README as the project ships them. The files that read what an experiment
    # changes run here; the rest read nothing of the workspace.
    assert (clone / "params.yaml").read_text() != shipped_text("params.yaml")  # the applied run's params
    fast = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", "-x",
                           *WORKSPACE_READERS], cwd=clone, capture_output=True, text=True, env=project_env())
    assert fast.returncode == 0, fast.stdout[-3000:] + fast.stderr[-2000:]


def test_queued_runs_each_run_with_their_own_params_and_metrics(walk):
    accuracies = set()
    for name, lr in QUEUED.items():
        experiment = walk["experiments"][name]
        assert experiment["params"]["train"]["lr"] == float(lr)
        evaluation = experiment["metrics"]["metrics/eval.json"]
        assert 0 < evaluation["top1"] <= 1
        live = json.loads(shell(f"git show {experiment['rev']}:metrics/train/metrics.json", walk["clone"]).stdout)
        accuracies.add((evaluation["top1"], live["train"]["loss"]))
        logs = walk["queue_logs"][name]
        assert "Stage 'prepare' didn't change, skipping" in logs and "Running stage 'train'" in logs
    assert len(accuracies) == len(QUEUED)  # each experiment measured its own model


def test_the_readmes_comparing_commands_work_after_two_experiments(walk):
    first, second = QUEUED
    for command, result in walk["comparing"].items():
        if command == "page":
            continue
        output = result.stdout + result.stderr
        assert result.returncode == 0 and "ERROR" not in output, f"{command}:\n{output}"
        if command.startswith("dvc exp list"):
            assert all(name in result.stdout for name in QUEUED)
        if command.startswith("dvc metrics diff"):  # --all: every headline metric, changed or not
            assert all(word in result.stdout for word in ("metrics/eval.json", "top1", "kept_epoch", first, second))
    assert any(command.startswith("dvc plots diff") for command in walk["comparing"])
    page = walk["comparing"]["page"]
    assert "<script src=" not in page and page.count("vegaEmbed('#") >= 3


def test_pushed_run_is_pulled_elsewhere_without_rerunning_anything(walk, tmp_path):
    """The walk's last commit (its best run), pushed to a DVC remote and pulled into another clone."""
    project = walk["clone"]
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], project)
    run(["git", "commit", "-qam", "a shared remote"], project)
    run(["dvc", "push"], project)

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / "models/model.pt").exists()
    run(["dvc", "pull"], clone)
    assert (clone / "models/model.pt").stat().st_size == (project / "models/model.pt").stat().st_size
    assert run(["dvc", "status", "--json"], clone).stdout.strip() == "{}"
    repro = run(["dvc", "repro"], clone)
    assert "Running stage" not in repro.stdout and "didn't change, skipping" in repro.stdout
