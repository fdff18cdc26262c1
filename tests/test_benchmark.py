"""The speed benchmark runs end to end and reports every figure it promises (not how fast: that is its job)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks.speed import cars_like_jpegs
from tests.conftest import REPO


def test_generated_jpegs_have_stanford_cars_sizes():
    sizes = np.array([Image.open(io.BytesIO(b)).size for b in cars_like_jpegs(300)])
    mean_width, mean_height = sizes.mean(axis=0)
    assert 540 < mean_width < 680 and 360 < mean_height < 450  # Stanford Cars: 608 x 403
    assert sizes.min() >= 62 and sizes[:, 0].max() <= 2405


@pytest.mark.slow
def test_benchmark_writes_the_report(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "benchmarks.speed", "--fraction", "0.003", "--resolutions", "32", "--arch",
           "resnet18", "--batch-size", "4", "--steps", "1", "--seconds", "0.2", "--rounds", "2", "--workers", "0",
           "--photos", "1", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    full_report = json.loads(out.read_text())
    assert set(full_report["decode_ms_per_core"]) == {"torchcodec_whole", "pillow_whole", "pillow_1_2", "pillow_1_4",
                                                      "pillow_1_8"}
    report = full_report["resolutions"]["32"]
    assert report["loader_per_core"]["naive_images_per_s"] > 0 and report["loader_per_core"]["ratio"] > 0
    assert report["loader_per_core"]["ratio_whole_decode"] > 0 and report["loader_per_core"]["rounds"] == 2
    # at 32 px most boxes of Cars-sized images are 64+ px: decoded at a DCT reduction
    assert 0.5 < report["loader_per_core"]["train_crops_reduced"] <= 1
    assert report["loader_per_core"]["eval_images_per_s"] > 0 and report["loader_per_core"]["eval_images_reduced"] > 0.9
    low, high = report["loader_per_core"]["ratio_range"]
    assert 0 < low <= report["loader_per_core"]["ratio"] <= high
    assert report["loader_per_core"]["eval_size_short_side"] == 37 and report["loader_per_core"]["ratio_eval_size"] > 0
    differences = report["reduced_crop_differences"]
    assert {"generated_train", "photo_train", "photo_eval"} <= set(differences)
    assert all(0 <= d["mean"] <= d["p99"] <= d["max"] <= 255 and d["images"] > 0 for d in differences.values())
    photos = report["phone_photos_per_core"]
    assert photos["reduction"] == 8 and photos["images_per_s"] > 0 and photos["whole_decode_images_per_s"] > 0
    assert report["model"]["train_synthetic_images_per_s"] > 0 and report["model"]["real_over_synthetic"] > 0
    assert report["projection"]["full_run_h"] > 0
    assert "loader per core" in result.stdout and "eval per core" in result.stdout and "projected" in result.stdout


@pytest.mark.slow
def test_predict_benchmark_times_predict_on_photos_of_one_size(tmp_path):
    out = tmp_path / "predict.json"
    cmd = [sys.executable, "-m", "benchmarks.predict", "--images", "3", "--arch", "resnet18", "--resolution", "32",
           "--photo-size", "300x200", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["photos"] == "300x200" and report["against"] == "one at a time" and report["speedup"] > 0
    assert set(report["results"]) == {"one at a time", "batched (defaults)"}
