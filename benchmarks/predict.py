"""`python -m benchmarks.predict`: images/s of `python -m commands.predict` on a folder of photos, one at a time
(`--batch-size 1 --workers 0`) against its defaults (batches of 8 on the CPU, 64 on a GPU, loader processes
reading the images). `--baseline` also times predict as it was at another commit (`--baseline-commit`; default
BASELINE, before it was batched), checked out into a temporary git worktree.

Generates Stanford-Cars-sized JPEGs (benchmarks.speed.cars_like_jpegs), or photos of one size (`--photo-size
4032x3024`: a phone camera's 12 megapixels), and a checkpoint of the default model
(ResNet-50, 196 classes, 224 px; random weights: the speed does not depend on them), runs predict as a user
would, in a fresh process each time, and reports the wall time of the whole command (start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.speed import cars_like_jpegs, photo_like_jpeg

REPO = Path(__file__).resolve().parents[1]
MODES = {"one at a time": ["--batch-size", "1", "--workers", "0"], "batched (defaults)": []}
BASELINE = "9720300"  # the last commit with the one-image-at-a-time predict, timed with --baseline


def write_photos(folder: Path, count: int, size: tuple[int, int] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if size:
        rng = np.random.default_rng(0)
        for index in range(count):
            (folder / f"photo_{index:05d}.jpg").write_bytes(photo_like_jpeg(rng, *size))
        return
    for start in range(0, count, 250):
        for offset, encoded in enumerate(cars_like_jpegs(min(250, count - start), seed=start)):
            (folder / f"photo_{start + offset:05d}.jpg").write_bytes(encoded)


def photo_size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def write_model(path: Path, arch: str, resolution: int, classes: int) -> None:
    from finetune.checkpoint import Checkpoint, save_checkpoint
    from finetune.model import build_model
    from finetune.transforms import Preprocessing

    model = build_model(arch, classes, "none")
    save_checkpoint(path, model, Checkpoint(arch, [f"class {i:03d}" for i in range(classes)],
                                            Preprocessing(resolution),
                                            {"head": "linear", "head_hidden": 1024, "head_dropout": 0.0}))


def timed_predict(photos: Path, model: Path, extra: list[str], out: Path, code: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "commands.predict", str(photos), "--model", str(model), "--out", str(out),
                    *extra], cwd=code, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, PYTHONPATH=str(code)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--baseline", action="store_true", help="also time predict as of --baseline-commit")
    parser.add_argument("--baseline-commit", default=BASELINE, help=f"default {BASELINE}, before batching")
    parser.add_argument("--photo-size", type=photo_size, default=None, help="WIDTHxHEIGHT; default: Cars-sized")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "predict.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_photos(scratch / "photos", args.images, args.photo_size)
        write_model(scratch / "model.pt", args.arch, args.resolution, 196)
        results = {}
        runs = [(name, extra, REPO) for name, extra in MODES.items()]
        if args.baseline:
            subprocess.run(["git", "worktree", "add", "--detach", str(scratch / "baseline"), args.baseline_commit],
                           cwd=REPO, check=True, capture_output=True)
            runs.insert(0, (f"baseline ({args.baseline_commit})", [], scratch / "baseline"))
        for name, extra, code in runs:
            seconds = timed_predict(scratch / "photos", scratch / "model.pt", extra, scratch / "predictions", code)
            rows = json.loads((scratch / "predictions.json").read_text())["images"]
            assert sum("top" in row for row in rows) == args.images, "every generated photo must be classified"
            results[name] = {"seconds": round(seconds, 1), "images_per_s": round(args.images / seconds, 2)}
            print(f"{name}: {args.images} images in {seconds:.1f} s, {args.images / seconds:.1f} images/s", flush=True)
    if args.baseline:
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=True)
    against = f"baseline ({args.baseline_commit})" if args.baseline else "one at a time"
    speedup = results["batched (defaults)"]["images_per_s"] / results[against]["images_per_s"]
    print(f"batched (defaults) / {against}: {speedup:.2f}x ({args.arch}, {args.resolution} px, {os.cpu_count()} CPUs)")
    photos = "x".join(map(str, args.photo_size)) if args.photo_size else "Stanford-Cars-sized"
    args.out.write_text(json.dumps({"images": args.images, "photos": photos, "arch": args.arch,
                                    "resolution": args.resolution, "cpus": os.cpu_count(), "results": results,
                                    "speedup": round(speedup, 2), "against": against}, indent=2) + "\n")


if __name__ == "__main__":
    main()
