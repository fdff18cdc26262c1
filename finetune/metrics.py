"""Accuracy figures of a set of predictions: top-k, the confusion matrix, per-class accuracy, the most-confused
pairs, test-time augmentation, and the tables `evaluate` prints.
"""

from __future__ import annotations

import torch

from finetune.data import ImageSplit, make_loader
from finetune.runtime import predict_logits
from finetune.transforms import TTA_CROP_FRACTIONS, Preprocessing, eval_transform

TABLE_ROWS = 10


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, probs.shape[1])
    return (probs.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted]."""
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Recall of each class; NaN for a class with no test image."""
    totals = confusion.sum(dim=1)
    return torch.where(totals > 0, confusion.diag() / totals.clamp(min=1), torch.tensor(float("nan")))


def most_confused(confusion: torch.Tensor, k: int) -> list[tuple[int, int, int]]:
    """The k largest off-diagonal counts as (true, predicted, count), largest first, ties by class ids."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    order = sorted(range(len(flat)), key=lambda i: (-int(flat[i]), i))[:k]
    n = confusion.shape[0]
    return [(i // n, i % n, int(flat[i])) for i in order if flat[i] > 0]


def summarize(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    confusion = confusion_matrix(probs.argmax(1), labels, probs.shape[1])
    return {
        "top1": round(topk_accuracy(probs, labels, 1), 5),
        "top5": round(topk_accuracy(probs, labels, 5), 5),
        "mean_class_accuracy": round(per_class_accuracy(confusion).nanmean().item(), 5),
    }


def tta_probs(model, split, preprocessing: Preprocessing, batch_size: int, workers: int, device, precision,
              plain_probs: torch.Tensor) -> torch.Tensor:
    """Softmax averaged over 3 scales x 2 horizontal flips. plain_probs: the plain evaluation's, which is the
    member at the model's own crop fraction without a flip (not computed twice: on a CPU each pass of the
    Stanford Cars test split takes minutes)."""
    total = torch.zeros_like(plain_probs)
    for fraction in TTA_CROP_FRACTIONS:
        loader = make_loader(ImageSplit(split, eval_transform(preprocessing, fraction)), batch_size, workers)
        for flip in (False, True):
            if fraction == preprocessing.crop_fraction and not flip:
                total += plain_probs
                continue
            logits, _ = predict_logits(model, loader, device, precision, True, preprocessing, flip=flip,
                                       desc=f"tta {fraction:.3f}{' flip' if flip else ''}")
            total += logits.softmax(1)
    return total / (2 * len(TTA_CROP_FRACTIONS))


def class_rows(confusion: torch.Tensor, names: list[str]) -> list[dict]:
    """One row per class with test images, worst first (a class without any has no accuracy to rank)."""
    accuracy = per_class_accuracy(confusion)
    rows = [{"class_id": i, "class_name": name, "accuracy": round(accuracy[i].item(), 4),
             "images": int(confusion[i].sum())} for i, name in enumerate(names) if confusion[i].sum() > 0]
    return sorted(rows, key=lambda r: (r["accuracy"], r["class_id"]))


def shown_rows(classes: int) -> int:
    """Rows of the worst and the best tables: every class in one table when there are at most TABLE_ROWS, else
    at most half each, so that no class is both among the worst and among the best."""
    return classes if classes <= TABLE_ROWS else min(TABLE_ROWS, classes // 2)


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)))
