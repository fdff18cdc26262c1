"""The real thing: `dvc repro` and `dvc exp run` of this project in a fresh git repo, on generated data."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import yaml
from PIL import Image

from finetune.params import PROBE_C_GRID
from tests.conftest import make_project, run, tiny_params

pytestmark = pytest.mark.slow  # real stages, DVC runs or several processes

STAGES = ["check", "fetch", "prepare", "probe", "train", "evaluate", "gradcam", "report", "export"]
CHANCE = 1 / 6


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, image_folder):
    project = make_project(tmp_path_factory.mktemp("project"), tiny_params(image_folder))
    result = run(["dvc", "repro"], project)
    return project, result.stdout + result.stderr


def test_repro_runs_every_stage_and_locks_them(reproduced):
    project, log = reproduced
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    assert not list((project / "checkpoints").glob("train_state*"))  # a finished run leaves no resume state
    assert run(["dvc", "status", "--json"], project).stdout.strip() == "{}"


def test_data_metrics_count_what_was_dropped(reproduced):
    project, _ = reproduced
    data = json.loads((project / "metrics/data.json").read_text())
    assert data["classes"] == 6
    train = data["splits"]["train"]
    assert train["images_in_source"] == 6 * 40 + 8  # 8 odd files, 3 of them unreadable
    assert train["dropped"] == 3 and train["images"] == 6 * 40 + 5
    assert data["dropped"] == 3 and data["ignored_files"] == 1
    assert data["splits"]["test"]["images"] == 6 * 15
    assert train["stored_short_side"]["max"] <= 80
    assert train["converted_to_rgb"] == {"CMYK": 1, "I;16": 1, "L": 1, "P": 1, "RGBA": 1}
    dropped = (project / "metrics/dropped_images.csv").read_text()
    for name in ("truncated.jpg", "empty.jpg", "not_an_image.jpg"):
        assert name in dropped
    assert "train/Audi A5 Coupe 2012/notes.txt,fetch: no image file suffix" in dropped


def test_model_learns_well_above_chance(reproduced):
    project, _ = reproduced
    metrics = json.loads((project / "metrics/eval.json").read_text())
    assert list(metrics) == ["top1", "top5", "mean_class_accuracy", "kept_epoch", "calibration_error"]  # in order
    assert 0 <= metrics["calibration_error"] < 1
    assert json.loads((project / "metrics/eval_report.json").read_text())["test_images"] == 90
    assert metrics["top1"] > 2.5 * CHANCE
    assert metrics["top5"] >= metrics["top1"]
    assert 0 < metrics["mean_class_accuracy"] <= 1
    live = json.loads((project / "metrics/train/metrics.json").read_text())
    assert live["step"] == 6 and live["kept_epoch"] == 6  # DVCLive's step is the epoch, from 1
    assert live["train"]["loss"] > 0
    assert "test" not in live and "validation" not in live  # no validation split; the test split is evaluate's
    curve = (project / "metrics/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(curve) == 1 + 6  # header + one row per epoch


def test_evaluate_writes_named_tables(reproduced):
    project, log = reproduced
    report = json.loads((project / "metrics/eval_report.json").read_text())
    # 6 classes: one table of all of them, worst first (before: the same 6 printed as worst and as best)
    assert len(report["worst_classes"]) == 6 and report["best_classes"] == []
    accuracies = [row["accuracy"] for row in report["worst_classes"]]
    assert accuracies == sorted(accuracies)
    assert "Audi A5 Coupe 2012" in (project / "plots/per_class_accuracy.csv").read_text()
    assert (project / "plots/predictions.csv").read_text().count("\n") == 1 + 90
    assert "most-confused pairs" in log and "all 6 classes, worst first" in log and "best classes" not in log


def test_gradcam_pngs_are_real_images(reproduced):
    project, _ = reproduced
    for name in ("samples.png", "worst.png"):
        with Image.open(project / "plots/gradcam" / name) as image:
            image.verify()
            # at most 700 px wide: two runs' grids side by side in `dvc plots diff` fit a 1400-px screen
            assert image.format == "PNG" and 300 < image.width <= 700 and image.height > 200


def test_report_embeds_real_figures_and_names_the_mistakes(reproduced, image_folder):
    project, log = reproduced
    report_dir = project / "plots/report"
    markdown = (report_dir / "report.md").read_text()
    # the source folder outside the project is shown by its name: the rest of its path is this machine's
    assert str(image_folder) not in markdown and f"on …/{image_folder.name}, 64 px" in markdown
    assert "Params: the committed params.yaml, unchanged." in markdown
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    # 6 classes: the confusion matrix with counts is one figure (before: a "zoom" repeated the whole matrix)
    assert {"curves.png", "per_class_accuracy.png", "confusion.png", "reliability.png", "../gradcam/samples.png",
            "../gradcam/worst.png"} == set(linked) and not (report_dir / "confusion_zoom.png").exists()
    for link in linked:
        with Image.open(report_dir / link) as image:
            image.verify()
            assert image.format == "PNG" and image.width >= 300 and image.height >= 200
    metrics = json.loads((project / "metrics/eval.json").read_text())
    assert f"| test top-1 | {metrics['top1']:.2%} (95% interval " in markdown and "; 90 test images) |" in markdown
    assert "| kept epoch | 6 of 6 (the last; no validation split) |" in markdown
    assert "top-5" not in markdown and "top-5" not in log  # 6 classes: top-5 is nearly always right, not shown
    # no validation split: no temperature, and the report says why and how to get one
    assert (f"| expected calibration error (test, 15 bins) | {metrics['calibration_error']:.3f} (not calibrated: "
            f"no temperature) |") in markdown
    assert "not calibrated (temperature 1): no validation split to fit a temperature on" in markdown
    assert "| min confidence P | test images answered | accuracy of the answered |" in markdown
    # random init: no probe to compare with, and the report says why
    assert "**No linear-probe baseline:** model.weights: none (random init)" in markdown
    assert json.loads((project / "metrics/probe.json").read_text()) == {}
    for pair in json.loads((project / "metrics/eval_report.json").read_text())["most_confused"]:
        assert f"| {pair['true']} | {pair['predicted']} | {pair['count']} |" in markdown


def test_export_loads_back_and_matches_the_model(reproduced):
    project, log = reproduced
    check = json.loads((project / "metrics/export.json").read_text())
    assert check["images"] == 32 and check["relative_logit_difference"] <= 1e-4 and check["top1_agreement"] == 1
    info = json.loads((project / "models/export/model.json").read_text())
    assert info["class_names"][0] == "Audi A5 Coupe 2012" and info["input"]["size"] == 64
    assert (info["format"], info["file"]) == ("onnx", "model.onnx")
    assert sorted(path.name for path in (project / "models/export").iterdir()) == ["MODEL_CARD.md", "model.json",
                                                                                    "model.onnx"]
    card = (project / "models/export/MODEL_CARD.md").read_text()
    assert str(project) not in card and "Every param of this run is the committed params.yaml's." in card
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert card.startswith("# Model card: resnet18 fine-tuned on ")
    assert f"| test top-1 | {evaluation['top1']:.1%} (95% interval " in card and "; 90 test images) |" in card
    assert "Audi A5 Coupe 2012" in card
    assert "## Intended use and limits" in card and "| train.lr | 0.05 |" in card
    session = onnxruntime.InferenceSession(str(project / "models/export/model.onnx"))  # as a server would, no torch
    logits = session.run(["logits"], {"image": np.random.rand(3, 3, 64, 64).astype(np.float32)})[0]
    assert logits.shape == (3, 6)  # any batch size, not only the traced one


def served(path: Path, spec: dict, session) -> np.ndarray:
    """The probabilities of one image file, following model.json's input steps with Pillow and numpy alone, as a
    server without PyTorch would."""
    from PIL import ImageOps

    inputs, side, size = spec["input"], spec["input"]["resize_to"], spec["input"]["size"]
    image = Image.open(path)
    image.draft(None, (side, side))
    image = ImageOps.exif_transpose(image)
    if (k := min(image.width // side, image.height // side)) >= 2:
        image = image.reduce(k)
    image = image.convert("RGB")
    width, height = image.size
    if inputs["resize_mode"] == "square":
        width, height = side, side
    elif width <= height:
        width, height = side, int(side * height / width)
    else:
        width, height = int(side * width / height), side
    image = image.resize((width, height), {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[
        inputs["interpolation"]])
    left, top = round((width - size) / 2), round((height - size) / 2)
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    pixels = (pixels - np.array(inputs["mean"], np.float32)) / np.array(inputs["std"], np.float32)
    logits = session.run(["logits"], {"image": pixels.transpose(2, 0, 1)[None].astype(np.float32)})[0][0]
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


def test_model_json_is_an_exact_serving_spec(reproduced, tmp_path):
    """Issue 31: following model.json's preprocessing with PIL gave probabilities up to 0.10 away from predict's
    (its reduced-size JPEG decode and the resize's rounding were not stated). Now its steps, followed with Pillow,
    numpy and onnxruntime on photo-like JPEGs of several sizes, give predict's probabilities within 1e-3."""
    project, _ = reproduced
    spec = json.loads((project / "models/export/model.json").read_text())
    assert len(spec["input"]["steps"]) == 6 and "Image.draft(None, (73, 73))" in spec["input"]["steps"][0]
    assert spec["output"]["temperature"] == 1.0  # no validation split: nothing to divide by
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, (width, height) in enumerate([(640, 480), (300, 500), (1600, 1200), (90, 70), (731, 517)]):
        ramp = (np.linspace(0, 1, width)[None, :, None] * rng.uniform(50, 200, 3)
                + np.linspace(0, 1, height)[:, None, None] * rng.uniform(0, 55, 3))
        noisy = np.clip(ramp + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(photos / f"photo{index}.jpg", quality=90)
    out = tmp_path / "preds"
    run([sys.executable, "-m", "commands.predict", str(photos), "--top-k", "6", "--out", str(out)], project)
    session = onnxruntime.InferenceSession(str(project / "models/export/model.onnx"))
    names = spec["class_names"]
    for row in json.loads(out.with_suffix(".json").read_text())["images"]:
        probabilities = served(Path(row["file"]), spec, session)
        for top in row["top"]:
            assert abs(probabilities[names.index(top["class_name"])] - top["probability"]) < 1e-3, row["file"]


def test_predict_names_classes_and_reports_broken_files(reproduced, image_folder, tmp_path):
    project, _ = reproduced
    photos = tmp_path / "photos"
    photos.mkdir()
    true_classes = {}
    for class_dir in sorted((image_folder / "test").iterdir())[:3]:
        source = sorted(class_dir.glob("*.jpg"))[0]
        (photos / f"{class_dir.name}.jpg").write_bytes(source.read_bytes())
        true_classes[str(photos / f"{class_dir.name}.jpg")] = class_dir.name
    Image.open(source).convert("RGBA").save(photos / "transparent.png")
    Image.open(source).convert("L").resize((300, 500)).save(photos / "grey_tall.jpg")
    (photos / "broken.jpg").write_bytes(b"not really a jpeg")
    out = tmp_path / "preds"
    result = run([sys.executable, "-m", "commands.predict", str(photos), "--top-k", "3", "--out", str(out),
                  "--gradcam", str(tmp_path / "cams")], project)
    assert "5 image(s) classified, 1 unreadable" in result.stdout
    rows = {Path(row["file"]).name: row for row in json.loads(out.with_suffix(".json").read_text())["images"]}
    assert "error" in rows["broken.jpg"] and len(rows) == 6
    for name, row in rows.items():
        if name != "broken.jpg":
            probabilities = [top["probability"] for top in row["top"]]
            assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
            assert 0 < sum(probabilities) <= 1.0001
    correct = sum(rows[Path(f).name]["top"][0]["class_name"] == name for f, name in true_classes.items())
    assert correct >= 2  # a model at ~99% test accuracy names the class of held-out test photos
    csv_lines = out.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0] == "file,rank,class_name,probability,answer,error" and len(csv_lines) == 1 + 5 * 3 + 1
    cams = sorted((tmp_path / "cams").glob("*.png"))
    assert len(cams) == 5
    with Image.open(cams[0]) as cam:  # the 64-px crop the model saw, enlarged, with its label under it
        assert cam.format == "PNG" and cam.width == 320 and cam.height > 320


def test_dvc_plots_and_metrics_read_the_outputs(reproduced):
    project, _ = reproduced
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    flat = json.dumps(metrics)
    assert "top1" in flat and "kept_epoch" in flat
    assert "images_per_class" not in flat  # dataset statistics are a file beside the metrics, not columns
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)
    assert not plots.get("errors")
    names = set(plots["data"])
    assert {"Per-class test accuracy", "Confusion (test)", "plots/gradcam/samples.png"} <= names
    assert drawn_curves(project, plots) == {"metrics/train/plots/metrics/train/loss.tsv": "Train loss",
                                     "metrics/train/plots/metrics/train/acc.tsv": "Train accuracy",
                                     "metrics/train/plots/metrics/train/images_per_s.tsv": "Train images/s",
                                     "metrics/train/plots/metrics/lr.tsv": "Learning rate"}


