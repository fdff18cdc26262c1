"""The report a person reads offline: training curves, per-class accuracy, the confusion matrix (whole and its
most-confused block), and the Markdown page around them.
"""

from __future__ import annotations

import csv
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from finetune.calibration import BINS, Calibration, coverage_table, expected_calibration_error, reliability_bins
from finetune.lineage import changed_params, changes_line, committed_params, shown_path
from finetune.markdown import markdown_table, markdown_text
from finetune.params import Params
from finetune.paths import DUPLICATES_LIST
from finetune.stats import (
    Paired,
    bootstrap_mean_class_interval,
    correct_by_id,
    images_for_significance,
    paired,
    points,
    wilson_interval,
)

ZOOM_SIZE = 16  # classes in the zoomed block: counts and names stay legible
FEW_CLASSES = 10  # at most this many: no top-5 shown
DPI = 100


def read_curve(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of one DVCLive TSV; its step is the epoch (train counts them from 1)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    name = [c for c in rows[0] if c not in ("step", "timestamp")][0] if rows else None
    return (np.array([int(r["step"]) for r in rows]), np.array([float(r[name]) for r in rows]))


def read_curves(curves_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every logged metric by its DVCLive name (train/loss, validation/acc, lr, ...)."""
    return {str(p.relative_to(curves_dir).with_suffix("")): read_curve(p) for p in sorted(curves_dir.rglob("*.tsv"))}


def plot_curves(curves: dict, kept_epoch: int | None, path: Path) -> None:
    panels = [("loss", ["train/loss", "validation/loss"]), ("accuracy", ["train/acc", "validation/acc"]),
              ("learning rate", ["lr", "lr_head"])]
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            if name in curves:
                epochs, values = curves[name]
                ax.plot(epochs, values, marker="o" if len(epochs) <= 30 else None, markersize=3,
                        label=name.replace("lr_head", "lr (head)").replace("lr", "lr (backbone)", 1)
                        if title == "learning rate" else name.split("/")[0])
        if title == "accuracy":
            ax.set_ylim(0, 1.02)
        elif wide_positive_range([curves[n][1] for n in names if n in curves]):
            ax.set_yscale("log")  # step schedules and early validation losses span decades
        if kept_epoch:
            ax.axvline(kept_epoch, color="grey", linestyle=":", label=f"kept (epoch {kept_epoch})")
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path)


def wide_positive_range(series: list[np.ndarray]) -> bool:
    values = np.concatenate(series) if series else np.array([])
    return values.size > 0 and values.min() > 0 and values.max() / values.min() >= 10


def plot_per_class(rows: list[dict], path: Path) -> None:
    """Horizontal bars, worst class at the top; tall enough for one legible label per class."""
    rows = sorted(rows, key=lambda r: (float(r["accuracy"]), int(r["class_id"])))
    accuracy = np.array([float(r["accuracy"]) for r in rows])
    labels = [f"{r['class_name']}  ({r['images']})" for r in rows]
    fig = Figure(figsize=(9, 1.6 + 0.16 * len(rows)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    ax.barh(y, accuracy, color=colormaps["RdYlGn"](accuracy), height=0.8)
    ax.axvline(accuracy.mean(), color="black", linestyle="--", linewidth=1)
    ax.set_yticks(y, labels, fontsize=7, parse_math=False)  # class names are literal text, `$` included
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.xaxis.set_ticks_position("both")
    ax.tick_params(axis="x", labeltop=True)
    ax.set_xlabel("test accuracy (images of the class classified as it)")
    # The mean goes in the title, not a legend: a legend box would cover the best classes' bars.
    ax.set_title(f"Per-class test accuracy, {len(rows)} classes, worst first (test images in brackets)\n"
                 f"dashed line: mean per-class accuracy {accuracy.mean():.1%}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    save(fig, path)


def most_confused_block(confusion: np.ndarray, size: int) -> int:
    """Start of the `size` consecutive classes whose mutual mistakes are most numerous (first on ties).

    Consecutive in class order, so the block is a square on the diagonal of the full heatmap; sorted
    class names (Stanford Cars) put a make's models side by side, where most mistakes are."""
    n = len(confusion)
    size = min(size, n)
    off = confusion - np.diag(np.diag(confusion))
    scores = [off[s:s + size, s:s + size].sum() for s in range(n - size + 1)]
    return int(np.argmax(scores))


def row_normalised(confusion: np.ndarray) -> np.ndarray:
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)


def plot_confusion(confusion: np.ndarray, names: list[str], block: tuple[int, int], path: Path) -> None:
    n = len(names)
    side = min(24, max(6, 0.11 * n + 3))
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    # gamma < 1 lifts the rare off-diagonal mistakes out of the background next to the bright diagonal.
    image = ax.imshow(row_normalised(confusion), cmap="viridis", norm=PowerNorm(0.4, 0, 1), interpolation="nearest")
    row_points = side * 72 * 0.8 / max(n, 1)  # the matrix takes ~80% of the figure's height
    fontsize = max(3.0, min(9.0, 0.8 * row_points))
    ticks = np.arange(n)
    ax.set_xticks(ticks, [short(name) for name in names], rotation=90, fontsize=fontsize, parse_math=False)
    ax.set_yticks(ticks, [short(name) for name in names], fontsize=fontsize, parse_math=False)
    start, size = block
    if size < n:  # a white-edged red square: visible on the dark background and on the bright diagonal
        for colour, width in (("white", 4), ("red", 2)):
            ax.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False, edgecolor=colour,
                                   linewidth=width))
        zoom = f"red square: the {size}-class block shown with counts in confusion_zoom.png"
    else:
        zoom = "confusion_zoom.png shows it with counts"
    ax.set(xlabel="predicted class", ylabel="true class")
    title = f"Confusion matrix (test), rows normalised; {zoom}"
    ax.set_title("\n".join(textwrap.wrap(title, int(side * 9))), fontsize=11)  # ~9 characters an inch at 11 pt
    fig.colorbar(image, ax=ax, shrink=0.6, label="share of the true class's test images")
    save(fig, path)


