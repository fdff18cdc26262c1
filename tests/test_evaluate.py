"""The numbers evaluate reports, on inputs whose answers are known."""

from __future__ import annotations

import math

import torch

from stages.evaluate import class_rows, confusion_matrix, most_confused, per_class_accuracy, summarize, topk_accuracy


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
