"""Stage `prepare`: decode every image once, make it RGB and at most `prepare.max_short_side`
on its shorter side, and save the splits to data/prepared (a few Arrow shards).

Training then decodes small JPEGs instead of full-size photos, once per epoch and
image. An RGB JPEG that needs no resize, and that training's decoder reads whole, keeps
its original bytes (re-encoding would only lose quality). Unreadable images are dropped,
counted in metrics/data.json and listed by id in metrics/dropped_images.csv. The same
input gives byte-identical output.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from stages.data import IGNORED_FILES, PREPARED_DIR, RAW_DIR, decode_prepared
from stages.files import atomic_dir, write_csv, write_json
from stages.params import PrepareParams, load_params_or_exit

DATA_METRICS = Path("metrics/data.json")
DROPPED_LIST = Path("metrics/dropped_images.csv")
EXIF_ORIENTATION = 0x0112


@dataclass
class Prepared:
    encoded: bytes | None = None
    width: int = 0  # as found in the source
    height: int = 0
    stored_short_side: int = 0
    mode: str = ""
    reencoded: bool = False
    error: str = ""


def scaled_size(size: tuple[int, int], max_short_side: int) -> tuple[int, int] | None:
    """The size with the shorter side brought down to max_short_side; None if already small enough."""
    width, height = size
    short = min(width, height)
    if short <= max_short_side:
        return None
    scale = max_short_side / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited onto white, 16-bit grey scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257
        return Image.fromarray(grey.round().astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image.convert("RGBA"))
        return background.convert("RGB")
    return image.convert("RGB")


def the_loader_decodes(encoded: bytes) -> bool:
    """Whether training's own decoder reads these bytes whole: kept bytes must never fail mid-epoch. Those it
    refuses go through Pillow, which re-encodes what it can read and reports what it cannot."""
    try:
        decode_prepared(encoded)
    except RuntimeError:
        return False
    return True


def prepare_image(encoded: bytes, max_short_side: int, jpeg_quality: int) -> Prepared:
    if not encoded:
        return Prepared(error="empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(encoded))  # the header only
        result = Prepared(width=image.width, height=image.height, mode=image.mode)
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        target = scaled_size(image.size, max_short_side)
        if (image.format == "JPEG" and image.mode == "RGB" and orientation == 1 and target is None
                and the_loader_decodes(encoded)):
            result.encoded, result.stored_short_side = encoded, min(image.size)
            return result
        if image.format == "JPEG" and target:
            image.draft(None, target)  # decode at 1/2, 1/4 or 1/8 scale in the DCT: big photos decode several times faster
        image.load()  # a full decode: truncated or corrupt data raises here
    except UnidentifiedImageError:
        return Prepared(error="not an image format Pillow can read")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return Prepared(error=f"{type(error).__name__}: {error}")
    image = to_rgb(ImageOps.exif_transpose(image))
    if target := scaled_size(image.size, max_short_side):
        image = image.resize(target, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=jpeg_quality)
    result.encoded, result.stored_short_side, result.reencoded = out.getvalue(), min(image.size), True
    return result


def _prepare_star(args) -> Prepared:
    return prepare_image(*args)


@dataclass
class SplitReport:
    images: int = 0
    dropped: list[dict] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    stored_short_sides: list[int] = field(default_factory=list)
    converted_modes: Counter = field(default_factory=Counter)
    reencoded: int = 0


def prepare_split(name: str, split: datasets.Dataset, params: PrepareParams, pool) -> tuple[dict, SplitReport]:
    """Columns (id, image bytes, label) of the kept images, and what was seen on the way."""
    num_classes = split.features["label"].num_classes
    rows = split.iter(batch_size=256)
    tasks = ((row["bytes"], params.max_short_side, params.jpeg_quality) for batch in rows for row in batch["image"])
    results = pool.imap(_prepare_star, tasks, chunksize=32) if pool else map(_prepare_star, tasks)
    kept = {"id": [], "image": [], "label": []}
    report = SplitReport()
    ids, labels = split["id"], split["label"]
    for image_id, label, result in tqdm(zip(ids, labels, results), total=len(split), desc=f"prepare {name}", unit="img"):
        report.images += 1
        if not result.error and not 0 <= label < num_classes:
            result.error = f"label {label} outside the {num_classes} classes"
        if result.error:
            report.dropped.append({"split": name, "id": image_id, "reason": result.error})
            continue
        kept["id"].append(image_id)
        kept["image"].append({"bytes": result.encoded, "path": None})
        kept["label"].append(label)
        report.widths.append(result.width)
        report.heights.append(result.height)
        report.stored_short_sides.append(result.stored_short_side)
        report.reencoded += result.reencoded
        if result.mode != "RGB":
            report.converted_modes[result.mode] += 1
    return kept, report


def stratified_assignment(labels: list[int], fractions: dict[str, float], seed: int) -> np.ndarray:
    """The split name of each row: per class, round(n * fraction) rows (at least one) go to each split of
    `fractions`, chosen by `seed`; the rest, at least one, stay in train."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    assignment = np.full(len(labels), "train", dtype=object)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for split, fraction in fractions.items():
            count = min(max(1, round(len(rows) * fraction)), len(rows) - start - 1)
            assignment[rows[start:start + count]] = split
            start += max(count, 0)
    return assignment