def plot_confusion_zoom(confusion: np.ndarray, names: list[str], block: tuple[int, int], path: Path) -> None:
    """The block with counts and full names; for a run of at most ZOOM_SIZE classes, the whole matrix."""
    start, size = block
    counts = confusion[start:start + size, start:start + size]
    fig = Figure(figsize=(4 + 0.6 * size, 3 + 0.55 * size), layout="constrained")
    ax = fig.subplots()
    ax.imshow(row_normalised(confusion)[start:start + size, start:start + size], cmap="viridis",
              norm=PowerNorm(0.4, 0, 1))
    for (i, j), count in np.ndenumerate(counts):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="black" if i == j else "white", fontweight="normal" if i == j else "bold")
    labels = ["\n".join(textwrap.wrap(name, 28)) for name in names[start:start + size]]
    ax.set_xticks(range(size), labels, rotation=90, fontsize=8, parse_math=False)
    ax.set_yticks(range(size), labels, fontsize=8, parse_math=False)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title("Confusion matrix (test image counts), rows normalised" if size == len(names) else
                 f"Most-confused block: classes {start}-{start + size - 1} (test image counts)", fontsize=11)
    save(fig, path)


def short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, format="png")


@dataclass(frozen=True)
class TestScores:
    """The test split's per-image results, for intervals and paired comparisons."""

    images: int
    top1_correct: int
    mean_class_interval: tuple[float, float]  # 95%, bootstrap
    correct_by_id: dict[str, bool]
    correct: np.ndarray  # per image, in predictions.csv's order
    confidence: np.ndarray  # the top probability predict prints (calibrated when the model is)
    uncalibrated_confidence: np.ndarray  # the raw softmax's

    @classmethod
    def from_predictions(cls, predictions: list[dict]) -> TestScores:
        actual, predicted = [r["actual"] for r in predictions], [r["predicted"] for r in predictions]
        by_id = correct_by_id(predictions)
        return cls(len(predictions), sum(by_id.values()), bootstrap_mean_class_interval(actual, predicted), by_id,
                   np.array([a == b for a, b in zip(actual, predicted)], dtype=bool),
                   np.array([float(r["confidence"]) for r in predictions]),
                   np.array([float(r.get("uncalibrated_confidence", r["confidence"])) for r in predictions]))


