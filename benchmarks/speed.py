"""Speed benchmark: loader per core, train/eval throughput, projected run time.

    python -m benchmarks.speed                      # quick: 2% of a Stanford-Cars-shaped dataset
    python -m benchmarks.speed --fraction 1 --steps 20

It generates JPEGs sized like Stanford Cars (mean ~608x403, 85x62 to 2405x1600), runs them
through this pipeline's `prepare`, and measures side by side, in one process on one core:
  naive    full-size JPEG -> PIL decode -> RandomResizedCrop -> ToTensor -> Normalize (float32)
  pipeline what a loader worker does per image (ImageSplit): the prepared JPEG read from the Arrow split,
           its seeded RandomResizedCrop box drawn from the header, the JPEG decoded at the largest DCT reduction
           (1/2, 1/4, 1/8; Pillow) that leaves the box at least the output size, or whole (TorchCodec) when none
           does -> crop + resize + flip on the uint8 tensor (normalized on the device)
  pipeline, whole decode: the same with every image decoded whole by TorchCodec (the path before DCT scaling)
  pipeline, stored at the eval size: with `prepare.max_short_side` = resolution / 0.875 (256 for 224 px),
           the smallest size the eval transform needs: a recipe choice, measured, not the default
(each path --seconds at a time, in turn, --rounds times; medians, and each ratio's range over the rounds),
the share of crops decoded reduced, the eval transform per core with and without DCT scaling, predict's
eval transform of 12-megapixel photos with and without it (`--loader-only` stops here),
then train-step and eval throughput of the arch on the device present, with synthetic tensors
(the model-only ceiling) and with the real loader, and projects one epoch and the full default run.
Writes benchmarks/results.json (--out) and prints a table. Figures are what this machine measured, nothing else.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision import transforms as v1

from finetune.data import ImageSplit, SeededEpochSampler, make_loader, resolve_workers
from finetune.images import dct_reduction, decode_prepared, jpeg_size, load_pixels, open_header
from finetune.params import Params, load_params
from finetune.preparation import prepare_image
from finetune.runtime import pick_device
from finetune.trainer import Trainer
from finetune.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    eval_transform,
    square_side,
    to_model_input,
    train_transform,
)

CARS_TRAIN, CARS_TEST, CARS_CLASSES = 8144, 8041, 196
RESULTS = Path("benchmarks/results.json")


def cars_like_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs with Stanford Cars' spread of sizes."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        width = int(np.clip(rng.lognormal(np.log(560), 0.38), 85, 2405))
        height = int(np.clip(width / rng.uniform(1.3, 1.7), 62, 1600))
        images.append(photo_like_jpeg(rng, width, height))
    return images


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """Smooth shapes + sensor noise, quality 90."""
    small = rng.integers(0, 256, size=(max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, format="JPEG", quality=90)
    return out.getvalue()


def decode_figures(prepared: list[bytes], seconds: float) -> dict:
    """Milliseconds per image on one core of the decode alone: TorchCodec and Pillow whole, Pillow at each DCT
    reduction (what a reduction saves: the inverse DCT, upsampling and colour conversion of the dropped pixels)."""
    def pillow(encoded: bytes, reduction: int):
        image = open_header(encoded)
        image.draft(None, (image.width // reduction, image.height // reduction))
        image.load()

    decoders = {"torchcodec_whole": decode_prepared, "pillow_whole": lambda b: pillow(b, 1),
                **{f"pillow_1_{r}": (lambda b, r=r: pillow(b, r)) for r in (2, 4, 8)}}
    return {name: round(1000 / per_core_rate(lambda i, d=decode: d(prepared[i]), len(prepared), seconds), 3)
            for name, decode in decoders.items()}


def crop_differences(prepared: list[bytes], resolution: int) -> dict:
    """How the pixels of crops decoded at a DCT reduction differ from the same crops of the whole decode
    (|difference| in levels of 0-255, over every channel of every pixel of the images that were reduced), for
    the generated images and a real photo (matplotlib's sample grace_hopper.jpg, 512x600: train crops of
    40 seeds, and eval, decoded at 1/2)."""
    from matplotlib import cbook

    photo = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes()
    crop, evaluate = train_transform(resolution, hflip=False), eval_transform(Preprocessing(resolution))
    figures = {}
    for name, images, seeds in (("generated", prepared, [0]), ("photo", [photo], range(40))):
        train, evaluation = [], []
        for index, encoded in enumerate(images):
            whole = decode_prepared(encoded)
            for seed in seeds:
                torch.manual_seed(index + seed)
                reduced = crop(encoded)
                torch.manual_seed(index + seed)
                if not torch.equal(reduced, expected := crop(whole)):
                    train.append((reduced.int() - expected.int()).abs())
            if dct_reduction(jpeg_size(encoded), (square_side(resolution),) * 2) > 1:
                evaluation.append((evaluate(encoded).int() - evaluate(whole).int()).abs())
        for path, differences in (("train", train), ("eval", evaluation)):
            if differences:
                levels = torch.cat([d.flatten() for d in differences]).float()
                figures[f"{name}_{path}"] = {"images": len(differences), "mean": round(levels.mean().item(), 2),
                                             "p99": levels.quantile(0.99).item(), "max": levels.max().item()}
    return figures


def phone_photo_figures(resolution: int, count: int, seconds: float) -> dict:
    """predict's path for 12-megapixel photos (4032x3024, a phone camera's), per core: the eval transform of
    the opened photo (decoded at the DCT reduction its resize allows) against the same of the whole decode."""
    rng = np.random.default_rng(1)
    photos = [photo_like_jpeg(rng, 4032, 3024) for _ in range(count)]
    transform = eval_transform(Preprocessing(resolution))
    reduced = per_core_rate(lambda i: transform(open_header(photos[i])), count, seconds)
    whole = per_core_rate(lambda i: transform(load_pixels(open_header(photos[i]))), count, seconds)
    return {"reduction": dct_reduction((4032, 3024), (square_side(resolution),) * 2),
            "images_per_s": round(reduced, 1), "whole_decode_images_per_s": round(whole, 1),
            "speedup": round(reduced / whole, 2)}


def naive_transform(resolution: int) -> v1.Compose:
    return v1.Compose([v1.RandomResizedCrop(resolution), v1.RandomHorizontalFlip(), v1.ToTensor(),
                       v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def per_core_rate(load_one, count: int, seconds: float) -> float:
    """Images/s of load_one(0..count-1), repeated for about `seconds`, in this process on one core."""
    torch.set_num_threads(1)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for index in range(count):
            load_one(index)
            done += 1
    return done / (time.perf_counter() - start)


def naive_rate(full_size: list[bytes], resolution: int, seconds: float) -> float:
    transform = naive_transform(resolution)
    return per_core_rate(lambda i: transform(pil_decode(full_size[i])), len(full_size), seconds)


def pipeline_rate(prepared: list[bytes], resolution: int, seconds: float, decode=None) -> float:
    """(index, seed) keys, as SeededEpochSampler hands them to the workers."""
    images = ImageSplit(as_split(prepared, CARS_CLASSES), train_transform(resolution), decode)
    return per_core_rate(lambda i: images[(i, i)], len(prepared), seconds)


def eval_rate(prepared: list[bytes], resolution: int, seconds: float, decode=None) -> float:
    images = ImageSplit(as_split(prepared, CARS_CLASSES), eval_transform(Preprocessing(resolution)), decode)
    return per_core_rate(lambda i: images[i], len(prepared), seconds)


def reduced_shares(prepared: list[bytes], resolution: int) -> dict:
    """The share of images the train crop (with the seeds pipeline_rate uses) and the eval resize decode at a
    DCT reduction; the rest are decoded whole."""
    crop = train_transform(resolution).transforms[0]
    eval_side = square_side(resolution)
    train, evaluation = 0, 0
    for index, encoded in enumerate(prepared):
        torch.default_generator.manual_seed(index)
        size, _, reduction = crop.plan(encoded)
        train += reduction > 1
        evaluation += dct_reduction(size, (eval_side, eval_side)) > 1
    return {"train_crops_reduced": round(train / len(prepared), 3),
            "eval_images_reduced": round(evaluation / len(prepared), 3)}


def loader_figures(full_size: list[bytes], prepared: list[bytes], stored_small: list[bytes], resolution: int,
                   seconds: float, rounds: int) -> dict:
    """Median images/s of each path over `rounds`, measured in turn within each round, so that a slower or
    faster stretch of a shared machine falls on all of them; each ratio's range is over the rounds."""
    paths = {"naive": lambda: naive_rate(full_size, resolution, seconds),
             "pipeline": lambda: pipeline_rate(prepared, resolution, seconds),
             "pipeline_whole_decode": lambda: pipeline_rate(prepared, resolution, seconds, decode=decode_prepared),
             "pipeline_eval_size": lambda: pipeline_rate(stored_small, resolution, seconds),
             "eval": lambda: eval_rate(prepared, resolution, seconds),
             "eval_whole_decode": lambda: eval_rate(prepared, resolution, seconds, decode=decode_prepared)}
    rates = {name: [] for name in paths}
    for _ in range(rounds):
        for name, measure in paths.items():
            rates[name].append(measure())
    figures = {"rounds": rounds, **reduced_shares(prepared, resolution)}
    for name, values in rates.items():
        figures[f"{name}_images_per_s"] = round(float(np.median(values)), 1)
        if name.startswith("pipeline"):
            per_round = [ours / naive for ours, naive in zip(values, rates["naive"])]
            suffix = name.removeprefix("pipeline").removeprefix("_")
            key = f"ratio_{suffix}" if suffix else "ratio"
            figures[key] = round(float(np.median(values) / np.median(rates["naive"])), 2)
            figures[f"{key}_range"] = [round(min(per_round), 2), round(max(per_round), 2)]
    return figures


