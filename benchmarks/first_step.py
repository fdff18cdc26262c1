"""How long `dvc exp run -S train.lr=...` takes to start training on an already prepared dataset.

    python -m benchmarks.first_step                  # a Stanford-Cars-sized generated dataset (16,185 JPEGs)
    python -m benchmarks.first_step --fraction 0.1   # a tenth of it, for a quick look

In a clone of this repository's last commit (under --workdir) it writes an image folder shaped like
Stanford Cars (196 classes, 8,144 train / 8,041 test JPEGs sized like the real ones), runs `dvc repro
prepare` once (not timed), commits, then times one `dvc exp run -S train.lr=0.05` from its start to:
  skipped     DVC has checked fetch and prepare and skips them (hashes of data/raw and data/prepared)
  header      train has opened the splits and built the model (random init: nothing is downloaded)
  loop        the first epoch's loop starts (loader workers starting)
  first step  the first training batch has been loaded and gone through one optimizer step
and stops the run there (Ctrl-C). Without a GPU the timed run uses `train.batch_size=8` (--batch-size), so
that the first step's own compute (a batch of 128 takes ~30 s on 2 CPU cores) does not hide the startup:
"first step" is then an upper bound on when training starts. Figures are this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.speed import CARS_CLASSES, CARS_TEST, CARS_TRAIN, cars_like_jpegs

REPO = Path(__file__).resolve().parents[1]
MILESTONES = {
    "skipped": re.compile(rb"Stage 'prepare' didn't change, skipping"),
    "header": re.compile(rb"train: \S+ \(none\) on"),
    "loop": re.compile(rb"epoch 1/\d+:\s+0%"),  # tqdm's first render: the epoch's loader is starting
    "first step": re.compile(rb"epoch 1/\d+:[^\r\n]*?\|\s*[1-9]\d*/\d+ \["),  # tqdm's "| 1/1018 ["
}


def write_image_folder(root: Path, fraction: float) -> dict[str, int]:
    counts = {"train": max(CARS_CLASSES, round(CARS_TRAIN * fraction)),
              "test": max(CARS_CLASSES, round(CARS_TEST * fraction))}
    for split, count in counts.items():
        for index, encoded in enumerate(cars_like_jpegs(count, seed=len(split))):
            folder = root / split / f"class {index % CARS_CLASSES:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index:05d}.jpg").write_bytes(encoded)
    return counts


def run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def make_project(workdir: Path, images: Path) -> Path:
    project = workdir / "project"
    run(["git", "clone", "-q", str(REPO), str(project)], workdir)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(preset="none", source=str(images), val_fraction=0.0, test_fraction=0.0)
    params["model"]["weights"] = "none"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for key, value in (("user.email", "bench@example.com"), ("user.name", "bench")):
        run(["git", "config", key, value], project)
    return project


def time_milestones(project: Path, overrides: list[str], timeout_s: float) -> dict[str, float]:
    """Seconds from the start of `dvc exp run` to each milestone; stops the run after the first step."""
    start = time.perf_counter()
    command = ["dvc", "exp", "run", *[word for override in overrides for word in ("-S", override)]]
    # SIGINT as a terminal has it (a backgrounded shell would pass it on ignored): the run is stopped by Ctrl-C.
    process = subprocess.Popen(command, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, output = {}, b""
    try:
        while len(seen) < len(MILESTONES) and time.perf_counter() - start < timeout_s:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            output += chunk
            for name, pattern in MILESTONES.items():
                if name not in seen and pattern.search(output):
                    seen[name] = round(time.perf_counter() - start, 1)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    missing = [name for name in MILESTONES if name not in seen]
    if missing:
        tail = output.decode(errors="replace")[-3000:]
        sys.exit(f"error: never saw {', '.join(missing)} in the run's output:\n{tail}")
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=1.0, help="share of Stanford Cars' image counts")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/first_step_benchmark"),
                        help="where the data and project go; a prepared project there is reused")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the first step")
    parser.add_argument("--batch-size", type=int, default=None, help="default: params.yaml's on CUDA, 8 without")
    args = parser.parse_args()
    project = args.workdir / "project"
    if (project / "dvc.lock").is_file():
        print(f"reusing the prepared project in {project}")
        run(["git", "checkout", "-q", "--", "params.yaml"], project)  # drop a previous timing's params
        shutil.rmtree(project / "checkpoints", ignore_errors=True)
        counts = {split: sum(1 for _ in (args.workdir / "images" / split).rglob("*.jpg"))
                  for split in ("train", "test")}
        prepared = None
    else:
        if args.workdir.exists():
            sys.exit(f"error: {args.workdir} exists without a prepared project; remove it or pass another --workdir")
        args.workdir.mkdir(parents=True)
        started = time.perf_counter()
        counts = write_image_folder(args.workdir / "images", args.fraction)
        make_project(args.workdir, args.workdir / "images")
        generated = time.perf_counter() - started
        print(f"generated {counts['train']} train + {counts['test']} test JPEGs in {generated:.0f} s; preparing ...")
        started = time.perf_counter()
        run(["dvc", "repro", "prepare"], project)
        run(["git", "add", "-A"], project)
        run(["git", "commit", "-qm", "prepared"], project)
        prepared = round(time.perf_counter() - started, 1)
        print(f"fetch + prepare (once, not timed below): {prepared:.0f} s")

    overrides = ["train.lr=0.05"]
    batch_size = args.batch_size or (None if torch.cuda.is_available() else 8)
    if batch_size:
        overrides.append(f"train.batch_size={batch_size}")
    milestones = time_milestones(project, overrides, args.timeout)
    report = {"images": counts, "fetch_and_prepare_s": prepared,
              "command": "dvc exp run " + " ".join(f"-S {o}" for o in overrides), "seconds_from_start": milestones}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