@dataclass(frozen=True)
class ProbeComparison:
    """The fine-tune against the linear probe of the same weights on the same test images (or why there is none)."""

    reason: str = ""  # why there is no probe
    top1: float = 0.0
    mean_class_accuracy: float = 0.0
    regularization: float = 0.0
    pair: Paired | None = None  # first: the fine-tune, second: the probe

    @classmethod
    def of(cls, probe_report: dict, probe_metrics: dict, test: TestScores,
           probe_predictions: list[dict]) -> ProbeComparison:
        if not probe_report.get("probe"):
            return cls(reason=probe_report.get("reason", "the probe stage wrote none"))
        probe_correct = correct_by_id(probe_predictions)
        ids = [i for i in test.correct_by_id if i in probe_correct]
        return cls(top1=probe_metrics["probe_top1"], mean_class_accuracy=probe_metrics["probe_mean_class_accuracy"],
                   regularization=probe_report["regularization"],
                   pair=paired([test.correct_by_id[i] for i in ids], [probe_correct[i] for i in ids]))


def plot_reliability(test: TestScores, calibration: Calibration, path: Path) -> None:
    """Guo et al.'s reliability diagram: accuracy against confidence per bin, the raw softmax beside the
    temperature-scaled one (one panel when the model is not calibrated). On the diagonal: calibrated; below it:
    over-confident; above it: under-confident. Bar labels: images per bin."""
    panels = [("raw softmax", test.uncalibrated_confidence)]
    if calibration.fitted:
        panels.append((f"temperature {calibration.temperature:.3g}", test.confidence))
    fig = Figure(figsize=(5.2 * len(panels), 5), layout="constrained")
    for ax, (title, confidence) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
        bins = reliability_bins(confidence, test.correct)
        width = 1 / BINS
        ax.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
               edgecolor="black", color="tab:blue", label="accuracy in the bin")
        ax.bar([b["low"] for b in bins], [b["confidence"] - b["accuracy"] for b in bins],
               bottom=[b["accuracy"] for b in bins], width=width, align="edge", facecolor="none",
               edgecolor="tab:red", hatch="//", label="gap to the bin's mean confidence")
        for b in bins:
            ax.annotate(f"{b['images']}", (b["low"] + width / 2, 0.02), ha="center", fontsize=7, color="white")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
        ece = expected_calibration_error(confidence, test.correct)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", ylabel="accuracy",
               title=f"{title}: expected calibration error {ece:.3f}\n({test.images:,} test images, {BINS} bins; "
                     f"images per bin at the bottom)")
        ax.title.set_fontsize(10)
        ax.legend(fontsize=8, loc="upper left")
    save(fig, path)


def calibration_section(results: RunResults) -> str:
    """ECE before and after the temperature, the reliability diagram, and what a minimum confidence costs."""
    test, calibration = results.test, results.calibration
    ece, raw = results.eval_metrics["calibration_error"], results.uncalibrated_error
    if calibration.fitted:
        summary = (f"Expected calibration error on the test split: **{raw:.3f} with the raw softmax, {ece:.3f} with "
                   f"the temperature** ({calibration.describe()}; predict, the exported model and `model.json` apply "
                   f"it).")
    else:
        summary = f"Expected calibration error on the test split: **{ece:.3f}**, {calibration.describe()}."
    rows = [{"threshold": f"{r['min_confidence']:g}", "answered": f"{r['answered']:,} ({r['share']:.1%})",
             "accuracy": "-" if r["answered"] == 0 else f"{r['accuracy']:.2%}", "errors": r["errors"]}
            for r in coverage_table(test.confidence, test.correct)]
    return ("## Confidence\n\n" + summary + " A perfectly calibrated model is right on 90% of the images it gives "
            "90% (Guo et al. 2017).\n\n![reliability diagram](reliability.png)\n\n"
            "What `python -m commands.predict --min-confidence P` costs on this test split: images below P are "
            "answered \"unknown\".\n\n"
            + markdown_table(rows, {"threshold": "min confidence P", "answered": "test images answered",
                                    "accuracy": "accuracy of the answered", "errors": "errors still answered"}))