def pil_decode(encoded: bytes) -> Image.Image:
    return Image.open(io.BytesIO(encoded)).convert("RGB")


def as_split(encoded: list[bytes], num_classes: int) -> datasets.Dataset:
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(decode=False),
                                  "label": datasets.ClassLabel(num_classes=num_classes)})
    return datasets.Dataset.from_dict({
        "id": [str(i) for i in range(len(encoded))],
        "image": [{"bytes": b, "path": None} for b in encoded],
        "label": [i % num_classes for i in range(len(encoded))],
    }, features=features)


def time_steps(step, batches, warmup: int) -> float:
    """Seconds per step after `warmup` steps; synchronizes the device so queued work is counted."""
    for i, batch in enumerate(batches):
        if i == warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
        step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (i + 1 - warmup)


def model_throughput(params: Params, steps: int, split: datasets.Dataset, workers: int) -> dict:
    """The train step is `train`'s own (Trainer.train_step): same precision, channels_last and torch.compile."""
    resolution, batch_size = params.train.resolution, params.train.batch_size
    device = pick_device()
    torch.set_num_threads(os.cpu_count() or 1)
    trainer = Trainer(params, CARS_CLASSES, device)

    def train_step(batch):
        trainer.train_step([batch])

    @torch.inference_mode()
    def eval_step(batch):
        with trainer.precision.autocast():
            trainer.step_model(to_model_input(batch[0], device, trainer.channels_last))

    warmup = 2
    synthetic = (torch.randint(0, 256, (batch_size, 3, resolution, resolution), dtype=torch.uint8),
                 torch.randint(0, CARS_CLASSES, (batch_size,)))
    trainer.step_model.train()
    synthetic_train = batch_size / time_steps(train_step, [synthetic] * (steps + warmup), warmup)
    loader = make_loader(ImageSplit(split, train_transform(resolution)), batch_size, workers,
                         sampler=SeededEpochSampler(len(split), 0), drop_last=True)
    real_train = batch_size / time_steps(train_step, (b for _, b in zip(range(steps + warmup), loader)), warmup)
    trainer.step_model.eval()
    eval_batch = (synthetic[0].repeat(2, 1, 1, 1), synthetic[1].repeat(2))
    synthetic_eval = 2 * batch_size / time_steps(eval_step, [eval_batch] * (steps + warmup), warmup)
    return {"device": torch.cuda.get_device_name() if trainer.on_cuda else f"CPU ({os.cpu_count()} cores)",
            "precision": trainer.precision.name, "batch_size": batch_size, "loader_workers": workers,
            "train_synthetic_images_per_s": round(synthetic_train, 1),
            "train_real_loader_images_per_s": round(real_train, 1),
            "real_over_synthetic": round(real_train / synthetic_train, 3),
            "eval_synthetic_images_per_s": round(synthetic_eval, 1)}


