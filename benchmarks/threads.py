"""`python -m benchmarks.threads`: training images/s by PyTorch CPU thread count, on an idle and a busy machine.

What `train.num_threads: auto` is chosen from. Each measurement is a fresh process training ResNet-18 (random
init, SGD) with the pipeline's own loader (one worker: TorchCodec decode + RandomResizedCrop + flip of
Stanford-Cars-sized JPEGs stored at <= 512 px, as prepare stores them) for a fixed number of steps after a
warm-up. "busy" runs one process spinning on the CPU beside it, as other work on a shared machine would.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {64: 32, 224: 8}  # resolution -> batch size
BUSY = "while True: pass"


def measure(resolution: int, batch: int, threads: int, steps: int, warmup: int) -> float:
    """Images/s of `steps` training steps in this process (called in a fresh process per setting)."""
    import torch
    import torchvision

    from benchmarks.speed import cars_like_jpegs
    from finetune.data import make_loader
    from finetune.images import decode_prepared
    from finetune.preparation import prepare_image
    from finetune.transforms import to_model_input, train_transform

    torch.set_num_threads(threads)
    images = [prepare_image(b, 512, 95).encoded for b in cars_like_jpegs(64)]
    transform = train_transform(resolution)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 10**6

        def __getitem__(self, index):
            return transform(decode_prepared(images[index % len(images)])), index % 10

    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = iter(make_loader(Images(), batch, workers=1))
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        x, y = next(loader)
        loss = torch.nn.functional.cross_entropy(model(to_model_input(x, torch.device("cpu"), False)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def run_one(resolution: int, threads: int, busy: bool, steps: int, warmup: int) -> float:
    burner = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        out = subprocess.run([sys.executable, "-m", "benchmarks.threads", "--one", str(resolution), str(threads),
                              str(steps), str(warmup)], cwd=REPO, capture_output=True, text=True, check=True)
    finally:
        if burner:
            burner.kill()
            burner.wait()
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=4, type=int, metavar=("RESOLUTION", "THREADS", "STEPS", "WARMUP"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="each setting is measured this often; medians")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "threads.json")
    args = parser.parse_args()
    if args.one:
        resolution, threads, steps, warmup = args.one
        print(measure(resolution, SETTINGS[resolution], threads, steps, warmup))
        return
    results = []
    for resolution in SETTINGS:
        for busy in (False, True):
            for threads in args.threads:
                rates = sorted(run_one(resolution, threads, busy, args.steps, args.warmup) for _ in range(args.rounds))
                results.append({"resolution": resolution, "batch": SETTINGS[resolution], "busy": busy,
                                "threads": threads, "images_per_s": rates[len(rates) // 2], "all": rates})
                print(f"{resolution:>4} px batch {SETTINGS[resolution]:>2} {'busy' if busy else 'idle'}  "
                      f"{threads} thread(s): {rates[len(rates) // 2]:7.1f} images/s  (rounds: "
                      + ", ".join(f"{rate:.1f}" for rate in rates) + ")", flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
