"""Stage `evaluate`: the kept model on the test split, as the seeds' eval.py reported it (the seeds: the
project's source documents, whose eval script printed these tables).

metrics/eval.json      the headline `dvc exp show` lists: top-1, top-5, mean per-class accuracy, the kept epoch
                       (and the three accuracies under TTA)
metrics/eval_report.json  test image counts, the 10 worst and best classes and the 10 most-confused pairs, by name
plots/per_class_accuracy.csv, plots/confused_pairs.csv, plots/predictions.csv  for `dvc plots`
plots/confusion.json   the class names in model order and the confusion counts, for `report`
The model and its input transform come from the checkpoint; batch size, precision and workers from evaluate.*.
"""

from __future__ import annotations

import torch

from stages.checkpoint import load_checkpoint
from stages.data import ImageSplit, class_names, make_loader, open_split, resolve_workers
from stages.errors import StageError, run_stage
from stages.files import write_csv, write_json
from stages.params import load_params
from stages.paths import (
    CONFUSED_CSV,
    CONFUSION_JSON,
    EVAL_METRICS,
    EVAL_REPORT,
    MODEL_PATH,
    PER_CLASS_CSV,
    PREDICTIONS_CSV,
)
from stages.runtime import Precision, pick_device, predict_logits, resolve_eval_batch
from stages.transforms import TTA_CROP_FRACTIONS, Preprocessing, eval_transform

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


def main() -> None:
    e = load_params().evaluate
    device = pick_device()
    model, checkpoint = load_checkpoint(MODEL_PATH, device)
    test = open_split("test")
    names = checkpoint.class_names
    if class_names(test) != names:
        raise StageError("the test split's classes differ from the model's; re-run `dvc repro` from prepare")
    # NHWC: faster convolutions on GPUs and on the CPU (stages/runtime.py); no effect on the results
    model = model.to(memory_format=torch.channels_last)
    precision = Precision(e.amp, device)
    workers = resolve_workers(e.num_workers)
    batch_size = resolve_eval_batch(e.batch_size, device)
    preprocessing = checkpoint.preprocessing

    loader = make_loader(ImageSplit(test, eval_transform(preprocessing)), batch_size, workers)
    logits, labels = predict_logits(model, loader, device, precision, True, preprocessing, desc="test")
    probs = logits.softmax(1)
    metrics = {**summarize(probs, labels), "kept_epoch": checkpoint.epoch}
    if e.tta:
        metrics["tta"] = summarize(tta_probs(model, test, preprocessing, batch_size, workers, device, precision,
                                             probs), labels)

    predicted = probs.argmax(1)
    confusion = confusion_matrix(predicted, labels, len(names))
    per_class = class_rows(confusion, names)
    confused = [{"true": names[t], "predicted": names[p], "count": c}
                for t, p, c in most_confused(confusion, TABLE_ROWS)]
    ids = test["id"]
    predictions = [{"id": ids[i], "actual": names[labels[i]], "predicted": names[predicted[i]],
                    "confidence": round(probs[i, predicted[i]].item(), 4)} for i in range(len(labels))]

    write_json(EVAL_METRICS, metrics)
    shown = shown_rows(len(per_class))
    write_json(EVAL_REPORT, {
        "test_images": len(labels),
        "classes_without_test_images": len(names) - len(per_class),
        "worst_classes": per_class[:shown],
        "best_classes": per_class[::-1][:shown] if shown < len(per_class) else [],
        "most_confused": confused,
    })
    write_csv(PER_CLASS_CSV, per_class, ["class_id", "class_name", "accuracy", "images"])
    write_csv(CONFUSED_CSV, confused, ["true", "predicted", "count"])
    write_csv(PREDICTIONS_CSV, predictions, ["id", "actual", "predicted", "confidence"])
    write_json(CONFUSION_JSON, {"class_names": names, "counts": confusion.tolist()})

    tta = metrics.get("tta")
    print(f"\ntest: top-1 {metrics['top1']:.2%}  top-5 {metrics['top5']:.2%}  "
          f"mean per-class {metrics['mean_class_accuracy']:.2%}  ({len(labels)} images, {precision.name})"
          + (f"\nTTA (3 scales x 2 flips): top-1 {tta['top1']:.2%}  top-5 {tta['top5']:.2%}" if tta else ""))
    if shown == len(per_class):  # a few classes: one table, not the same classes twice
        print_table(f"all {len(per_class)} classes, worst first", per_class, ["class_name", "accuracy", "images"])
    else:
        print_table(f"{shown} worst classes", per_class[:shown], ["class_name", "accuracy", "images"])
        print_table(f"{shown} best classes", per_class[::-1][:shown], ["class_name", "accuracy", "images"])
    print_table(f"{len(confused)} most-confused pairs", confused, ["true", "predicted", "count"])


if __name__ == "__main__":
    run_stage(main)
