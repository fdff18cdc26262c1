"""predict on a user's files, as a hostile user gives them: odd files, odd arguments, files that change under it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from commands import predict
from finetune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from finetune.errors import StageError
from finetune.model import build_model
from finetune.transforms import Preprocessing
from tests.conftest import REPO, shipped_text


@pytest.fixture
def model_file(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model("resnet18", 3, "none"), Checkpoint(
        "resnet18", ["a", "b", "c"], Preprocessing(32), {"head": "linear", "head_hidden": 8, "head_dropout": 0.0}))
    return path


def photo(path: Path, colour=(200, 30, 30)) -> Path:
    Image.new("RGB", (60, 40), colour).save(path)
    return path


def rows_of(out: Path) -> dict[str, dict]:
    return {Path(row["file"]).name: row for row in json.loads(out.with_suffix(".json").read_text())["images"]}


def test_a_fifo_an_empty_file_and_non_images_are_answered_not_waited_on(tmp_path, model_file, monkeypatch, capsys):
    """Before: a FIFO given as an argument hung predict forever (300 s and a traceback with loader workers); a
    0-byte file was "not an image format"; files without an image suffix in a folder were left out uncounted."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(folder / "car.jpg")
    (folder / "notes.txt").write_text("not a photo")
    (folder / "empty.jpg").write_bytes(b"")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    start = time.monotonic()
    assert predict.main([str(folder), str(fifo), "--model", str(model_file), "--out", str(tmp_path / "p")]) == 0
    assert time.monotonic() - start < 60
    rows = rows_of(tmp_path / "p")
    assert "top" in rows["car.jpg"] and rows["empty.jpg"]["error"] == "empty file (0 bytes)"
    assert rows["pipe.jpg"]["error"].startswith("not a regular file but a named pipe (FIFO)")
    assert "1 file(s) in the folders left out (not image suffixes" in capsys.readouterr().out


