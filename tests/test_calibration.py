"""Temperature scaling and the expected calibration error (Guo et al. 2017), and their way through the checkpoint,
predict and the export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from commands import predict
from finetune.calibration import (
    Calibration,
    calibrate,
    coverage_table,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from finetune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from finetune.errors import StageError
from finetune.exporting import Calibrated
from finetune.model import build_model
from finetune.transforms import Preprocessing


def labels_drawn_from(logits: torch.Tensor, temperature: float, seed: int = 0) -> torch.Tensor:
    """Labels sampled from softmax(logits / temperature): logits / temperature are then calibrated by construction."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial((logits / temperature).softmax(1), 1, generator=generator).squeeze(1)


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with(true_temperature):
    with torch.inference_mode():  # as predict_logits returns them
        logits = torch.randn(20000, 10, generator=torch.Generator().manual_seed(1)) * 4
        labels = labels_drawn_from(logits, true_temperature)
    assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.05)


def test_scaling_by_the_fitted_temperature_lowers_the_calibration_error():
    logits = torch.randn(5000, 10, generator=torch.Generator().manual_seed(2)) * 3
    labels = labels_drawn_from(logits, 2.0)  # the model is over-confident: its logits are twice too large
    calibration = calibrate(logits, labels)
    assert calibration.fitted and calibration.images == 5000 and calibration.temperature > 1.5

    def ece(scaled: torch.Tensor) -> float:
        probs = scaled.softmax(1)
        return expected_calibration_error(probs.max(1).values.numpy(), (probs.argmax(1) == labels).numpy())

    before, after = ece(logits), ece(logits / calibration.temperature)
    assert before > 0.1 and after < 0.03 and after < before / 4


def test_the_calibration_error_is_the_weighted_gap_between_confidence_and_accuracy():
    # 10 images at 0.95 of which 5 right (gap 0.45), 10 at 0.55 of which 5 right (gap 0.05): ECE (0.45 + 0.05) / 2
    confidence = np.array([0.95] * 10 + [0.55] * 10)
    correct = np.array([True, False] * 10)
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.25)
    bins = reliability_bins(confidence, correct)
    assert [b["images"] for b in bins] == [10, 10] and sum(b["images"] for b in bins) == len(confidence)
    assert [b["accuracy"] for b in bins] == [0.5, 0.5]
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([True, True])) == 0  # the top bin holds 1.0
    assert expected_calibration_error(np.array([]), np.array([])) == 0


def test_the_coverage_table_counts_what_each_threshold_answers():
    confidence = np.array([0.99, 0.92, 0.85, 0.6, 0.3])
    correct = np.array([True, True, False, True, False])
    rows = {row["min_confidence"]: row for row in coverage_table(confidence, correct)}
    assert (rows[0.5]["answered"], rows[0.5]["errors"], rows[0.5]["accuracy"]) == (4, 1, 0.75)
    assert (rows[0.9]["answered"], rows[0.9]["errors"], rows[0.9]["accuracy"]) == (2, 0, 1.0)
    assert rows[0.95]["share"] == pytest.approx(0.2)


def test_the_temperature_travels_in_the_checkpoint_and_a_damaged_one_is_refused(tmp_path):
    model = build_model("resnet18", 3, "none")
    record = Checkpoint("resnet18", ["a", "b", "c"], Preprocessing(32),
                        {"head": "linear", "head_hidden": 8, "head_dropout": 0.0},
                        calibration=Calibration(temperature=1.7, fitted_on="validation", images=40, reason=""))
    save_checkpoint(tmp_path / "model.pt", model, record)
    _, loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.calibration == record.calibration
    assert loaded.calibration.describe() == "temperature 1.7, fitted on 40 validation images"

    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    payload["calibration"]["temperature"] = -1.0
    torch.save(payload, tmp_path / "damaged.pt")
    with pytest.raises(StageError, match="damaged.*not a positive number"):
        load_checkpoint(tmp_path / "damaged.pt")
    del payload["calibration"]  # a model saved before calibration existed: uncalibrated, and says so
    torch.save(payload, tmp_path / "older.pt")
    assert "not calibrated" in load_checkpoint(tmp_path / "older.pt")[1].calibration.describe()


def test_the_calibrated_module_divides_the_logits_by_the_temperature():
    model = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    assert torch.allclose(Calibrated(model, 2.0)(x), model(x) / 2.0)


def test_predict_applies_the_temperature_and_answers_unknown_below_min_confidence(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = build_model("resnet18", 3, "none")
    head = {"head": "linear", "head_hidden": 8, "head_dropout": 0.0}
    for name, temperature in (("hot.pt", 50.0), ("cold.pt", 0.05)):
        save_checkpoint(tmp_path / name, model, Checkpoint(
            "resnet18", ["a", "b", "c"], Preprocessing(32), head,
            calibration=Calibration(temperature=temperature, fitted_on="validation", images=9, reason="")))
    from PIL import Image
    Image.new("RGB", (60, 40), (200, 30, 30)).save(tmp_path / "photo.jpg")

    # a huge temperature flattens every answer to about 1/3: below 0.5, "unknown"; a tiny one makes it certain
    assert predict.main(["photo.jpg", "--model", "hot.pt", "--min-confidence", "0.5", "--out", "hot"]) == 0
    assert "1 answered unknown (top probability below --min-confidence 0.5)" in capsys.readouterr().out
    hot = json.loads((tmp_path / "hot.json").read_text())
    (row,) = hot["images"]
    assert row["answer"] == "unknown" and row["top"][0]["probability"] < 0.4
    assert hot["calibration"]["temperature"] == 50.0 and hot["min_confidence"] == 0.5
    assert (tmp_path / "hot.csv").read_text().splitlines()[1].split(",")[4] == "unknown"

    assert predict.main(["photo.jpg", "--model", "cold.pt", "--min-confidence", "0.5", "--out", "cold"]) == 0
    (row,) = json.loads((tmp_path / "cold.json").read_text())["images"]
    assert row["answer"] == row["top"][0]["class_name"] and row["top"][0]["probability"] > 0.5


@pytest.mark.parametrize("value", ["1.5", "-0.1", "half"])
def test_a_min_confidence_outside_0_to_1_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        predict.parse_args(["photo.jpg", "--min-confidence", value])
    assert "--min-confidence" in capsys.readouterr().err