def drawn_curves(project: Path, plots: dict) -> dict[str, str]:
    """The title of each DVCLive curve's chart in `plots` (`dvc plots show --json`), after checking that every curve
    file is drawn (DVC leaves out a file of a plotted folder when another file beside it has its own definition)."""
    live_dir = "metrics/train/plots/metrics"
    charts = {name: plot[0]["content"]["title"]["text"] for name, plot in plots["data"].items()
              if name.startswith(live_dir)}
    files = {path.relative_to(project).as_posix() for path in (project / live_dir).rglob("*.tsv")}
    assert set(charts) == files
    return charts


def test_experiment_reuses_data_stages_and_reports_the_change(reproduced):
    project, _ = reproduced
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline run"], project)
    result = run(["dvc", "exp", "run", "-S", "train.lr=0.02", "-S", "train.epochs=3"], project)
    log = result.stdout + result.stderr
    assert "Running stage 'fetch'" not in log and "Running stage 'prepare'" not in log
    assert "Running stage 'train'" in log and "Running stage 'evaluate'" in log
    assert ("check: params.yaml differs from the last commit's in 2 param(s): train.epochs 3 (committed: 6), "
            "train.lr 0.02 (committed: 0.05)") in log
    assert "Params that differ from the last commit's params.yaml: train.epochs 3 (committed: 6), train.lr 0.02" \
        in (project / "plots/report/report.md").read_text()
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], project).stdout)
    assert diff["metrics/eval.json"]["kept_epoch"] == {"old": 6, "new": 3, "diff": -3}
    # --all: both runs may reach the same test top-1 (100% on this easy data), and an unchanged
    # metric is left out of a plain diff
    every = json.loads(run(["dvc", "metrics", "diff", "--all", "--json"], project).stdout)
    assert set(every["metrics/eval.json"]["top1"]) >= {"old", "new"}
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    assert "0.02" in json.dumps(shown)
    # What a person reads: in a 150-column terminal, the headline metrics and the changed params, whole.
    table = run(["dvc", "exp", "show", "--only-changed", "--drop", ".*/.*", "--no-pager"], project,
                env={"COLUMNS": "150"}).stdout
    header = next(line for line in table.splitlines() if "Experiment" in line).split()
    # --only-changed: the metrics whose values differ (top5 may be 100% in both runs) and the changed params
    assert {"top1", "kept_epoch", "train.lr", "train.epochs"} <= set(header), table
    assert "…" not in table and max(map(len, table.splitlines())) <= 150, table