def accuracy_with_interval(accuracy: float, correct: int, images: int) -> str:
    low, high = wilson_interval(correct, images)
    return f"{accuracy:.2%} (95% interval {low:.1%}-{high:.1%}; {images:,} test images)"


def probe_verdict(probe: ProbeComparison, top1: float, mix: dict | None = None) -> str:
    """One paragraph: did fine-tuning pay over the few-minute baseline, beyond the noise of the test split?
    mix: the train.wise_ft choice (metrics/train/metrics.json's `wise_ft`), when the run mixed its weights."""
    if mix is not None and mix["alpha"] == 0:
        return (f"**The saved model is the linear probe itself** ({top1:.2%} test top-1): `train.wise_ft` scored the "
                f"mixes of the fine-tuned weights with the start on the validation split and the start won "
                f"({mix_scores(mix)}), so fine-tuning added nothing measurable on this data; see docs/recipes.md, "
                f"\"When fine-tuning loses to the linear probe\".")
    if probe.pair is None:
        return f"**No linear-probe baseline:** {probe.reason}."
    pair, gain = probe.pair, top1 - probe.top1
    evidence = (f"{top1:.2%} against {probe.top1:.2%} on the same {pair.images:,} test images; the fine-tune alone "
                f"was right on {pair.only_first_right}, the probe alone on {pair.only_second_right}: exact McNemar "
                f"p = {pair.p_value:.2g}")
    if pair.beyond_noise and gain > 0:
        return (f"**Fine-tuning paid: {points(gain)} top-1 over a linear probe of the same frozen weights** "
                f"({evidence}).")
    if not pair.beyond_noise:
        needed = images_for_significance(pair)
        return (f"**Fine-tuning did not measurably beat a linear probe of the same frozen weights: {points(gain)} "
                f"top-1, within the noise of this test split** ({evidence}"
                + (f"; a difference like this one needs about {needed:,} test images to be told apart" if needed
                   else "") + "). The probe (`models/probe.pt`) costs one forward pass over the data.")
    return (f"**Fine-tuning lost to a linear probe of the same frozen weights: {points(gain)} top-1** ({evidence}). "
            f"The pretrained features already separate these classes, and this recipe distorted them. Try the "
            f"recommended recipe's square crops (`train.crop: resize_then_crop`), more epochs and a start from the "
            f"probe (`train.head_init: probe`; see docs/recipes.md, \"When fine-tuning loses to the linear probe\"), "
            f"letting validation choose a mix with the start (`train.wise_ft`), or use the probe itself "
            f"(`models/probe.pt`).")


def mix_scores(mix: dict) -> str:
    return "validation top-1 " + ", ".join(f"α {alpha} {accuracy:.2%}" for alpha, accuracy in
                                           mix["validation_acc"].items())


