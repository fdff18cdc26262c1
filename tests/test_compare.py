"""`python -m commands.compare`: the runs and what differs between them, in 150 columns, on the README's CPU path."""

from __future__ import annotations

import copy
import io
import sys

import pytest

from commands import compare
from tests.conftest import shipped_params

CPU_TRIAL = {"data": {"preset": "none", "source": "/home/me/my_images", "val_fraction": 0, "test_fraction": 0.2},
             "model": {"arch": "resnet18", "weights": "none"},
             "train": {"resolution": 128, "batch_size": 32, "lr": 0.025, "epochs": 10, "lr_step_epochs": 7,
                       "device": "cpu"}}


def experiment(name: str, created: str, changes: dict, top1: float | None) -> dict:
    params = copy.deepcopy(shipped_params())
    for section, values in changes.items():
        params[section].update(values)
    metrics = {"metrics/eval.json": {"data": {"top1": top1, "top5": 0.9, "mean_class_accuracy": top1,
                                              "kept_epoch": 10}}} if top1 is not None else {}
    return {"rev": f"{name:0<40}"[:40], "name": name, "data": {"timestamp": created, "metrics": metrics,
                                                               "params": {"params.yaml": {"data": params}}}}


def test_only_the_params_that_differ_between_the_runs_are_shown_in_150_columns():
    """Before: `dvc exp show --only-changed` compared each run with the baseline commit, which holds the Stanford
    Cars defaults: every CPU-trial param counted as changed (316 columns), and at 150 columns the one param that
    differed (train.lr) was cut off."""
    second = copy.deepcopy(CPU_TRIAL)
    second["train"]["lr"] = 0.05
    queued = copy.deepcopy(CPU_TRIAL)
    queued["train"]["lr"] = 0.1
    baseline = experiment("main", "2026-11-24T21:00:00", {}, None)  # the shipped defaults: no run of its own
    baseline["experiments"] = [{"revs": [experiment("cpu-trial", "2026-12-01T10:00:00", CPU_TRIAL, 0.61)]},
                               {"revs": [experiment("cpu-trial-lr", "2026-12-01T10:05:00", second, 0.64)]},
                               {"revs": [experiment("queued", "2026-12-01T10:06:00", queued, None)]}]
    shown = [experiment("workspace", "", second, 0.64) | {"rev": "workspace"}, baseline]
    rows = compare.runs_of(shown)
    assert [row["name"] for row in rows] == ["cpu-trial", "cpu-trial-lr"]  # no metrics yet: not a run
    text = compare.table(rows, 150)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 150
    header = lines[0].split()
    assert header == ["Experiment", "Created", "top1", "top5", "mean/class", "epoch", "lr"]
    assert "0.025" in lines[2] and "0.05" in lines[3] and "0.6100" in lines[2]


def test_params_that_do_not_fit_are_named_not_cut():
    many = {"train": {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.001, "label_smoothing": 0.1,
                      "crop_scale": [0.25, 1.0], "state_dir": "/mnt/shared/a-very-long-bucket-path/cars"}}
    rows = compare.runs_of([experiment("main", "2026-12-01T09:00:00", {}, 0.5) | {"experiments": [
        {"revs": [experiment("other", "2026-12-01T10:00:00", many, 0.6)]}]}])
    text = compare.table(rows, 80)
    assert all(len(line) <= 80 for line in text.splitlines()[:4])
    assert "more param(s) differ, left out to fit 80 columns" in text and "--width" in text