@pytest.fixture(scope="module")
def from_pretrained(tmp_path_factory, image_folder, reproduced):
    """A run from "pretrained" weights (the first run's model: features that separate these classes), its head
    started from the linear probe and its weights mixed with that start (WiSE-FT), up to the report."""
    first, _ = reproduced
    params = tiny_params(image_folder, **{"model.weights": "weights/start.pt", "train.epochs": 2,
                                          "train.lr": 0.01, "train.head_init": "probe", "data.val_fraction": 0.2,
                                          "train.wise_ft": [0.0, 0.5, 1.0]})
    project = make_project(tmp_path_factory.mktemp("pretrained"), params)
    shutil.copy(first / "models/model.pt", project / "weights/start.pt")  # tracked by DVC there, not by git
    result = run(["dvc", "repro", "report"], project)
    return project, result.stdout + result.stderr


def test_a_pretrained_run_measures_its_linear_probe_and_says_what_fine_tuning_added(from_pretrained):
    project, log = from_pretrained
    assert "Running stage 'probe'" in log and "probe: resnet18" in log and "chosen on the validation split" in log
    probe = json.loads((project / "metrics/probe.json").read_text())
    assert list(probe) == ["probe_top1", "probe_mean_class_accuracy"] and probe["probe_top1"] > 2.5 * CHANCE
    details = json.loads((project / "metrics/probe_report.json").read_text())
    assert details["test_images"] == 90 and details["feature_dim"] == 512 and details["held_out_images"] > 0
    assert str(details["regularization"]) in {str(c) for c in PROBE_C_GRID}
    assert (project / "plots/probe_predictions.csv").read_text().count("\n") == 1 + 90
    markdown = (project / "plots/report/report.md").read_text()
    assert f"| linear probe of the same weights (frozen features, logistic regression) | {probe['probe_top1']:.2%} " \
           f"top-1" in markdown
    assert "| fine-tuning over the probe | " in markdown and "McNemar p = " in markdown
    # the verdict; or, where train.wise_ft kept α 0 (the start validated best), that the model is the probe
    assert re.search(r"\*\*(Fine-tuning (paid|did not measurably beat|lost)|The saved model is the linear probe "
                     r"itself)", markdown)
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    assert "probe_top1" in json.dumps(shown)  # a column of `dvc exp show` / `dvc metrics diff` beside top1


