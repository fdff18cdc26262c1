"""The numbers evaluate reports, on inputs whose answers are known."""

from __future__ import annotations

import math

import torch

from finetune import metrics as evaluate
from finetune.metrics import (
    class_rows,
    confusion_matrix,
    most_confused,
    per_class_accuracy,
    summarize,
    topk_accuracy,
    tta_probs,
)


def one_hot_probs(predicted: list[int], classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), classes).float()


def test_topk_accuracy():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert math.isclose(topk_accuracy(probs, labels, 1), 1 / 3, rel_tol=1e-6)
    assert math.isclose(topk_accuracy(probs, labels, 2), 2 / 3, rel_tol=1e-6)
    assert topk_accuracy(probs, labels, 5) == 1.0  # k larger than the class count means all


def test_confusion_and_per_class_accuracy():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 1, 0])
    confusion = confusion_matrix(predicted, labels, 4)
    assert confusion[0].tolist() == [1, 2, 0, 0] and confusion[2].tolist() == [1, 0, 0, 0]
    accuracy = per_class_accuracy(confusion)
    assert torch.allclose(accuracy[:3], torch.tensor([1 / 3, 1.0, 0.0])) and math.isnan(accuracy[3])


def test_most_confused_pairs_are_off_diagonal_largest_first():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    predicted = torch.tensor([1, 1, 0, 1, 1, 0, 1, 2])
    pairs = most_confused(confusion_matrix(predicted, labels, 3), 10)
    assert pairs == [(0, 1, 2), (2, 0, 1), (2, 1, 1)]


def test_summary_mean_class_accuracy_ignores_classes_without_images():
    labels = torch.tensor([0, 0, 0, 0, 1])
    summary = summarize(one_hot_probs([0, 0, 0, 0, 0], 3), labels)
    assert summary["top1"] == 0.8 and summary["mean_class_accuracy"] == 0.5


def test_class_rows_are_named_and_sorted_worst_first():
    labels = torch.tensor([0, 0, 1, 1])
    rows = class_rows(confusion_matrix(torch.tensor([0, 0, 0, 1]), labels, 3), ["Audi", "BMW", "Tesla"])
    assert [r["class_name"] for r in rows] == ["BMW", "Audi"]  # Tesla has no test image: not ranked
    assert rows[0] == {"class_id": 1, "class_name": "BMW", "accuracy": 0.5, "images": 2}


def test_tta_reuses_the_plain_pass_and_averages_the_six_views(monkeypatch):
    """The plain evaluation is the TTA member at the model's crop fraction without a flip: it is passed in, not
    computed again, and the average still has six members."""
    from finetune.transforms import TTA_CROP_FRACTIONS, Preprocessing

    passes = []

    def fake_predict(model, loader, device, precision, channels_last, preprocessing, flip=False, desc=""):
        passes.append(desc)
        fraction = TTA_CROP_FRACTIONS.index(loader.dataset.transform.fraction)
        return torch.full((2, 3), float(fraction + 2 * flip)), torch.zeros(2, dtype=torch.long)

    class Tagged:
        def __init__(self, fraction):
            self.fraction = fraction

    monkeypatch.setattr(evaluate, "predict_logits", fake_predict)
    monkeypatch.setattr(evaluate, "eval_transform", lambda preprocessing, fraction: Tagged(fraction))
    plain = torch.full((2, 3), 1 / 3)
    probs = tta_probs(None, [0, 1], Preprocessing(32), 2, 0, "cpu", None, plain)
    assert len(passes) == 5 and "tta 0.875" not in passes and "tta 0.875 flip" in passes
    assert torch.allclose(probs, torch.full((2, 3), 1 / 3)) and torch.allclose(probs.sum(1), torch.ones(2))


def test_worst_and_best_tables_never_show_a_class_twice():
    from finetune.metrics import shown_rows

    assert shown_rows(6) == 6 and shown_rows(10) == 10  # one table of all of them
    assert shown_rows(15) == 7 and shown_rows(196) == 10
