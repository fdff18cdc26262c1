"""`python -m benchmarks.gpu_check` (`make gpu-check`): before your first long run on a GPU, check the CUDA path.

In a few minutes, on generated data (6 classes, no download), it runs the whole pipeline with the default CUDA
settings (train.amp/channels_last/compile: auto = bf16 autocast, channels_last and torch.compile; the real
loader; DDP over every GPU when there are several) as a real `dvc repro` in a temporary copy of this project,
then checks each path and prints one PASS/FAIL line per path: compile happened, the autocast dtype, a finite
loss, evaluate ran, the exported model agrees with the trained one, DDP (several GPUs), and train images/s
with the real loader against the synthetic-batch ceiling of the same model. Without a usable GPU it says why
and exits with status 2; any FAIL exits with status 1.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
ARCH, RESOLUTION, BATCH, EPOCHS = "resnet50", 224, 64, 3
MIN_LOADER_SHARE = 0.5  # real-loader images/s below half the synthetic ceiling: the loader sets the pace


def make_project(workdir: Path, images: Path, gpus: int) -> Path:
    project = workdir / "project"
    subprocess.run(["git", "clone", "-q", str(REPO), str(project)], check=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(preset="none", source=str(images), val_fraction=0.2, test_fraction=0.0)
    params["model"].update(arch=ARCH, weights="none")
    params["train"].update(resolution=RESOLUTION, batch_size=BATCH * gpus, epochs=EPOCHS, lr=0.05, devices=gpus)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def checks(project: Path, log: str, gpus: int) -> list[tuple[str, bool, str]]:
    start = next((line for line in log.splitlines() if line.startswith("train: ") and " on " in line), "")
    live = json.loads((project / "metrics/train/metrics.json").read_text())
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    export = json.loads((project / "metrics/export.json").read_text())
    autocast = re.search(r"\((bf16|fp16|fp32)", start)
    results = [
        ("compile", "torch.compile (inductor)" in start, start.split(" on ", 1)[-1]),
        ("autocast", bool(autocast) and autocast.group(1) in ("bf16", "fp16"),
         f"dtype {autocast.group(1) if autocast else 'not found'}"),
        ("channels_last", "channels_last" in start, "inputs and weights in NHWC"),
        ("finite loss", math.isfinite(live["train"]["loss"]), f"last train loss {live['train']['loss']:.4f}"),
        ("evaluate", 0 <= evaluation["top1"] <= 1, f"test top-1 {evaluation['top1']:.2%} on generated data"),
        ("export", export["top1_agreement"] == 1,
         f"ONNX vs model: top-1 agreement {export['top1_agreement']:.0%}, "
         f"relative logit difference {export['relative_logit_difference']:.1e}"),
    ]
    if gpus > 1:
        results.append(("ddp", f"{gpus} processes x cuda" in start, f"{gpus} processes"))
    return results


def throughput(project: Path) -> tuple[bool, str]:
    """Train images/s with the real loader against synthetic batches, with train's own Trainer.step."""
    from benchmarks.speed import model_throughput
    from finetune.data import open_split, resolve_workers
    from finetune.params import load_params

    here = Path.cwd()
    os.chdir(project)
    try:
        params = load_params()
        rates = model_throughput(params, 30, open_split("train"), resolve_workers(-1))
    finally:
        os.chdir(here)
    share = rates["real_over_synthetic"]
    return share >= MIN_LOADER_SHARE, (f"{rates['train_real_loader_images_per_s']:.0f} images/s with the real loader, "
                                       f"{rates['train_synthetic_images_per_s']:.0f} synthetic ({share:.0%})")


def main() -> int:
    if not torch.cuda.is_available():
        from finetune.runtime import cuda_unavailable_reason

        print(f"gpu_check: no usable GPU ({cuda_unavailable_reason()}). Nothing to check: see README 'GPU drivers'")
        return 2
    from tests.synthetic import make_image_folder

    gpus = torch.cuda.device_count()
    print(f"gpu_check: {gpus} x {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        images = Path(workdir) / "images"
        make_image_folder(images, per_class={"train": 80, "test": 20})
        project = make_project(Path(workdir), images, gpus)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, capture_output=True, text=True,
                                env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
        log = result.stdout + result.stderr
        if result.returncode != 0:
            print(log[-4000:])
            print(f"FAIL pipeline: `dvc repro` exited with {result.returncode} (its output is above)")
            return 1
        print(f"gpu_check: the whole pipeline ran in {time.perf_counter() - start:.0f} s")
        outcomes = checks(project, log, gpus) + [("loader", *throughput(project))]
    for name, passed, detail in outcomes:
        print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}")
    return 0 if all(passed for _, passed, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
