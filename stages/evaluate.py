"""Stage `evaluate`: the kept model on the test split, as the seeds' eval.py reported it (the seeds: the
project's source documents, whose eval script printed these tables).

metrics/eval.json      the headline `dvc exp show` lists: top-1, top-5, mean per-class accuracy, the kept epoch,
                       the expected calibration error of the confidences predict prints (the checkpoint's
                       temperature applied) (and the three accuracies under TTA)
metrics/eval_report.json  test image counts, the checkpoint's calibration and the raw softmax's calibration error,
                       the 10 worst and best classes and the 10 most-confused pairs, by name
plots/per_class_accuracy.csv, plots/confused_pairs.csv, plots/predictions.csv  for `dvc plots`
                       (predictions.csv: each image's calibrated and raw top confidence, for the reliability diagram)
plots/confusion.json   the class names in model order and the confusion counts, for `report`
The model and its input transform come from the checkpoint; batch size, precision and workers from evaluate.*.
"""

from __future__ import annotations

import torch

from finetune.calibration import expected_calibration_error
from finetune.checkpoint import load_checkpoint
from finetune.data import ImageSplit, class_names, make_loader, open_split, resolve_workers
from finetune.errors import StageError, run_stage
from finetune.files import write_csv, write_json
from finetune.metrics import (
    TABLE_ROWS,
    class_rows,
    confusion_matrix,
    most_confused,
    print_table,
    shown_rows,
    summarize,
    tta_probs,
)
from finetune.params import load_params
from finetune.paths import (
    CONFUSED_CSV,
    CONFUSION_JSON,
    EVAL_METRICS,
    EVAL_REPORT,
    MODEL_PATH,
    PER_CLASS_CSV,
    PREDICTIONS_CSV,
)
from finetune.runtime import Precision, keep_freed_memory, pick_device, predict_logits, resolve_eval_batch
from finetune.transforms import eval_transform


def main() -> None:
    e = load_params().evaluate
    keep_freed_memory()
    device = pick_device()
    model, checkpoint = load_checkpoint(MODEL_PATH, device)
    test = open_split("test")
    names = checkpoint.class_names
    if class_names(test) != names:
        raise StageError("the test split's classes differ from the model's; re-run `dvc repro` from prepare")
    # NHWC: faster convolutions on GPUs and on the CPU (finetune/runtime.py); no effect on the results
    model = model.to(memory_format=torch.channels_last)
    precision = Precision(e.amp, device)
    workers = resolve_workers(e.num_workers)
    batch_size = resolve_eval_batch(e.batch_size, device)
    preprocessing = checkpoint.preprocessing

    loader = make_loader(ImageSplit(test, eval_transform(preprocessing)), batch_size, workers)
    logits, labels = predict_logits(model, loader, device, precision, True, preprocessing, desc="test")
    probs, confidence, raw_confidence, calibration = calibrated(logits, labels, checkpoint)
    predicted = probs.argmax(1)
    metrics = {**summarize(probs, labels), "kept_epoch": checkpoint.epoch,
               "calibration_error": calibration.pop("calibration_error")}
    if e.tta:
        metrics["tta"] = summarize(tta_probs(model, test, preprocessing, batch_size, workers, device, precision,
                                             probs), labels)

    confusion = confusion_matrix(predicted, labels, len(names))
    per_class = class_rows(confusion, names)
    confused = [{"true": names[t], "predicted": names[p], "count": c}
                for t, p, c in most_confused(confusion, TABLE_ROWS)]
    ids = test["id"]
    predictions = [{"id": ids[i], "actual": names[labels[i]], "predicted": names[predicted[i]],
                    "confidence": round(float(confidence[i]), 4),
                    "uncalibrated_confidence": round(float(raw_confidence[i]), 4)} for i in range(len(labels))]

    write_json(EVAL_METRICS, metrics)
    write_json(EVAL_REPORT, eval_report(len(labels), calibration, names, per_class, confused))
    write_csv(PER_CLASS_CSV, per_class, ["class_id", "class_name", "accuracy", "images"])
    write_csv(CONFUSED_CSV, confused, ["true", "predicted", "count"])
    write_csv(PREDICTIONS_CSV, predictions, ["id", "actual", "predicted", "confidence", "uncalibrated_confidence"])
    write_json(CONFUSION_JSON, {"class_names": names, "counts": confusion.tolist()})

    print_summary(metrics, calibration, checkpoint, len(labels), precision.name, per_class, confused)


def eval_report(images: int, calibration: dict, names: list[str], per_class: list[dict], confused: list[dict]) -> dict:
    shown = shown_rows(len(per_class))
    return {
        "test_images": images,
        "calibration": calibration,
        "classes_without_test_images": len(names) - len(per_class),
        "worst_classes": per_class[:shown],
        "best_classes": per_class[::-1][:shown] if shown < len(per_class) else [],
        "most_confused": confused,
    }


def calibrated(logits: torch.Tensor, labels: torch.Tensor, checkpoint):
    """(probabilities with the checkpoint's temperature, their top confidence, the raw softmax's, the calibration
    record with both expected calibration errors). The temperature keeps every argmax: only confidences change."""
    raw_probs = logits.softmax(1)
    probs = (logits / checkpoint.calibration.temperature).softmax(1)
    correct = (probs.argmax(1) == labels).numpy()
    confidence, raw_confidence = probs.max(1).values.numpy(), raw_probs.max(1).values.numpy()
    return probs, confidence, raw_confidence, {
        **checkpoint.calibration.to_dict(),
        "calibration_error": round(expected_calibration_error(confidence, correct), 4),
        "calibration_error_uncalibrated": round(expected_calibration_error(raw_confidence, correct), 4)}


def print_summary(metrics: dict, calibration: dict, checkpoint, images: int, precision: str, per_class: list[dict],
                  confused: list[dict]) -> None:
    """The seeds' eval.py printout: the headline, then the worst and best classes and the most-confused pairs."""
    names, shown = checkpoint.class_names, shown_rows(len(per_class))
    tta = metrics.get("tta")
    print(f"\ntest: top-1 {metrics['top1']:.2%}  " + (f"top-5 {metrics['top5']:.2%}  " if len(names) > 10 else "")
          + f"mean per-class {metrics['mean_class_accuracy']:.2%}  ({images} images, {precision})"
          + f"\nexpected calibration error {metrics['calibration_error']:.3f} "
          f"({checkpoint.calibration.describe()}; uncalibrated {calibration['calibration_error_uncalibrated']:.3f})"
          + (f"\nTTA (3 scales x 2 flips): top-1 {tta['top1']:.2%}  top-5 {tta['top5']:.2%}" if tta else ""))
    if shown == len(per_class):  # a few classes: one table, not the same classes twice
        print_table(f"all {len(per_class)} classes, worst first", per_class, ["class_name", "accuracy", "images"])
    else:
        print_table(f"{shown} worst classes", per_class[:shown], ["class_name", "accuracy", "images"])
        print_table(f"{shown} best classes", per_class[::-1][:shown], ["class_name", "accuracy", "images"])
    print_table(f"{len(confused)} most-confused pairs", confused, ["true", "predicted", "count"])


if __name__ == "__main__":
    run_stage(main)
