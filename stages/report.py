"""Stage `report`: the run at a glance, with no browser and no internet.

plots/report/report.md               headline metrics, worst classes, most-confused pairs, the figures below
plots/report/curves.png              loss, accuracy and learning rate per epoch (DVCLive's metrics/train)
plots/report/per_class_accuracy.png  every class, sorted, one readable row each (196 rows for Stanford Cars)
plots/report/confusion.png           the row-normalised confusion matrix, the most-confused block outlined
plots/report/confusion_zoom.png      that block with counts and full class names
plots/report/reliability.png         accuracy against confidence, before and after the calibration temperature
`dvc plots show/diff` still reads the CSV/TSV data through dvc.yaml's `plots:`, to overlay experiments.
"""

from __future__ import annotations

import numpy as np

from finetune.errors import run_stage
from finetune.files import atomic_dir, read_csv, read_json
from finetune.params import load_params
from finetune.paths import (
    CONFUSION_JSON,
    DATA_METRICS,
    EVAL_METRICS,
    EVAL_REPORT,
    GRADCAM_DIR,
    LIVE_CURVES,
    LIVE_DIR,
    PER_CLASS_CSV,
    PREDICTIONS_CSV,
    PROBE_METRICS,
    PROBE_PREDICTIONS,
    PROBE_REPORT,
    REPORT_DIR,
)
from finetune.run_report import (
    ZOOM_SIZE,
    ProbeComparison,
    RunResults,
    TestScores,
    imbalance_warning,
    most_confused_block,
    plot_confusion,
    plot_confusion_zoom,
    plot_curves,
    plot_per_class,
    plot_reliability,
    probe_verdict,
    read_curves,
    write_markdown,
)


def main() -> None:
    params = load_params(look_up_models=False)
    per_class = read_csv(PER_CLASS_CSV)
    test = TestScores.from_predictions(read_csv(PREDICTIONS_CSV))
    probe = ProbeComparison.of(read_json(PROBE_REPORT, "probe"), read_json(PROBE_METRICS, "probe"), test,
                               read_csv(PROBE_PREDICTIONS))
    results = RunResults(read_json(EVAL_METRICS, "evaluate"), read_json(EVAL_REPORT, "evaluate"),
                         read_json(LIVE_DIR / "metrics.json", "train"), read_json(DATA_METRICS, "prepare"), test, probe)
    confusion_record = read_json(CONFUSION_JSON, "evaluate")
    names, confusion = confusion_record["class_names"], np.array(confusion_record["counts"], dtype=np.int64)
    block = (most_confused_block(confusion, ZOOM_SIZE), min(ZOOM_SIZE, len(names)))
    gradcam = sorted(p.name for p in GRADCAM_DIR.glob("*.png"))

    with atomic_dir(REPORT_DIR) as out:
        out.mkdir(parents=True)
        plot_curves(read_curves(LIVE_CURVES), results.train_summary.get("kept_epoch"), out / "curves.png")
        plot_per_class(per_class, out / "per_class_accuracy.png")
        if block[1] == len(names):  # a few classes: the matrix with counts is the whole figure, not a repeat
            plot_confusion_zoom(confusion, names, block, out / "confusion.png")
        else:
            plot_confusion(confusion, names, block, out / "confusion.png")
            plot_confusion_zoom(confusion, names, block, out / "confusion_zoom.png")
        plot_reliability(results.test, results.calibration, out / "reliability.png")
        imbalance = imbalance_warning(results.data, confusion, names)
        write_markdown(out / "report.md", params, results, block, names, gradcam, imbalance)
    print(f"report: wrote {REPORT_DIR}/report.md with curves.png, per_class_accuracy.png, confusion.png"
          + (", confusion_zoom.png" if block[1] < len(names) else "") + ", reliability.png")
    verdict = probe_verdict(probe, results.eval_metrics["top1"], results.train_summary.get("wise_ft"))
    print(f"report: {verdict.replace('**', '')}")
    if imbalance:
        print(f"report: {imbalance.replace('**', '')}")


if __name__ == "__main__":
    run_stage(main)