def projection(throughput: dict, epochs: int) -> dict:
    train_s = CARS_TRAIN / throughput["train_real_loader_images_per_s"]
    eval_s = CARS_TEST / throughput["eval_synthetic_images_per_s"]
    return {"epoch_train_s": round(train_s, 1), "epoch_eval_s": round(eval_s, 1),
            "full_run_h": round(epochs * (train_s + eval_s) / 3600, 2), "epochs": epochs}


def print_table(report: dict) -> None:
    print(f"\n{report['machine']} | {report['date']} | {report['images']} images | arch {report['arch']}")
    decoders = report["decode_ms_per_core"].items()
    print("decode alone, ms per image on one core: " + ", ".join(
        f"{name.replace('_1_', ' 1/').replace('_', ' ')} {ms:.3f}" for name, ms in decoders))
    for res, r in report["resolutions"].items():
        loader, photos = r["loader_per_core"], r["phone_photos_per_core"]
        print(f"\n{res} px (stored <= {loader['stored_short_side']} px)")
        print(f"  loader per core   naive {loader['naive_images_per_s']:8.1f} img/s   pipeline "
              f"{loader['pipeline_images_per_s']:8.1f} img/s   ratio {loader['ratio']:.2f}x "
              f"(rounds: {loader['ratio_range'][0]:.2f}-{loader['ratio_range'][1]:.2f}x; "
              f"medians of {loader['rounds']})")
        print(f"    crops decoded at a DCT reduction {loader['train_crops_reduced']:.1%}; every image decoded whole "
              f"{loader['pipeline_whole_decode_images_per_s']:.1f} img/s ({loader['ratio_whole_decode']:.2f}x); "
              f"stored <= {loader['eval_size_short_side']} px {loader['pipeline_eval_size_images_per_s']:.1f} img/s "
              f"({loader['ratio_eval_size']:.2f}x)")
        print(f"  eval per core     {loader['eval_images_per_s']:.1f} img/s ({loader['eval_images_reduced']:.1%} "
              f"decoded at a DCT reduction); every image decoded whole {loader['eval_whole_decode_images_per_s']:.1f}"
              f" img/s")
        print(f"  predict, 12-MP photos, per core {photos['images_per_s']:.1f} img/s (decoded at "
              f"1/{photos['reduction']}); decoded whole {photos['whole_decode_images_per_s']:.1f} img/s "
              f"({photos['speedup']:.2f}x)")
        for name, d in r["reduced_crop_differences"].items():
            print(f"  {name.replace('_', ' ')} crops decoded reduced ({d['images']}): |difference| from the whole "
                  f"decode's mean {d['mean']:.2f}, p99 {d['p99']:.0f}, max {d['max']:.0f} levels of 255")
        if "model" not in r:
            continue
        model, proj = r["model"], r["projection"]
        print(f"  train ({model['device']}, {model['precision']}, batch {model['batch_size']})   synthetic "
              f"{model['train_synthetic_images_per_s']:.1f} img/s   real loader "
              f"{model['train_real_loader_images_per_s']:.1f} img/s   ({model['real_over_synthetic']:.0%})")
        print(f"  eval synthetic    {model['eval_synthetic_images_per_s']:.1f} img/s")
        print(f"  projected: epoch {proj['epoch_train_s']:.0f} s train + {proj['epoch_eval_s']:.0f} s eval; "
              f"{proj['epochs']} epochs {proj['full_run_h']:.2f} h")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.02, help="share of Stanford Cars' 8,144 train images")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--arch", default=None, help="default: model.arch of params.yaml")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    parser.add_argument("--steps", type=int, default=3, help="timed train/eval steps after 2 warm-up steps")
    parser.add_argument("--workers", type=int, default=-1, help="loader workers; -1: as train.num_workers: -1")
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent on each loader measurement")
    parser.add_argument("--rounds", type=int, default=3, help="loader measurements per path, taken in turn")
    parser.add_argument("--max-short-side", type=int, default=None,
                        help="store the images as prepare.max_short_side does; default: params.yaml's")
    parser.add_argument("--photos", type=int, default=6, help="12-megapixel photos for predict's figure")
    parser.add_argument("--loader-only", action="store_true", help="skip the model's throughput and projection")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON report is written")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    params = load_params()
    arch = args.arch or params.model.arch
    batch_size = args.batch_size or (params.train.batch_size if torch.cuda.is_available() else 8)
    # random init: the speed of a step does not depend on the weights, and nothing is downloaded
    model_params = params.model.model_copy(update={"arch": arch, "weights": "none"})
    count = max(16, round(CARS_TRAIN * args.fraction))
    max_short_side = args.max_short_side or params.prepare.max_short_side
    print(f"generating {count} Stanford-Cars-sized JPEGs and preparing them (max_short_side {max_short_side}) ...")
    full = cars_like_jpegs(count)
    prepared = [prepare_image(b, max_short_side, params.prepare.jpeg_quality).encoded for b in full]
    split = as_split(prepared, CARS_CLASSES)
    workers = resolve_workers(args.workers)

    report = {"date": date.today().isoformat(), "machine": f"{platform.node()} {platform.processor() or ''}".strip(),
              "torch": torch.__version__, "images": count, "arch": arch,
              "decode_ms_per_core": decode_figures(prepared, args.seconds), "resolutions": {}}
    for resolution in args.resolutions:
        eval_side = square_side(resolution)
        stored_small = [prepare_image(b, eval_side, params.prepare.jpeg_quality).encoded for b in full]
        loader = loader_figures(full, prepared, stored_small, resolution, args.seconds, args.rounds)
        loader.update(stored_short_side=max_short_side, eval_size_short_side=eval_side)
        figures = {"loader_per_core": loader, "reduced_crop_differences": crop_differences(prepared, resolution),
                   "phone_photos_per_core": phone_photo_figures(resolution, args.photos, args.seconds)}
        report["resolutions"][resolution] = figures
        if args.loader_only:
            continue
        train_params = params.train.model_copy(update={"resolution": resolution, "batch_size": batch_size})
        run_params = params.model_copy(update={"model": model_params, "train": train_params})
        model = model_throughput(run_params, args.steps, split, workers)
        figures.update(model=model, projection=projection(model, params.train.epochs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