def test_a_run_with_a_validation_split_calibrates_its_confidence(from_pretrained, tmp_path):
    """The temperature is fitted on the validation split, stored in the checkpoint, and used by evaluate (its
    confidences and ECE), the report (ECE before and after, the reliability diagram) and predict."""
    project, log = from_pretrained
    checkpoint = torch.load(project / "models/model.pt", weights_only=True)
    calibration = checkpoint["calibration"]
    validation = json.loads((project / "metrics/data.json").read_text())["splits"]["validation"]["images"]
    assert calibration["fitted_on"] == "validation" and calibration["images"] == validation > 40  # 20% of 245
    assert f"train: confidence calibrated: temperature {calibration['temperature']:.3g}, fitted on {validation} " \
           f"validation images" in log
    report = json.loads((project / "metrics/eval_report.json").read_text())["calibration"]
    assert report["temperature"] == calibration["temperature"]
    rows = list(csv.DictReader(open(project / "plots/predictions.csv")))
    scaled = [float(row["confidence"]) for row in rows]
    raw = [float(row["uncalibrated_confidence"]) for row in rows]
    assert len(rows) == 90 and scaled != raw and all(1 / 6 <= value <= 1 for value in scaled + raw)
    markdown = (project / "plots/report/report.md").read_text()
    ece = json.loads((project / "metrics/eval.json").read_text())["calibration_error"]
    assert (f"| expected calibration error (test, 15 bins) | {ece:.3f} ({report['calibration_error_uncalibrated']:.3f}"
            f" before temperature scaling) |") in markdown
    assert f"{report['calibration_error_uncalibrated']:.3f} with the raw softmax, {ece:.3f} with the temperature" \
        in markdown
    with Image.open(project / "plots/report/reliability.png") as figure:
        assert figure.width >= 2 * 500  # two panels: before and after the temperature