def carve_splits(train: dict, fractions: dict[str, float], seed: int) -> dict[str, dict]:
    """train's columns divided into train and the splits of `fractions` (those > 0), stratified by label."""
    fractions = {split: fraction for split, fraction in fractions.items() if fraction > 0}
    assignment = stratified_assignment(train["label"], fractions, seed)
    return {split: {key: [v for v, s in zip(values, assignment) if s == split] for key, values in train.items()}
            for split in ("train", *fractions)}


def check_split_layout(splits: list[str], data) -> None:
    """Each of validation and test comes from the source or is carved from train, never both or neither (test)."""
    for split, key in (("validation", "val_fraction"), ("test", "test_fraction")):
        if split in splits and getattr(data, key) > 0:
            sys.exit(f"error: data.source already has a {split} split; set data.{key}: 0 to use it, "
                     f"or remove that split from the source to carve one out of train")
    if "test" not in splits and data.test_fraction == 0:
        sys.exit("error: data.source has no test split: set data.test_fraction (e.g. 0.1, or a data.preset that "
                 "does) to carve a stratified test split out of train")


def stats(values: list[int | float]) -> dict:
    if not values:
        return {"min": 0, "mean": 0, "max": 0}
    return {"min": int(min(values)), "mean": round(float(np.mean(values)), 1), "max": int(max(values))}


def split_metrics(columns: dict, report: SplitReport | None, num_classes: int) -> dict:
    per_class = np.bincount(columns["label"], minlength=num_classes).tolist()
    metrics = {
        "images": len(columns["label"]),
        "images_per_class": stats(per_class),
        "classes_without_images": sum(count == 0 for count in per_class),
    }
    if report is not None:  # a split read from the source (not one carved out of train)
        metrics |= {
            "images_in_source": report.images,
            "dropped": len(report.dropped),
            "width": stats(report.widths),
            "height": stats(report.heights),
            "stored_short_side": stats(report.stored_short_sides),
            "reencoded": report.reencoded,
            "converted_to_rgb": dict(sorted(report.converted_modes.items())),
        }
    return metrics


def save_prepared(columns_by_split: dict, features: datasets.Features, out: Path) -> None:
    splits = datasets.DatasetDict({
        name: datasets.Dataset.from_dict(columns, features=features) for name, columns in columns_by_split.items()
    })
    with atomic_dir(out) as tmp:
        splits.save_to_disk(str(tmp), max_shard_size="500MB")


def main() -> None:
    params = load_params_or_exit()
    raw = datasets.load_from_disk(str(RAW_DIR))
    check_split_layout(list(raw), params.data)
    names = raw["train"].features["label"].names
    workers = params.prepare.num_workers or os.cpu_count() or 1
    columns_by_split, reports = {}, {}
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for name, split in raw.items():
            split = split.cast_column("image", datasets.Image(decode=False))
            columns_by_split[name], reports[name] = prepare_split(name, split, params.prepare, pool)
    finally:
        if pool:
            pool.close()
    columns_by_split |= carve_splits(columns_by_split["train"], {"test": params.data.test_fraction,
                                                                 "validation": params.data.val_fraction},
                                     params.data.split_seed)
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=names)})
    ordered = {s: columns_by_split[s] for s in ("train", "validation", "test") if s in columns_by_split}
    save_prepared(ordered, features, PREPARED_DIR)

    ignored_path = RAW_DIR / IGNORED_FILES
    ignored = json.loads(ignored_path.read_text()) if ignored_path.is_file() else []
    dropped = [row for report in reports.values() for row in report.dropped]
    dropped += [{"split": name.split("/")[0], "id": name, "reason": "no image file suffix: left out by fetch"}
                for name in ignored]
    write_csv(DROPPED_LIST, dropped, ["split", "id", "reason"])
    write_json(DATA_METRICS, {
        "classes": len(names),
        "dropped": len(dropped) - len(ignored),
        "ignored_files": len(ignored),
        "splits": {s: split_metrics(c, reports.get(s), len(names)) for s, c in ordered.items()},
    })
    sizes = ", ".join(f"{s} {len(c['label'])}" for s, c in ordered.items())
    print(f"prepare: {sizes} images kept; {len(dropped) - len(ignored)} unreadable dropped, {len(ignored)} "
          f"non-image files left out (all listed in {DROPPED_LIST})")
    for row in dropped[:10]:
        print(f"  dropped {row['id']}: {row['reason']}")


if __name__ == "__main__":
    main()