def test_runs_that_differ_by_a_few_test_images_are_called_within_noise():
    """Issue 31: three runs 1-2 images apart of 189 were shown as deltas a user ranked them by; now each is paired
    with the best run on the same images (exact McNemar) and the verdict says whether the test split can tell."""
    ids = [f"test/c{i % 7}/{i}.jpg" for i in range(189)]
    best = {i: n >= 1 for n, i in enumerate(ids)}  # 188 of 189 right
    close = {i: n >= 2 for n, i in enumerate(ids)}  # one image fewer
    far = {i: n >= 60 for n, i in enumerate(ids)}  # 59 images fewer
    rows = [{"name": name, "metrics": {"top1": sum(hits.values()) / len(hits)}}
            for name, hits in (("close", close), ("best", best), ("far", far))]
    predictions = {"close": close, "best": best, "far": far}
    lines = compare.noise_lines(rows, predictions, 150)
    text = "\n".join(lines)
    assert all(len(line) <= 150 for line in lines)
    assert "against the best, best" in text and "189 test images" in text
    close_line = next(line for line in lines if line.strip().startswith("close:"))
    assert "-0.5 points" in close_line and "p = 1: within noise" in close_line
    far_line = next(line for line in lines if line.strip().startswith("far:"))
    assert "-31.2 points" in far_line and "beyond noise" in far_line
    shuffled = {"best": best, "close": {f"other{i}": v for i, v in close.items()}}
    assert "not comparable" in "\n".join(compare.noise_lines(rows[:2], shuffled, 150))
    assert compare.noise_lines(rows[:1], predictions, 150) == []  # one run: nothing to pair


def test_long_and_wide_names_keep_the_metrics_in_view_and_aligned():
    """Hostile round 3, C5/C6/C9: one 190-character experiment name hid every metric at 150 columns; at 20 columns
    the names alone were shown with no word; CJK and emoji names were padded by code points, misaligning columns."""
    long_name = "sgd-" + "x" * 186
    rows = compare.runs_of([experiment("main", "2026-12-01T09:00:00", {}, 0.5) | {"experiments": [
        {"revs": [experiment(long_name, "2026-12-01T10:00:00", {"train": {"lr": 0.05}}, 0.61)]},
        {"revs": [experiment("日本語の実験🚗", "2026-12-01T11:00:00", {"train": {"lr": 0.02}}, 0.63)]}]}])
    lines = compare.table(rows, 150).splitlines()
    assert "top1" in lines[0] and "0.6100" in lines[3] and "0.6300" in lines[4] and "…" in lines[3]
    starts = {compare.display_width(line[:line.index(value)]) for line, value in
              ((lines[0], "top1"), (lines[3], "0.6100"), (lines[4], "0.6300"))}
    assert len(starts) == 1  # the top1 column starts at the same terminal column in every row
    assert all(compare.display_width(line) <= 150 for line in lines[:5])
    narrow = compare.table(rows, 40)
    assert "The headline metrics need" in narrow and "pass --width" in narrow


@pytest.mark.parametrize("width", ["0", "-5", "wide"])
def test_a_width_that_cannot_hold_a_table_is_refused(width, capsys):
    """Hostile round 3, C7: `--width 0` printed 28 empty lines, `--width -5` cut 5 characters off every line."""
    with pytest.raises(SystemExit):
        compare.main(["--width", width])
    assert "--width" in capsys.readouterr().err


def test_an_ascii_terminal_gets_dots_not_a_traceback(monkeypatch):
    """Hostile round 3, C8: on an ASCII or Latin-1 terminal compare ended in a UnicodeEncodeError."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(compare, "ELLIPSIS", "…")
    compare.use_plain_ellipsis_if_needed()
    assert compare.ELLIPSIS == "..." and "..." in compare.cell("/mnt/shared/a-very-long-bucket-path/cars")
    print("日本語 " + compare.cell("x" * 40))  # characters it cannot encode are replaced, not raised
    out.flush()
    assert b"?" in out.buffer.getvalue() and b"..." in out.buffer.getvalue()


def test_help_describes_the_command_whole(capsys):
    """Hostile round 3: `--help` cut its description mid-sentence (the docstring's first line)."""
    with pytest.raises(SystemExit):
        compare.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "in one table that fits the terminal (150 columns when it cannot tell)." in text
    assert "--all-commits" in text