def test_wise_ft_keeps_the_mix_that_validates_best_and_alpha_0_is_the_start_itself(from_pretrained, tmp_path):
    project, log = from_pretrained
    mix = json.loads((project / "metrics/train/metrics.json").read_text())["wise_ft"]
    assert set(mix["validation_acc"]) == {"0", "0.5", "1"} and mix["alpha"] in (0, 0.5, 1)
    assert mix["validation_acc"][f"{mix['alpha']:g}"] == max(mix["validation_acc"].values())
    assert re.search(r"train: WiSE-FT, validation accuracy of the weights mixed with the start: α 0 [01]\.\d{4}, "
                     r"α 0\.5 [01]\.\d{4}, α 1 [01]\.\d{4}; kept α", log), log  # 1.0000: all right on easy data
    assert f"| weights mixed with the start (WiSE-FT) | α {mix['alpha']:g} kept (validation top-1 α 0 " in \
        (project / "plots/report/report.md").read_text()
    # α 0 alone: the saved model is the start, the pretrained backbone under the probe's head, whatever trained
    copy = tmp_path / "alpha0"
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns(".dvc", ".git", "checkpoints"))
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["train"].update(wise_ft=[0.0], epochs=1)
    (copy / "params.yaml").write_text(yaml.safe_dump(params))
    assert "kept α 0 (the start: the linear probe)" in run([sys.executable, "-m", "stages.train"], copy).stdout
    saved = torch.load(copy / "models/model.pt", weights_only=True)["state_dict"]
    start = torch.load(copy / "weights/start.pt", weights_only=True)["state_dict"]
    probe = torch.load(copy / "models/probe.pt", weights_only=True)
    assert torch.equal(saved["fc.weight"], probe["weight"]) and torch.equal(saved["fc.bias"], probe["bias"])
    backbone = [name for name, value in saved.items() if value.is_floating_point() and not name.startswith("fc.")]
    assert len(backbone) >= 100 and all(torch.equal(saved[name], start[name]) for name in backbone)


