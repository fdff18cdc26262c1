"""`python -m benchmarks.real_data`: this pipeline, timm's own train.py and the pipeline's linear probe, on a real
dataset with real ImageNet weights: the same folders, weights, resolution, batch, epochs and augmentation.

Needs three things CI does not have (so this is a benchmark with a documented command, never a test):
- `--data DIR`: a built dataset as DIR/{train,test}/<class name>/*.jpg, for example real Stanford Cars, the
  official 8,144 / 8,041 split (`shared/data/build_stanford_cars.sh`: each image the car's bounding box squashed
  to 224x224, so the figures are not comparable with full-image benchmarks), or Caltech-101, 5,784 / 2,893
  (`shared/data/build_caltech101.sh`); `--dataset NAME` names its results (default: DIR's name);
- `--weights FILE`: ImageNet EfficientNet-Lite0 weights in timm's tf_efficientnet_lite0 layout, written by
  `shared/data/build_imagenet_lite0.py`;
- for the `timm:*` parts, `--timm-train FILE`: timm's own train.py (github:huggingface/pytorch-image-models),
  run with the pinned timm package; it is run, never copied into this repository.

Each part runs in a fresh clone of this repository's HEAD under `--workdir`, pinned to the CPUs of `--cpus` with
that many PyTorch threads and one loader process, and writes `benchmarks/real_data/<dataset>/<part>.json`
(`<part>-<N>-epochs.json` with `--epochs N` other than 4). Parts:
- `pipeline:<recipe>`: `dvc exp run -n <recipe> -S ...` exactly as a user types it (RECIPES below);
- `timm:<recipe>`: timm's train.py on the same folders with the same settings (TIMM_ARGS: what maps to what);
- `probe[:<recipe>]`: the pipeline's own stage `probe` alone (`dvc repro probe`) with the recipe's params (default
  `sgd`; the probe reads its resolution and train.crop): logistic regression on the frozen pooled features of the
  same weights, the floor a fine-tune must beat (every `pipeline:*` part also reports its own);
- `throughput`: train images/s of both trainers with the `sgd` recipe on the same subset (8 train and 2 test images
  per class), one epoch each, alternated pipeline, timm, pipeline, timm... (`--rounds`), each tool's own epoch
  figure; run it on an otherwise idle machine.
Two parts given to two processes with different `--cpus` run side by side, paired on the same machine.
`--table` prints one Markdown table per dataset of every part found in benchmarks/real_data/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "real_data"
ARCH = "timm/tf_efficientnet_lite0"

# What every run shares. 160 px (Lite0's weights are 224-px ones; 160 is 2x cheaper) and 4 epochs: one epoch of
# 8,144 images takes ~7 min on one core of the 2-core development machine (~20 images/s, two runs side by side),
# so a whole run with TTA stays well within ~90 min of one core.
BASE = {
    "data.preset": "none", "data.val_fraction": 0, "data.test_fraction": 0,
    "model.arch": ARCH, "train.resolution": 160, "train.batch_size": 32, "train.epochs": 4,
    "train.device": "cpu", "train.num_workers": 1, "evaluate.num_workers": 1, "evaluate.tta": "true",
    "train.crop_scale": "[0.25,1.0]", "train.label_smoothing": 0.1,
}

RECIPES = {
    # (a) The seeds' run 7 family (single-stage SGD, every layer at one lr, lr 0.1 per 128 images scaled to
    # batch 32), cosine instead of steps over the few epochs; nesterov and no weight decay on norms/biases as timm's
    # `--opt sgd` does, so that the timm peer runs the same optimizer.
    "sgd": {"train.optimizer": "sgd", "train.lr": 0.025, "train.nesterov": "true", "train.weight_decay": 1e-4,
            "train.no_weight_decay_on_norm_and_bias": "true", "train.lr_schedule": "cosine"},
    # (a) with milder crops: Caltech-101's Faces and Faces_easy are the same photos framed loose and tight, so a
    # crop that zooms (scale 0.25 is a 2x zoom) turns one class into the other (12 epochs of (a): 35 of its 145
    # Faces test photos called Faces_easy).
    "sgd-crop70": {"train.optimizer": "sgd", "train.lr": 0.025, "train.nesterov": "true", "train.weight_decay": 1e-4,
                   "train.no_weight_decay_on_norm_and_bias": "true", "train.lr_schedule": "cosine",
                   "train.crop_scale": "[0.7,1.0]"},
    # (a) with no zoom at all: square resize to resolution/0.875, then a random crop (translation and flip only).
    "sgd-square": {"train.optimizer": "sgd", "train.lr": 0.025, "train.nesterov": "true", "train.weight_decay": 1e-4,
                   "train.no_weight_decay_on_norm_and_bias": "true", "train.lr_schedule": "cosine",
                   "train.crop": "resize_then_crop"},
    # sgd-square at Lite0's own resolution (twice the pixels of 160: about twice the time).
    "sgd-square-224": {"train.optimizer": "sgd", "train.lr": 0.025, "train.nesterov": "true",
                       "train.weight_decay": 1e-4, "train.no_weight_decay_on_norm_and_bias": "true",
                       "train.lr_schedule": "cosine", "train.crop": "resize_then_crop", "train.resolution": 224},
    # sgd-square started from the fitted linear probe (LP-FT: Kumar et al., ICLR 2022), at sgd's lr.
    "lpft-square": {"train.optimizer": "sgd", "train.lr": 0.025, "train.nesterov": "true",
                    "train.weight_decay": 1e-4, "train.no_weight_decay_on_norm_and_bias": "true",
                    "train.lr_schedule": "cosine", "train.crop": "resize_then_crop", "train.head_init": "probe"},
    # sgd-square with TrivialAugment (one random photometric or geometric op per image; Müller & Hutter 2021).
    "sgd-square-trivial": {"train.optimizer": "sgd", "train.lr": 0.025, "train.nesterov": "true",
                           "train.weight_decay": 1e-4, "train.no_weight_decay_on_norm_and_bias": "true",
                           "train.lr_schedule": "cosine", "train.crop": "resize_then_crop",
                           "train.augment": "trivial_augment"},
    # (a') (a) started from the fitted linear probe (LP-FT: Kumar et al., ICLR 2022) at a gentler lr: for data
    # whose frozen features are already strong (Caltech-101: 93.16%, against 93.09% from a random head at 0.025).
    "lpft": {"train.optimizer": "sgd", "train.lr": 0.01, "train.nesterov": "true", "train.weight_decay": 1e-4,
             "train.no_weight_decay_on_norm_and_bias": "true", "train.lr_schedule": "cosine",
             "train.head_init": "probe"},
    # (a'') (a') with the pretrained BatchNorm statistics kept (a tenth of the lr: nothing renormalizes a layer
    # after a step), milder crops, and the kept weights mixed with the start, the mix chosen on a 10% validation
    # split (WiSE-FT: Wortsman et al., CVPR 2022). Caltech-101 (2026-12-05): validation kept α 0, the probe itself.
    "wise": {"data.val_fraction": 0.1, "train.optimizer": "sgd", "train.lr": 0.002, "train.nesterov": "true",
             "train.weight_decay": 1e-4, "train.no_weight_decay_on_norm_and_bias": "true",
             "train.lr_schedule": "cosine", "train.crop_scale": "[0.35,1.0]", "train.head_init": "probe",
             "train.norm_statistics": "pretrained", "train.wise_ft": "[0,0.25,0.5,0.75,1]"},
    # (b) The seeds' "freeze, then differential lr" family (their runs 1-6), with the lr the failed runs lacked:
    # epoch 1 trains the new head alone (a linear probe, BatchNorm statistics frozen), then every layer, the head
    # at 10x the backbone's lr (LP-FT: Kumar et al., ICLR 2022).
    "freeze-then-differential": {
        "train.optimizer": "sgd", "train.lr": 0.01, "train.head_lr_multiplier": 10, "train.nesterov": "true",
        "train.weight_decay": 1e-4, "train.no_weight_decay_on_norm_and_bias": "true",
        "train.lr_schedule": "cosine", "train.freeze_epochs": 1},
    # (c) Today's fine-tuning regularizers (timm's and torchvision's recipes): AdamW, layer-wise lr decay, EMA,
    # MixUp/CutMix, RandAugment, label smoothing, per-step warmup and cosine.
    "modern": {
        "train.optimizer": "adamw", "train.lr": 1e-3, "train.weight_decay": 0.05,
        "train.no_weight_decay_on_norm_and_bias": "true", "train.lr_schedule": "cosine",
        "train.lr_schedule_unit": "step", "train.warmup_epochs": 1, "train.layer_decay": 0.85,
        "train.ema_decay": 0.995, "train.mixup_alpha": 0.2, "train.cutmix_alpha": 1.0,
        "train.augment": "randaugment"},
}

# timm's train.py flags for the same run as RECIPES["sgd"]. The pipeline's BASE and recipe -> timm:
# RandomResizedCrop scale 0.25-1 and flip, bicubic (the weights' interpolation in both), no colour jitter
# (timm's default 0.4 is off in the pipeline), label smoothing 0.1, nesterov SGD without weight decay on
# norms and biases (timm's default), cosine per epoch from the first epoch (no warmup), channels_last (the
# pipeline's default on every device), the model's own eval transform (resize 183, centre crop 160). The test
# split is timm's validation split: its eval top-1 after the last epoch is the test top-1.
TIMM_ARGS = {
    "sgd": ["--opt", "sgd", "--lr", "0.025", "--momentum", "0.9", "--weight-decay", "1e-4", "--sched", "cosine",
            "--warmup-epochs", "0", "--min-lr", "0", "--smoothing", "0.1", "--scale", "0.25", "1.0",
            "--color-jitter", "0", "--train-interpolation", "bicubic", "--hflip", "0.5", "--channels-last"],
}
# train.crop resize_then_crop (a square resize to resolution/0.875, then a random `resolution` crop) has no timm
# flag: timm reads a copy of the data squashed to that square (squashed_copy), where a RandomResizedCrop of the
# fixed area (0.875)^2 and ratio 1 is the same random crop, and timm's eval (shorter side, centre crop) the same
# square eval as the pipeline's.
SQUARE_CROP_AREA = f"{0.875 ** 2:.6f}"
TIMM_ARGS["sgd-square"] = [*TIMM_ARGS["sgd"][:TIMM_ARGS["sgd"].index("--scale")], "--scale", SQUARE_CROP_AREA,
                           SQUARE_CROP_AREA, "--ratio", "1", "1",
                           *TIMM_ARGS["sgd"][TIMM_ARGS["sgd"].index("--scale") + 3:]]


def squashed_copy(data: Path, dest: Path, side: int) -> Path:
    """Every image of `data` resized to side x side (bicubic, as the weights' interpolation), in the same layout:
    once per dataset and side (reused when `dest` is complete)."""
    from PIL import Image

    done = dest / ".complete"
    if done.exists():
        return dest
    for image in sorted(data.glob("*/*/*")):
        target = dest / image.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(image) as opened:
            opened.convert("RGB").resize((side, side), Image.BICUBIC).save(target.with_suffix(".png"))
    done.touch()
    return dest


def run_logged(command: list[str], cwd: Path, log: Path, env: dict) -> float:
    """Runs `command`, its output to `log`; returns the wall time. A failure names the log."""
    start = time.perf_counter()
    with open(log, "w") as out:
        status = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if status:
        sys.exit(f"{' '.join(command[:4])} ... failed (status {status}): see {log}")
    return time.perf_counter() - start


def fresh_clone(dest: Path) -> Path:
    if dest.exists():
        sys.exit(f"{dest} exists: give another --workdir or remove it")
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], check=True)
    return dest


def environment(threads: int) -> dict:
    venv = Path(sys.executable).parent
    return dict(os.environ, PATH=f"{venv}:{os.environ['PATH']}", HF_HUB_OFFLINE="1",
                OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")


def spread(values: list[float]) -> dict:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2),
            "max": round(max(values), 2)}


def pipeline_overrides(recipe: str, data: Path, weights: Path, threads: int, epochs: int) -> dict:
    return {**BASE, "data.source": str(data), "model.weights": str(weights), "train.num_threads": threads,
            "train.epochs": epochs, **RECIPES[recipe]}


def run_pipeline(recipe: str, args) -> dict:
    clone = fresh_clone(args.workdir / f"pipeline-{recipe}")
    overrides = pipeline_overrides(recipe, args.data, args.weights, len(args.cpus), args.epochs)
    command = ["dvc", "exp", "run", "-n", recipe] + [f"-S{key}={value}" for key, value in overrides.items()]
    seconds = run_logged(command, clone, clone / "run.log", environment(len(args.cpus)))
    metrics = json.loads((clone / "metrics/eval.json").read_text())
    report = json.loads((clone / "metrics/eval_report.json").read_text())
    probe = json.loads((clone / "metrics/probe.json").read_text())
    curves = clone / "metrics/train/plots/metrics/train"
    speeds = [float(row["images_per_s"]) for row in csv.DictReader(open(curves / "images_per_s.tsv"),
                                                                   delimiter="\t")]
    return {"tool": "pipeline", "recipe": recipe, "command": "dvc exp run " + " ".join(command[3:]),
            "top1": metrics["top1"], "top5": metrics["top5"], "mean_class_accuracy": metrics["mean_class_accuracy"],
            "tta_top1": metrics.get("tta", {}).get("top1"), "probe_top1": probe.get("probe_top1"),
            "probe_mean_class_accuracy": probe.get("probe_mean_class_accuracy"),
            "wise_ft": json.loads((clone / "metrics/train/metrics.json").read_text()).get("wise_ft"),
            "against_probe": against_probe(clone), "wall_s": round(seconds, 1),
            "train_images_per_s": spread(speeds), "most_confused": report["most_confused"][:5],
            "clone": str(clone)}


def against_probe(clone: Path) -> dict | None:
    """The fine-tune against its own probe on the same test images: who alone was right, and the exact McNemar p
    (as the run's report says it), from the two per-image prediction files."""
    from finetune.stats import correct_by_id, paired

    def read(name: str) -> dict[str, bool]:
        return correct_by_id(list(csv.DictReader(open(clone / "plots" / name))))

    tuned, probe = read("predictions.csv"), read("probe_predictions.csv")
    if not probe:
        return None
    ids = sorted(tuned.keys() & probe.keys())
    pair = paired([tuned[i] for i in ids], [probe[i] for i in ids])
    return {"images": pair.images, "only_fine_tune_right": pair.only_first_right,
            "only_probe_right": pair.only_second_right, "mcnemar_p": float(f"{pair.p_value:.3g}")}


def run_timm(recipe: str, args) -> dict:
    if args.timm_train is None or not args.timm_train.is_file():
        sys.exit("timm parts need --timm-train PATH: timm's train.py (fetch github:huggingface/pytorch-image-models)")
    out = args.workdir / f"timm-{recipe}"
    out.mkdir(parents=True)
    data = args.data
    if RECIPES[recipe].get("train.crop") == "resize_then_crop":
        side = round(BASE["train.resolution"] / 0.875)
        data = squashed_copy(args.data, args.workdir / f"squashed-{side}", side)
    command = [sys.executable, str(args.timm_train), "--data-dir", str(data), "--train-split", "train",
               "--val-split", "test", "--model", ARCH.removeprefix("timm/"), "--pretrained", "--pretrained-path",
               str(args.weights), "--num-classes", str(num_classes(args.data)), "--img-size",
               str(BASE["train.resolution"]), "-b", str(BASE["train.batch_size"]), "--epochs", str(args.epochs),
               "--device", "cpu", "-j", "1", "--log-interval", "20", "--output", str(out), "--experiment", "run",
               *TIMM_ARGS[recipe]]
    seconds = run_logged(command, out, out / "run.log", environment(len(args.cpus)))
    rows = list(csv.DictReader(open(out / "run" / "summary.csv")))
    speeds = epoch_speeds(out / "run.log")
    model_file = out / "run" / "last.pth.tar"
    top1_mean_class = timm_mean_class_accuracy(model_file, data)
    return {"tool": "timm train.py", "recipe": recipe, "command": "python train.py " + " ".join(command[2:]),
            "top1": round(float(rows[-1]["eval_top1"]) / 100, 5), "top5": round(float(rows[-1]["eval_top5"]) / 100, 5),
            "mean_class_accuracy": top1_mean_class, "tta_top1": None, "wall_s": round(seconds, 1),
            "train_images_per_s": spread(speeds), "epochs": len(rows)}


def epoch_speeds(log: Path) -> list[float]:
    """Each epoch's average train images/s: the running average (in brackets) of its last logged step."""
    last = {}
    for line in log.read_text().splitlines():
        match = re.match(r"Train: (\d+) \[.*\(\s*[\d.]+s,\s*([\d.]+)/s\)", line)
        if match:
            last[int(match.group(1))] = float(match.group(2))
    return [last[epoch] for epoch in sorted(last)]


def timm_mean_class_accuracy(model_file: Path, data: Path) -> float:
    """timm reports top-1/top-5 only: its last checkpoint, rebuilt by timm and fed by timm's own eval transform,
    scored per class on the test folder. Read with weights_only (the checkpoint also holds train.py's args)."""
    import argparse as argparse_module

    import timm
    import torch
    from timm.data import ImageDataset, create_transform, resolve_data_config

    with torch.serialization.safe_globals([argparse_module.Namespace]):
        state = torch.load(model_file, map_location="cpu", weights_only=True)["state_dict"]
    model = timm.create_model(ARCH.removeprefix("timm/"), num_classes=num_classes(data))
    model.load_state_dict(state)
    model = model.to(memory_format=torch.channels_last).eval()
    config = resolve_data_config({"input_size": (3, BASE["train.resolution"], BASE["train.resolution"])},
                                 model=model)
    test = ImageDataset(str(data / "test"), transform=create_transform(**config))  # train.py's class order
    loader = torch.utils.data.DataLoader(test, batch_size=64, num_workers=1)
    correct, total = torch.zeros(model.num_classes), torch.zeros(model.num_classes)
    with torch.inference_mode():
        for images, labels in loader:
            hits = (model(images.contiguous(memory_format=torch.channels_last)).argmax(1) == labels).float()
            correct.index_add_(0, labels, hits)
            total.index_add_(0, labels, torch.ones_like(hits))
    return round((correct / total).mean().item(), 5)


def subset_folder(data: Path, dest: Path, per_split: dict[str, int]) -> Path:
    """The first images of each class, copied (fetch refuses links that leave data.source), in the same layout."""
    for split, count in per_split.items():
        for class_dir in sorted((data / split).iterdir()):
            (dest / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copyfile(image, dest / split / class_dir.name / image.name)
    return dest


def run_throughput(args) -> dict:
    subset = subset_folder(args.data, args.workdir / "throughput-subset", {"train": 8, "test": 2})
    clone = fresh_clone(args.workdir / "throughput-pipeline")
    threads = len(args.cpus)
    env = environment(threads)
    set_params(clone, pipeline_overrides("sgd", subset, args.weights, threads, 1))
    run_logged(["dvc", "repro", "prepare"], clone, clone / "prepare.log", env)
    out = args.workdir / "throughput-timm"
    out.mkdir()
    timm_command = [sys.executable, str(args.timm_train), "--data-dir", str(subset), "--train-split", "train",
                    "--val-split", "test", "--model", ARCH.removeprefix("timm/"), "--pretrained",
                    "--pretrained-path", str(args.weights), "--num-classes", str(num_classes(args.data)), "--img-size",
                    str(BASE["train.resolution"]), "-b", str(BASE["train.batch_size"]), "--epochs", "1",
                    "--device", "cpu", "-j", "1", "--log-interval", "10", "--output", str(out), *TIMM_ARGS["sgd"]]
    figures = {"pipeline": [], "timm train.py": []}
    for round_ in range(args.rounds):
        run_logged([sys.executable, "-m", "stages.train"], clone, clone / f"train-{round_}.log", env)
        # DVCLive's exact figure (the log rounds it to a whole number: up to 2% at these speeds)
        live = json.loads((clone / "metrics/train/metrics.json").read_text())
        figures["pipeline"].append(round(live["train"]["images_per_s"], 2))
        log = out / f"run-{round_}.log"
        run_logged([*timm_command, "--experiment", f"round{round_}"], out, log, env)
        figures["timm train.py"].append(epoch_speeds(log)[-1])
        print(f"real_data: throughput round {round_ + 1}: pipeline {figures['pipeline'][-1]} images/s, timm "
              f"{figures['timm train.py'][-1]} images/s", flush=True)
    ratios = [ours / theirs for ours, theirs in zip(figures["pipeline"], figures["timm train.py"], strict=True)]
    train_images = sum(1 for image in (subset / "train").rglob("*") if image.is_file())
    return {"tool": "both", "recipe": f"sgd, 1 epoch of {train_images:,} images", "top1": None,
            "mean_class_accuracy": None, "tta_top1": None, "wall_s": 0.0, "rounds": args.rounds,
            "threads_each": threads, "train_images_per_s": {tool: spread(values) for tool, values in figures.items()},
            "runs": figures, "epochs": 1,
            # Paired by round: each ratio shares its minutes of this machine's drifting speed with its timm run.
            "pipeline_to_timm_by_round": spread(ratios)}


def run_probe(recipe: str, args) -> dict:
    """The pipeline's own stage `probe` (after fetch and prepare) in a clone of its own, nothing else, with the params
    of `recipe` (the probe reads its resolution and train.crop: eval's resize)."""
    clone = fresh_clone(args.workdir / f"probe-{recipe}")
    set_params(clone, pipeline_overrides(recipe, args.data, args.weights, len(args.cpus), args.epochs))
    seconds = run_logged(["dvc", "repro", "probe"], clone, clone / "run.log", environment(len(args.cpus)))
    report = json.loads((clone / "metrics/probe_report.json").read_text())
    return {"tool": "linear probe", "recipe": f"the pipeline's stage probe at {recipe}'s eval preprocessing: "
            "logistic regression on frozen pooled features", "top1": report["top1"], "top5": report["top5"],
            "mean_class_accuracy": report["mean_class_accuracy"], "C": report["regularization"],
            "held_out_scores": report["held_out_accuracy"],
            "feature_images_per_s": {"train": report["feature_images_per_s"]}, "tta_top1": None,
            "wall_s": round(seconds, 1), "epochs": None}


def set_params(clone: Path, overrides: dict) -> None:
    """params.yaml as `dvc exp run -S` would leave it, without running anything."""
    import yaml

    params = yaml.safe_load((clone / "params.yaml").read_text())
    for key, value in overrides.items():
        section, name = key.split(".")
        params[section][name] = yaml.safe_load(str(value))
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def num_classes(data: Path) -> int:
    return sum(1 for path in (data / "train").iterdir() if path.is_dir())


def print_table() -> None:
    for folder in sorted(path for path in RESULTS.iterdir() if path.is_dir()):
        print(f"\n{folder.name}\n")
        print_dataset_table([row for path in sorted(folder.glob("*.json"))
                             if (row := json.loads(path.read_text()))["top1"] is not None])


def print_dataset_table(rows: list[dict]) -> None:
    print("| Run | Recipe | Resolution | Epochs | Test top-1 | Its linear probe (points over it; images right alone, "
          "exact McNemar p) | Mean per-class | "
          "TTA top-1 | Wall time | Train images/s (min / median / max over epochs) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        speed = row.get("train_images_per_s")
        speed_text = (f"{speed['min']} / {speed['median']} / {speed['max']}" if speed
                      else f"features: {row['feature_images_per_s']['train']}")
        tta = f"{row['tta_top1']:.2%}" if row.get("tta_top1") is not None else "-"
        probe = row.get("probe_top1")  # the probe stage of the pipeline run's own clone
        pair = row.get("against_probe")
        noise = (f"; {pair['only_fine_tune_right']} vs {pair['only_probe_right']} right alone, "
                 f"p {pair['mcnemar_p']:.2g}") if pair else ""
        probe_text = f"{probe:.2%} ({(row['top1'] - probe) * 100:+.2f}{noise})" if probe is not None else "-"
        print(f"| {row['tool']} | {row['recipe']} | {row.get('resolution', 160)} | {row.get('epochs') or '-'} | "
              f"{row['top1']:.2%} | {probe_text} | {row['mean_class_accuracy']:.2%} | {tta} | "
              f"{row['wall_s'] / 60:.1f} min | "
              f"{speed_text} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", help="pipeline:<recipe>, timm:<recipe>, probe[:<recipe>], throughput")
    parser.add_argument("--data", type=Path, help="a built dataset folder (train/, test/): Stanford Cars, Caltech-101")
    parser.add_argument("--dataset", help="the name its results are filed under (default: the folder's name)")
    parser.add_argument("--weights", type=Path, help="EfficientNet-Lite0 weights (build_imagenet_lite0.py)")
    parser.add_argument("--timm-train", type=Path, help="timm's train.py")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/real_data"))
    parser.add_argument("--cpus", type=lambda s: [int(c) for c in s.split(",")], default=[0])
    parser.add_argument("--epochs", type=int, default=BASE["train.epochs"])
    parser.add_argument("--rounds", type=int, default=3, help="throughput: pairs of runs")
    parser.add_argument("--table", action="store_true", help="print the tables of benchmarks/real_data/*/*.json")
    args = parser.parse_args()
    if args.table:
        return print_table()
    os.sched_setaffinity(0, args.cpus)
    for name in ("data", "weights"):
        if getattr(args, name) is None or not getattr(args, name).exists():
            sys.exit(f"--{name} is missing or does not exist (see this module's docstring)")
    args.data, args.weights = args.data.resolve(), args.weights.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = RESULTS / (args.dataset or args.data.name)
    results.mkdir(parents=True, exist_ok=True)
    # The code the parts run: each clones HEAD as it is now
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    for part in args.parts:
        tool, _, recipe = part.partition(":")
        print(f"real_data: {part} on CPUs {args.cpus}", flush=True)
        if tool == "pipeline":
            result = run_pipeline(recipe, args)
        elif tool == "timm":
            result = run_timm(recipe, args)
        elif tool == "probe":
            result = run_probe(recipe or "sgd", args)
        elif tool == "throughput":
            result = run_throughput(args)
        else:
            sys.exit(f"unknown part {part}: pipeline:<recipe>, timm:<recipe>, probe[:<recipe>] or throughput")
        result |= {"dataset": results.name, "epochs": result.get("epochs", args.epochs),
                   "resolution": {**BASE, **RECIPES.get(recipe, {})}["train.resolution"],
                   "commit": commit,
                   "cpus": len(args.cpus), "threads": len(args.cpus), "date": time.strftime("%Y-%m-%d"),
                   "machine": f"{os.cpu_count()}-core CPU, no GPU", "load_average_after": os.getloadavg()}
        # Another epoch count files apart: the 4-epoch results stay what the docs quote
        epochs_apart = tool in ("pipeline", "timm") and args.epochs != BASE["train.epochs"]
        name = ("probe" if part == "probe:sgd" else part.replace(":", "-")) + (
            f"-{args.epochs}-epochs" if epochs_apart else "")
        (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        if result["top1"] is not None:
            print(f"real_data: {part}: test top-1 {result['top1']:.2%}, {result['wall_s'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
