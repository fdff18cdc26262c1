"""Exact lineage: no machine path in what a run writes for others, and the params a run changed from the last
commit named by check, the report and the model card."""

from __future__ import annotations

import subprocess

import yaml

from finetune.exporting import recipe_section
from finetune.lineage import changed_params, changes_line, committed_params, print_changes, shown_path


def git_repo(folder, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    for command in (["init", "-q"], ["add", "params.yaml"],
                    ["-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "params"]):
        subprocess.run(["git", *command], cwd=folder, check=True)


def test_paths_are_shown_relative_to_the_project_or_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert shown_path(str(tmp_path / "data" / "my_images")) == "data/my_images"
    assert shown_path("/home/someone/weights/lite0.pth") == "…/lite0.pth"
    for as_given in ("IMAGENET1K_V2", "tanganke/stanford_cars", "my_images", "none"):
        assert shown_path(as_given) == as_given


def test_the_params_an_experiment_left_in_the_workspace_are_named(tmp_path, monkeypatch, capsys):
    """Hostile round (issue 31): after `dvc exp run -S train.freeze_epochs=8`, the next `dvc exp run -S ...`
    silently inherited freeze_epochs 8 from the workspace. check now names every such param."""
    committed = {"train": {"lr": 0.1, "freeze_epochs": 0}, "data": {"source": None}}
    git_repo(tmp_path, committed)
    monkeypatch.chdir(tmp_path)
    now = {"train": {"lr": 0.1, "freeze_epochs": 8}, "data": {"source": str(tmp_path / "photos")}}
    rows = changed_params(now, committed_params()[0])
    assert [r["param"] for r in rows] == ["data.source", "train.freeze_epochs"]
    assert changes_line(rows) == "data.source photos (committed: null), train.freeze_epochs 8 (committed: 0)"
    print_changes(now)
    out = capsys.readouterr().out
    assert "differs from the last commit's in 2 param(s): data.source photos (committed: null), " \
           "train.freeze_epochs 8 (committed: 0)" in out and "`git checkout params.yaml` resets them" in out
    print_changes(committed)
    assert capsys.readouterr().out == ""  # nothing changed: nothing said


def test_outside_a_git_repository_check_says_it_cannot_compare(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    print_changes({"train": {"lr": 0.1}})
    assert "no committed params.yaml to compare with" in capsys.readouterr().out


def test_the_model_card_recipe_has_every_param_and_what_the_run_changed(tmp_path, monkeypatch):
    """Before: the card's recipe left out crop scale, nesterov, no weight decay on norms, the split fraction and
    seed, and showed absolute machine paths."""
    committed = {"data": {"source": None, "val_fraction": 0.1}, "model": {"weights": "IMAGENET1K_V2"},
                 "train": {"lr": 0.1, "nesterov": False, "crop_scale": [0.08, 1.0]}, "gradcam": {"num_samples": 16}}
    git_repo(tmp_path, committed)
    monkeypatch.chdir(tmp_path)
    run = {"data": {"source": "/home/me/my_images", "val_fraction": 0.1},
           "model": {"weights": "/opt/weights/lite0.pth"},
           "train": {"lr": 0.025, "nesterov": True, "crop_scale": [0.25, 1.0]}, "gradcam": {"num_samples": 4}}
    section = recipe_section(run).replace("\\", "")  # Markdown escapes (train.crop\\_scale) read as text
    changed, every = section.split("<details>")
    assert "| train.lr | 0.025 | 0.1 |" in changed and "| train.crop_scale | [0.25, 1.0] | [0.08, 1.0] |" in changed
    assert "| data.source | …/my_images | null |" in changed and "| model.weights | …/lite0.pth | IMAGENET1K_V2 |" \
        in changed
    assert "val_fraction" not in changed and "gradcam" not in section  # unchanged; not part of the model
    for row in ("| data.val_fraction | 0.1 |", "| train.nesterov | true |", "| train.crop_scale | [0.25, 1.0] |"):
        assert row in every
    assert "/home/me" not in section and "/opt/weights" not in section