@pytest.mark.slow
def test_a_fifo_with_loader_workers_does_not_hang(tmp_path, model_file):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    photos = [str(photo(tmp_path / f"{i}.jpg")) for i in range(4)]
    result = subprocess.run([sys.executable, "-m", "commands.predict", *photos, str(fifo), "--model", str(model_file),
                             "--out", str(tmp_path / "p"), "--batch-size", "2", "--workers", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0 and "4 image(s) classified, 1 unreadable" in result.stdout, result.stderr


def test_a_file_gone_before_its_gradcam_keeps_every_prediction(tmp_path, model_file, monkeypatch):
    """Before: a file that vanished after classification crashed the overlay pass before any prediction was
    written: all results lost."""
    monkeypatch.chdir(tmp_path)
    photos = [photo(tmp_path / f"{i}.jpg", (40 * i, 90, 200)) for i in range(3)]
    real_predict = predict.predict_files

    def then_deleted(files, *args, **kwargs):
        rows = real_predict(files, *args, **kwargs)
        photos[1].unlink()
        return rows

    monkeypatch.setattr(predict, "predict_files", then_deleted)
    assert predict.main([*map(str, photos), "--model", str(model_file), "--out", str(tmp_path / "p"),
                         "--gradcam", str(tmp_path / "cams")]) == 0
    rows = rows_of(tmp_path / "p")
    assert all("top" in row for row in rows.values())
    assert "gradcam_error" in rows["1.jpg"] and Path(rows["0.jpg"]["gradcam"]).is_file()
    assert Path(rows["2.jpg"]["gradcam"]).is_file()


@pytest.mark.parametrize("arguments,message", [
    (["--batch-size", "-1"], "--batch-size: must be 0 or more (got -1)"),
    (["--workers", "-2"], "--workers: must be -1 or more (got -2)"),
    (["--batch-size", "x"], "--batch-size: must be a whole number"),
])
def test_bad_numbers_are_refused_by_the_parser(arguments, message, capsys):
    """Before: --batch-size -1 gave a DataLoader traceback after the model was loaded."""
    with pytest.raises(SystemExit) as stopped:
        predict.parse_args(["x.jpg", *arguments])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_outputs_are_refused_before_any_work(tmp_path, model_file, monkeypatch):
    """Before: `--out X` with X.json a folder gave a traceback after all the work; `--gradcam plots/cams` was
    refused with a message about `--out plots/cams/overlay.png`; from another folder, `--out
    <project>/metrics/eval` overwrote the pipeline's metrics/eval.json (the guard resolved folders against the
    current directory)."""
    monkeypatch.chdir(tmp_path)
    image = str(photo(tmp_path / "car.jpg"))
    (tmp_path / "X.json").mkdir()
    with pytest.raises(StageError, match="--out X: .*X.json is a folder"):
        predict.main([image, "--model", str(model_file), "--out", "X"])
    with pytest.raises(StageError, match=f"--gradcam {REPO}/plots/cams is inside {REPO}/plots") as refused:
        predict.main([image, "--model", str(model_file), "--gradcam", str(REPO / "plots/cams")])
    assert "default: predictions" not in str(refused.value)  # --out's default is not --gradcam's (round 3)
    with pytest.raises(StageError, match=f"--out {REPO}/metrics/eval is inside {REPO}/metrics"):
        predict.main([image, "--model", str(model_file), "--out", str(REPO / "metrics/eval")])
    (tmp_path / "afile").write_text("")
    with pytest.raises(StageError, match="--gradcam afile is a file"):
        predict.main([image, "--model", str(model_file), "--gradcam", "afile"])


def test_a_custom_state_dir_is_protected_too(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "stages").mkdir(parents=True)
    params = shipped_text("params.yaml").replace("state_dir: checkpoints", f"state_dir: {tmp_path}/states")
    (project / "params.yaml").write_text(params)
    monkeypatch.setattr(predict, "PROJECT_ROOT", project)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match=f"is inside {tmp_path}/states"):
        predict.check_output(tmp_path / "states" / "p.json", "--out states/p")
    predict.check_output(tmp_path / "elsewhere" / "p.json", "--out elsewhere/p")


def test_predict_on_the_cpu_uses_the_cores_the_loader_leaves(tmp_path, model_file, monkeypatch):
    """Before: predict kept PyTorch's default threads beside its loader workers: 1,000 small files took 85 s
    instead of 13 s on a busy 2-core machine (train had a thread rule, predict none)."""
    from finetune.runtime import resolve_threads

    monkeypatch.chdir(tmp_path)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    photos = [str(photo(tmp_path / f"{i}.jpg")) for i in range(5)]
    predict.main([*photos, "--model", str(model_file), "--out", "p", "--batch-size", "2", "--workers", "1"])
    assert threads == [resolve_threads("auto", 1)]


def test_help_answers_without_importing_torch():
    """Before: `predict --help` took seconds (torch, timm and grad-cam imported first) and its usage line said
    predict.py."""
    code = "import sys, commands.predict; print('torch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"
    usage = subprocess.run([sys.executable, "-m", "commands.predict", "--help"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout
    assert usage.startswith("usage: python -m commands.predict")


def test_names_that_are_not_utf8_are_written_escaped_and_every_result_kept(tmp_path, model_file, monkeypatch):
    """Hostile round 3, Q1: a Latin-1 file name (caf\\xe9.jpg) or folder (dir\\xff) was classified, then writing
    predictions.json raised UnicodeEncodeError and no result was saved."""
    monkeypatch.chdir(tmp_path)
    folder = os.fsencode(tmp_path) + b"/dir\xff"
    os.mkdir(folder)
    for name in (folder + b"/caf\xe9.jpg", os.fsencode(tmp_path) + b"/caf\xe9.jpg"):
        with open(name, "wb") as out:
            Image.new("RGB", (60, 40), (200, 30, 30)).save(out, "JPEG")
    arguments = [os.fsdecode(folder), os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.jpg")]
    assert predict.main([*arguments, "--model", str(model_file), "--out", str(tmp_path / "p")]) == 0
    files = [row["file"] for row in json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))["images"]]
    assert [Path(file).name for file in files] == ["caf\\xe9.jpg", "caf\\xe9.jpg"] and "dir\\xff" in files[0]
    assert (tmp_path / "p.csv").read_text(encoding="utf-8").count("caf\\xe9.jpg,1,") == 2


def test_a_model_path_that_is_a_folder_or_a_link_loop_says_so(tmp_path):
    """Hostile round 3, Q6: `--model` a symlink loop or a folder was reported as "not found"."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone.pt")
    for name, says in (("loop", "symbolic link that leads to no file (Too many levels of symbolic links)"),
                       ("dangling", "symbolic link that leads to no file (No such file or directory)"),
                       (".", "is a folder, not a model file"), ("absent.pt", "not found: run `dvc repro train`")):
        with pytest.raises(StageError, match=re.escape(says)):
            load_checkpoint(tmp_path / name)


@pytest.mark.parametrize("layer,says", [("fc", "is not a module with a spatial output"),
                                        ("__class__", "is not a module of ResNet"),
                                        ("layer4.0.conv1.weight", "is a Parameter of ResNet, not a module")])
def test_a_gradcam_layer_without_a_map_is_refused_before_any_work(tmp_path, model_file, monkeypatch, layer, says):
    """Hostile round 3, Q3: `--gradcam-layer fc` (or __class__, or a parameter's path) gave three different
    tracebacks and wrote no predictions."""
    monkeypatch.chdir(tmp_path)
    photo(tmp_path / "a.jpg")
    with pytest.raises(StageError, match=f"--gradcam-layer '{re.escape(layer)}' {says}"):
        predict.main(["a.jpg", "--model", str(model_file), "--gradcam", "cams", "--gradcam-layer", layer])
    assert not (tmp_path / "predictions.json").exists() and not list((tmp_path / "cams").glob("*"))



def test_jpegs_prepare_refuses_as_corrupt_are_refused_by_predict_too(tmp_path, model_file, monkeypatch):
    """Hostile round 3, Q7: a JPEG cut at 40% that still ends in an EOI marker, or a header claiming arithmetic
    coding over Huffman data, was classified ("... 100.0%") on grey or noise pixels, with no warning. A JPEG
    padded before its end marker is whole, and is classified."""
    import io

    import numpy as np

    monkeypatch.chdir(tmp_path)
    gradient = np.repeat(np.linspace(0, 255, 400)[None, :, None], 300, 0).repeat(3, 2).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(gradient).save(out, "JPEG")
    full = out.getvalue()
    sof = full.find(b"\xff\xc0")
    (tmp_path / "cut.jpg").write_bytes(full[: int(len(full) * 0.4)] + b"\xff\xd9")
    (tmp_path / "arithmetic.jpg").write_bytes(full[:sof] + b"\xff\xc9" + full[sof + 2:])
    (tmp_path / "padded.jpg").write_bytes(full[:-2] + b"\x00" * 64 + b"\xff\xd9")
    assert predict.main(["cut.jpg", "arithmetic.jpg", "padded.jpg", "--model", str(model_file)]) == 0
    rows = rows_of(tmp_path / "predictions")
    for name in ("cut.jpg", "arithmetic.jpg"):
        assert rows[name]["error"].startswith("truncated or corrupt JPEG data (libjpeg: Corrupt JPEG data"), rows
    assert "top" in rows["padded.jpg"]
