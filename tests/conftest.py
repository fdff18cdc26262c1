"""Shared fixtures. Every test runs offline: the hub and torchvision's downloads must fail at once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.synthetic import make_image_folder

REPO = Path(__file__).resolve().parents[1]

# A mistaken hub call fails at once instead of retrying; caches go to a throwaway place.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")


# The test files that take longest (seconds of one clean-clone run, 2026-12-05), collected first: `make test`
# hands whole files to its two processes in collection order (--no-loadscope-reorder), so starting with these lets
# the short ones fill the gaps and both processes end together (the one-walk README file, 425 s, ran alone at the
# end when xdist ordered the files by their number of tests).
LONGEST_FILES = ["test_readme_path.py", "test_resume.py", "test_pipeline.py", "test_readme_recipes.py",  # 425-378
                 "test_gpu_path.py", "test_distributed.py", "test_modern_recipes.py"]  # 370-113


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


def project_env(**extra: str) -> dict:
    """The environment of every command a test runs: this venv's tools (dvc, python) first on PATH, and the project
    importable from anywhere (a stage run in a bare folder, as the resume tests do)."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                PYTHONPATH=str(REPO), **extra)


def run(cmd: list[str] | str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """The one way tests run a command (a DVC command, a stage, a shell line when `cmd` is a string), with the
    project's environment; a failure shows its output."""
    argv = ["bash", "-c", cmd] if isinstance(cmd, str) else cmd
    result = subprocess.run(argv, cwd=cwd, env=project_env(**(env or {})), capture_output=True, text=True)
    if check and result.returncode != 0:
        shown = cmd if isinstance(cmd, str) else " ".join(cmd)
        raise AssertionError(f"{shown} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def wait_for_queue(project: Path, timeout_s: float = 900) -> str:
    """`dvc queue status` once nothing is queued or running any more."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = run(["dvc", "queue", "status"], project).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout_s} s:\n{status}"
        time.sleep(3)


def run_stage(name: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m stages.<name>` in `cwd`, as DVC runs it."""
    return run([sys.executable, "-m", f"stages.{name}"], cwd, check=check)


def start_stage(name: str, cwd: Path, **popen) -> subprocess.Popen:
    """A stage started in the background (to be interrupted), its output and errors in one pipe. As from a
    terminal: a shell's background job (CI started with `&`) would pass SIGINT on as ignored."""
    return subprocess.Popen([sys.executable, "-m", f"stages.{name}"], cwd=cwd, env=project_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


def with_params(folder: Path, **overrides) -> Path:
    """Sets `section.key` params in folder/params.yaml."""
    params = yaml.safe_load((folder / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def copy_of(prepared: Path, dest: Path, **overrides) -> Path:
    """A copy of a prepared folder (params, data/raw, data/prepared, and whatever ran in it), with other params."""
    shutil.copytree(prepared, dest)
    return with_params(dest, **overrides)


# What every test that trains in a bare folder shares: the resume, DDP and compiled-path tests.
# 32 px: these tests compare weights and resume states, not accuracy, and a step costs a quarter of one at 64 px
# (bf16 under torch.compile, which the compiled-path tests run, has no fast kernels on an AVX2 CPU: 5 images/s).
PREPARED_PARAMS = {"train.epochs": 4, "train.lr_step_epochs": 2, "data.val_fraction": 0.2, "train.resolution": 32,
                   "train.num_threads": 1}  # a fixed thread count: it changes float sums, so the weights


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, image_folder) -> Path:
    """The image folder fetched and prepared once (train / validation / test), with tiny params, for tests that
    train with `python -m stages.train` in copies of it."""
    work = tmp_path_factory.mktemp("prepared")
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(image_folder, **PREPARED_PARAMS)))
    run_stage("fetch", work)
    run_stage("prepare", work)
    return work


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


STATE_DIR = Path("checkpoints")  # train.state_dir's default


def states(folder: Path) -> list[Path]:
    """The resume states in a train.state_dir (one file per params and data: train_state-<fingerprint>.pt)."""
    return sorted(folder.glob("train_state-*.pt"))


def weights(workdir: Path) -> dict:
    return torch.load(workdir / "models/model.pt", weights_only=True)["state_dict"]


def curve(workdir: Path, name: str) -> list[tuple[str, str]]:
    """(step, value) rows of a DVCLive curve, e.g. train/loss.tsv."""
    rows = (workdir / "metrics/train/plots/metrics" / name).read_text().splitlines()[1:]
    return [tuple(row.split("\t")) for row in rows]


def interrupt_after_first_epoch(cwd: Path, sig: int, whole_group: bool = False, state_dir: Path | None = None
                                ) -> tuple[int, str]:
    """Starts `train` in cwd and sends it `sig` once a new state appears in state_dir (its first epoch is saved):
    (exit status, output). `whole_group`: as Ctrl-C in a terminal, the signal reaches the loader workers too."""
    state_dir = state_dir or cwd / STATE_DIR
    before = set(states(state_dir))
    process = start_stage("train", cwd, start_new_session=True)
    deadline = time.monotonic() + 240
    while not set(states(state_dir)) - before:
        if process.poll() is not None:  # its own words, to tell a crash from a refusal
            raise AssertionError(f"train ended ({process.returncode}) before its first checkpoint:\n"
                                 f"{process.communicate()[0][-4000:]}")
        assert time.monotonic() < deadline, "train saved no checkpoint in 240 s"
        time.sleep(0.05)
    if whole_group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    out, _ = process.communicate(timeout=300)
    return process.returncode, out