def test_replacing_a_local_weights_file_re_runs_what_it_feeds(from_pretrained):
    """Issue 31: a local model.weights file was recorded by its path only: replaced, DVC said "up to date" and
    kept the old model. Under weights/ it is a dependency of check, probe and train (its hash in dvc.lock)."""
    project, log = from_pretrained
    assert "is outside weights/" not in log
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert any(dep["path"] == "weights" for dep in lock["stages"]["train"]["deps"])
    before = json.loads(run(["dvc", "status", "--json"], project).stdout)  # export never ran here
    assert not {"check", "probe", "train"} & set(before), before
    weights = project / "weights/start.pt"
    original = weights.read_bytes()
    state = torch.load(weights, weights_only=True)
    state["state_dict"]["fc.bias"] += 1  # other weights under the same name
    torch.save(state, weights)
    try:
        status = run(["dvc", "status", "--json"], project).stdout
        assert {"check", "probe", "train"} <= set(json.loads(status)), status
    finally:
        weights.write_bytes(original)
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == before


def test_a_train_only_variant_reuses_the_probe(from_pretrained):
    project, _ = from_pretrained
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "pretrained run"], project)
    result = run(["dvc", "exp", "run", "report", "-S", "train.lr=0.02", "-S", "train.head_init=random",
                  "-S", "train.wise_ft=[]"], project)
    log = result.stdout + result.stderr
    assert "Running stage 'probe'" not in log and "Running stage 'train'" in log
    table = run([sys.executable, "-m", "commands.compare", "--width", "200"], project).stdout
    assert "probe top1" in table.splitlines()[0] and "head_init" in table.splitlines()[0]


