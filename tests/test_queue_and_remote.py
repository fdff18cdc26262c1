"""A run queued before the trial it follows is committed. The README's own order (commit, then queue), a queued
sweep, the comparing commands and a run shared through a DVC remote are walked in test_readme_path.py."""

from __future__ import annotations

import pytest

from tests.conftest import make_project, run, tiny_params, wait_for_queue

pytestmark = pytest.mark.slow  # real stages, DVC runs or several processes

def test_a_run_queued_before_the_trial_is_committed_restores_prepare(tmp_path, image_folder):
    """A trial (`dvc exp run`) in a fresh clone with no dvc.lock committed, then a queued experiment before the
    commit the README asks for. Before: every queued run prepared the data again (prepare's `cache: false` outputs
    switched the run-cache off). prepare is restored from the run-cache now, committed or not; the README's own
    order (commit, then queue: no `No file hash info found` warnings either) is walked in test_readme_path.py."""
    project = make_project(tmp_path, tiny_params(image_folder, **{"train.epochs": 1, "train.resolution": 32}))
    # Up to train: what follows it reads the model, not the data, and would add ~30 s to each run.
    run(["dvc", "exp", "run", "-n", "trial", "train"], project)
    run(["dvc", "exp", "run", "--queue", "-n", "uncommitted", "-S", "train.lr=0.01", "train"], project)
    run(["dvc", "queue", "start", "-j", "1"], project)
    assert wait_for_queue(project).count("Success") == 1
    logs = run(["dvc", "queue", "logs", "uncommitted"], project).stdout
    assert "Running stage 'prepare'" not in logs and "Running stage 'fetch'" not in logs, logs
    assert "Running stage 'train'" in logs