def headline(params: Params, results: RunResults) -> list[dict]:
    eval_metrics, train_summary, data = results.eval_metrics, results.train_summary, results.data
    test, probe, splits = results.test, results.probe, data["splits"]
    low, high = test.mean_class_interval
    rows = [
        {"what": "test top-1", "value": accuracy_with_interval(eval_metrics["top1"], test.top1_correct, test.images)},
        {"what": "test mean per-class accuracy",
         "value": f"{eval_metrics['mean_class_accuracy']:.2%} (95% interval {low:.1%}-{high:.1%}, bootstrap)"},
    ]
    if data["classes"] > FEW_CLASSES:  # with 10 classes or fewer, top-5 says little (5 of 6 is nearly always right)
        rows.insert(1, {"what": "test top-5", "value": eval_metrics["top5"]})
    rows.append({"what": f"expected calibration error (test, {BINS} bins)",
                 "value": f"{eval_metrics['calibration_error']:.3f}"
                 + (f" ({results.uncalibrated_error:.3f} before temperature scaling)"
                    if results.calibration.fitted else " (not calibrated: no temperature)")})
    if "tta" in eval_metrics:
        rows.append({"what": "test top-1 with TTA (3 scales x 2 flips)", "value": eval_metrics["tta"]["top1"]})
    if probe.pair is not None:
        rows.append({"what": "linear probe of the same weights (frozen features, logistic regression)",
                     "value": f"{probe.top1:.2%} top-1, {probe.mean_class_accuracy:.2%} mean per-class (C = "
                              f"{probe.regularization:g})"})
        rows.append({"what": "fine-tuning over the probe",
                     "value": f"{points(eval_metrics['top1'] - probe.top1)} top-1 ("
                              f"{'beyond' if probe.pair.beyond_noise else 'within'} noise: McNemar p = "
                              f"{probe.pair.p_value:.2g})"})
    else:
        rows.append({"what": "linear probe of the same weights", "value": f"none: {probe.reason}"})
    kept = train_summary.get("kept_epoch")
    rows += [
        {"what": "kept epoch", "value": f"{kept} of {params.train.epochs}"
         + (" (best validation accuracy)" if "validation" in splits else " (the last; no validation split)")},
        *([{"what": "weights mixed with the start (WiSE-FT)",
            "value": f"α {train_summary['wise_ft']['alpha']:g} kept ({mix_scores(train_summary['wise_ft'])})"}]
          if "wise_ft" in train_summary else []),
        {"what": "images (train / validation / test)",
         "value": " / ".join(str(splits[s]["images"]) if s in splits else "-"
                             for s in ("train", "validation", "test"))},
        {"what": "classes", "value": data["classes"]},
        {"what": "images dropped by prepare (unreadable)", "value": data["dropped"]},
    ]
    return rows + duplicate_rows(data)


def duplicate_rows(data: dict) -> list[dict]:
    """The repeated images prepare found (real Stanford Cars has 19 test images that are train images): only
    test copies of train images can lift the test score; copies elsewhere and photos under two labels are named
    for what they are."""
    test_images = data["splits"].get("test", {}).get("images", 0)
    lifting = data.get("test_copies_of_train", 0)
    other_copies = data.get("duplicates_across_splits", 0) - lifting
    conflicts = data.get("conflicting_labels", 0)
    rows = []
    if lifting:
        rows.append({"what": "test images that are train images (the same bytes: not held out)",
                     "value": f"{lifting} (listed in {DUPLICATES_LIST}; they lift the test score by at most "
                              f"{lifting / max(test_images, 1):.2%})"})
    if other_copies:
        rows.append({"what": "other images in two splits (validation copies of train, test copies of validation)",
                     "value": f"{other_copies} (listed in {DUPLICATES_LIST}; they do not lift the test score)"})
    if conflicts:
        rows.append({"what": "images under two labels (the same bytes in two classes)",
                     "value": f"{conflicts} (listed in {DUPLICATES_LIST}: labelled one way here and another there; "
                              "the model is taught and scored against both)"})
    return rows


def imbalance_warning(data: dict, confusion: np.ndarray, names: list[str]) -> str | None:
    """A line when the train classes are imbalanced (the largest 3x the smallest or more), naming the classes the
    model predicts well beyond their share of the test split (it learnt the imbalance), else None."""
    counts = data["splits"]["train"]["images_per_class"]
    if not counts["min"] or counts["max"] / counts["min"] < IMBALANCE_RATIO:
        return None
    truth, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    over = [(names[i], int(predicted[i]), int(truth[i])) for i in np.argsort(truth - predicted)
            if predicted[i] >= 1.5 * truth[i] + 2][:3]
    text = (f"**Imbalanced classes:** train images per class range from {counts['min']} to {counts['max']} "
            f"(mean {counts['mean']}); mean per-class accuracy weighs every class alike, top-1 does not.")
    if over:
        text += " Predicted far more often than they occur in the test split: " + ", ".join(
            f"{markdown_text(name)} ({p} predictions for {t} images)" for name, p, t in over) + "."
    return text