def test_export_format_param_reruns_only_export(reproduced):
    project, _ = reproduced
    result = run(["dvc", "exp", "run", "export", "-S", "export.format=torchscript"], project)
    log = result.stdout + result.stderr
    assert "Running stage 'export'" in log and "Running stage 'train'" not in log
    assert sorted(path.name for path in (project / "models/export").iterdir()) == ["MODEL_CARD.md", "model.json",
                                                                                    "model.torchscript.pt"]
    assert json.loads((project / "models/export/model.json").read_text())["format"] == "torchscript"
    scripted = torch.jit.load(str(project / "models/export/model.torchscript.pt"))
    assert scripted(torch.randn(3, 3, 64, 64)).shape == (3, 6)
    assert json.loads((project / "metrics/export.json").read_text())["top1_agreement"] == 1


def test_validation_split_picks_the_kept_epoch(tmp_path, image_folder):
    params = tiny_params(image_folder, **{"data.val_fraction": 0.25, "train.epochs": 4, "train.lr": 0.2})
    project = make_project(tmp_path, params)
    log = run(["dvc", "repro", "train"], project).stdout
    assert "Running stage 'evaluate'" not in log
    live = json.loads((project / "metrics/train/metrics.json").read_text())
    assert "validation" in live and "test" not in live  # the test split is not read while training
    rows = (project / "metrics/train/plots/metrics/validation/acc.tsv").read_text().splitlines()[1:]
    accuracies = [float(row.split("\t")[-1]) for row in rows]
    assert live["kept_epoch"] == accuracies.index(max(accuracies)) + 1
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)
    titles = drawn_curves(project, plots)  # the validation curves drawn too, titled by their path
    assert titles["metrics/train/plots/metrics/validation/acc.tsv"] == "metrics/train/plots/metrics/validation/acc.tsv"
    assert titles["metrics/train/plots/metrics/train/acc.tsv"] == "Train accuracy"
    checkpoint = torch.load(project / "models/model.pt", weights_only=True)
    assert checkpoint["epoch"] == live["kept_epoch"]
    assert checkpoint["class_names"][0] == "Audi A5 Coupe 2012" and checkpoint["params"]["data"]["val_fraction"] == 0.25


def test_params_typo_stops_repro_before_any_work(tmp_path, image_folder):
    params = tiny_params(image_folder)
    params["train"]["learning_rate"] = 0.1
    project = make_project(tmp_path, params)
    result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0
    assert "train.learning_rate: unknown key (did you mean train.lr?)" in result.stdout + result.stderr
    assert not (project / "data/raw").exists()


def test_a_refused_param_loses_no_result(reproduced):
    """Before: `dvc exp run -S train.epochs=-1` was refused only after DVC had deleted models/model.pt and
    metrics/train/. Now the check stage refuses it before any stage's outputs are touched."""
    project, _ = reproduced
    kept = ("models/model.pt", "metrics/train/metrics.json", "metrics/eval.json", "data/prepared/dataset_dict.json",
            "metrics/params_check.txt")  # check's own output too (persist: DVC does not delete it first)
    before = {path: (project / path).read_bytes() for path in kept}
    result = run(["dvc", "exp", "run", "-S", "train.epochs=-1", "-S", "train.lr=.inf"], project, check=False)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "train.epochs: Input should be greater than or equal to 1" in log and "- train.lr: " in log
    assert "Running stage 'train'" not in log
    assert {path: (project / path).read_bytes() for path in before} == before
    run(["git", "checkout", "params.yaml"], project)
    status = run(["dvc", "status", "--json"], project).stdout
    assert "models/model.pt" not in status  # nothing to re-run: the previous results stand