IMBALANCE_RATIO = 3


@dataclass(frozen=True)
class RunResults:
    """What the stages before `report` measured, as report reads it."""

    eval_metrics: dict  # metrics/eval.json
    eval_report: dict  # metrics/eval_report.json
    train_summary: dict  # DVCLive's metrics/train/metrics.json
    data: dict  # metrics/data.json
    test: TestScores
    probe: ProbeComparison

    @property
    def calibration(self) -> Calibration:
        record = dict(self.eval_report["calibration"])
        record.pop("calibration_error_uncalibrated")
        return Calibration.from_dict(record)

    @property
    def uncalibrated_error(self) -> float:
        return self.eval_report["calibration"]["calibration_error_uncalibrated"]


def changes_sentence(params: Params) -> str:
    """What this run changed from the last commit's params.yaml (an experiment's `-S` values, or edits)."""
    committed, why_not = committed_params()
    if committed is None:
        return f"Params: {why_not}."
    rows = changed_params(params.model_dump(), committed)
    if not rows:
        return "Params: the committed params.yaml, unchanged."
    return f"Params that differ from the last commit's params.yaml: {markdown_text(changes_line(rows, len(rows)))}."


def confusion_section(eval_report: dict, block: tuple[int, int], names: list[str]) -> str:
    start, size = block
    if size == len(names):
        figures = "\n\n![confusion matrix with counts](confusion.png)"
    else:
        figures = (f"\n\n![confusion matrix](confusion.png)\n\nThe outlined block, classes {start}-"
                   f"{start + size - 1} ({markdown_text(names[start])} … "
                   f"{markdown_text(names[start + size - 1])}):\n\n![most-confused block](confusion_zoom.png)")
    return ("## Confusion\n\nMost-confused pairs:\n\n"
            + markdown_table(eval_report["most_confused"], {"true": "true class", "predicted": "predicted as",
                                                            "count": "test images"}) + figures)


def write_markdown(path: Path, params: Params, results: RunResults, block: tuple[int, int], names: list[str],
                   gradcam: list[str], imbalance: str | None = None) -> None:
    m, t = params.model, params.train
    sections = [
        f"# Run report: {m.arch} ({markdown_text(shown_path(m.weights))}) on "
        f"{markdown_text(shown_path(str(params.data.source)))}, "
        f"{t.resolution} px, {t.epochs} epochs",
        "Written by `dvc repro` (stage `report`) from this run's metrics; `dvc metrics show` / "
        "`dvc exp show` hold the same numbers, `dvc plots diff` overlays runs. " + changes_sentence(params),
        probe_verdict(results.probe, results.eval_metrics["top1"], results.train_summary.get("wise_ft")),
        markdown_table(headline(params, results), {"what": "metric", "value": "value"})
        + (f"\n\n{imbalance}" if imbalance else ""),
        "## Training curves\n\n![loss, accuracy and learning rate per epoch](curves.png)",
        "## Per-class accuracy\n\nWorst classes:\n\n"
        + markdown_table(results.eval_report["worst_classes"], {"class_name": "class", "accuracy": "accuracy",
                                                                "images": "test images"})
        + "\n\n![per-class test accuracy, all classes, worst first](per_class_accuracy.png)",
        confusion_section(results.eval_report, block, names),
        calibration_section(results),
    ]
    if gradcam:
        sections.append("## GradCAM\n\n" + "\n\n".join(f"![{name}](../gradcam/{name})" for name in gradcam))
    path.write_text("\n\n".join(sections) + "\n")