def test_predict_survives_hostile_images_and_refuses_bad_arguments(reproduced, tmp_path):
    """Before: one bomb or 60000x1 PNG aborted predict with no output for any image."""
    project, _ = reproduced
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (90, 70), (200, 30, 30)).save(photos / "a_good.jpg")
    Image.new("1", (30000, 30000)).save(photos / "bomb.png")
    Image.new("L", (60000, 1)).save(photos / "thin.png")
    Image.new("RGB", (80, 60), (30, 30, 200)).save(photos / "z_good.png")
    out = tmp_path / "preds"
    result = run([sys.executable, "-m", "commands.predict", str(photos), "--out", str(out)], project)
    assert "2 image(s) classified, 2 unreadable" in result.stdout
    rows = {Path(row["file"]).name: row for row in json.loads(out.with_suffix(".json").read_text())["images"]}
    assert "top" in rows["a_good.jpg"] and "top" in rows["z_good.png"]
    assert "decompression bomb" in rows["bomb.png"]["error"]
    assert "60000x1" in rows["thin.png"]["error"] and "allowed" in rows["thin.png"]["error"]

    for arguments, message in [
        (["--top-k", "0"], "must be 1 or more"),
        (["--top-k", "-1"], "must be 1 or more"),
        (["--out", "metrics/eval"], "/metrics, where the pipeline keeps its outputs"),
        (["--out", str(photos / "a_good.jpg" / "predictions")], "is not writable"),
        (["--model", str(photos / "a_good.jpg")], "is not a readable model file"),
    ]:
        failed = run([sys.executable, "-m", "commands.predict", str(photos), *arguments], project, check=False)
        assert failed.returncode != 0 and message in failed.stderr, (arguments, failed.stderr)
        assert "Traceback" not in failed.stderr
    assert json.loads((project / "metrics/eval_report.json").read_text())["test_images"] == 90  # untouched


def test_predict_exits_nonzero_when_nothing_could_be_classified(reproduced, tmp_path):
    project, _ = reproduced
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    result = run([sys.executable, "-m", "commands.predict", str(tmp_path / "broken.jpg"), "--out",
                  str(tmp_path / "p")], project, check=False)
    assert result.returncode == 1 and "0 image(s) classified, 1 unreadable" in result.stdout


def rendered_svg(plots: dict, name: str) -> str:
    """A plot's Vega-Lite spec, as `dvc plots show --json` fills it, drawn by a real Vega renderer."""
    import vl_convert

    (plot,) = plots["data"][name]
    assert plot["type"] == "vega"
    return vl_convert.vegalite_to_svg(plot["content"])


def test_plots_render_offline_as_charts(reproduced, tmp_path):
    """Each data plot of dvc.yaml draws real marks; the page DVC writes loads no script from the network, and in a
    headless browser (when one is installed) every chart renders."""
    project, _ = reproduced
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)
    loss = rendered_svg(plots, "metrics/train/plots/metrics/train/loss.tsv")
    assert loss.count("<path") >= 2 and "Train loss" in loss  # the curve and its axes, under its title
    bars = rendered_svg(plots, "Per-class test accuracy")
    assert "Audi A5 Coupe 2012" in bars and bars.count("<path") >= 6
    confusion = rendered_svg(plots, "Confusion (test)")
    assert "Mercedes-Benz Sprinter Van 2012" in confusion and confusion.count("<path") >= 6
    assert not (project / "metrics/train/plots/metrics/epoch.tsv").exists()  # no noise curve of 1, 2, 3...

    out = tmp_path / "page"
    run(["dvc", "plots", "show", "-o", str(out)], project)
    page = (out / "index.html").read_text()
    assert "<script src=" not in page and "window.vegaEmbed=" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return  # the rendering above already drew each spec; CI machines without a browser stop here
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--virtual-time-budget=15000", "--dump-dom", f"file://{out / 'index.html'}"],
                         capture_output=True, text=True, timeout=120).stdout
    charts = page.count("vegaEmbed('#")
    assert charts >= 3 and dom.count('class="marks"') >= charts
