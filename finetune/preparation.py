"""Preparing images once for training: decode, make RGB, shrink to `prepare.max_short_side`, keep the
bytes when nothing needs changing, refuse what cannot be read; split carving and dataset statistics.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from datasets.arrow_writer import ArrowWriter
from datasets.table import MemoryMappedTable
from PIL import Image
from tqdm import tqdm

from finetune.errors import StageError
from finetune.images import (
    ImageRejected,
    check_jpeg_scan,
    exif_orientation,
    jpeg_size,
    load_pixels,
    open_header,
)
from finetune.params import PrepareParams
from finetune.paths import LEFT_OUT_FILES
from finetune.pool import ordered_results
from finetune.splits import stratified_assignment

CHUNK = 32  # images per task sent to a decode process
WRITER_BATCH = 64  # images per Arrow record batch written
SPLITS = ("train", "validation", "test")


def prepared_features(class_names: list[str]) -> datasets.Features:
    return datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                              "label": datasets.ClassLabel(names=class_names)})


@dataclass
class Prepared:
    encoded: bytes | None = None
    width: int = 0  # as found in the source
    height: int = 0
    stored_short_side: int = 0
    mode: str = ""
    reencoded: bool = False
    source_hash: str = ""  # of the source bytes: the same image in two splits is reported
    error: str = ""


def scaled_size(size: tuple[int, int], max_short_side: int) -> tuple[int, int] | None:
    """The size with the shorter side brought down to max_short_side; None if already small enough."""
    width, height = size
    short = min(width, height)
    if short <= max_short_side:
        return None
    scale = max_short_side / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def the_loader_decodes(encoded: bytes, image: Image.Image) -> bool:
    """Whether training's own decoder reads these bytes whole, at the size their header gives (the crop box is
    drawn from it): kept bytes must never fail mid-epoch. Those it refuses go through Pillow, which re-encodes
    what it can read and reports what it cannot. Corrupt data is refused (check_jpeg_scan)."""
    whole = check_jpeg_scan(encoded, image)
    return whole is not None and jpeg_size(encoded) == (whole.shape[-1], whole.shape[-2])


def prepare_image(encoded: bytes, max_short_side: int, jpeg_quality: int) -> Prepared:
    """One image, every step inside the error handling: whatever fails, this image alone is dropped."""
    result = Prepared(source_hash=hashlib.sha1(encoded or b"").hexdigest())
    try:
        image = open_header(encoded)  # the header only; bombs and extreme aspect ratios are refused here
        result.width, result.height, result.mode = image.width, image.height, image.mode
        target = scaled_size(image.size, max_short_side)
        decodes = image.format == "JPEG" and the_loader_decodes(encoded, image)  # every JPEG: corrupt ones refused
        if (image.format == "JPEG" and image.mode == "RGB" and exif_orientation(image) == 1 and target is None
                and decodes):
            result.encoded, result.stored_short_side = encoded, min(image.size)
            return result
        image = load_pixels(image, draft_size=target)
        if target := scaled_size(image.size, max_short_side):
            image = image.resize(target, Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=jpeg_quality)
        result.encoded, result.stored_short_side, result.reencoded = out.getvalue(), min(image.size), True
    except ImageRejected as rejected:
        result.error = str(rejected)
    except Exception as error:  # conversion or encoding of a legal but odd image (sizes JPEG cannot hold...)
        result.error = f"{type(error).__name__}: {error}"
    return result


_OPEN_SPLITS: dict[tuple[str, str], datasets.Dataset] = {}


def prepare_rows(raw_dir: str, split: str, start: int, stop: int, max_short_side: int,
                 jpeg_quality: int) -> list[Prepared]:
    """Rows start..stop of a raw split, in a decode process (which opens the memory-mapped split once)."""
    key = (raw_dir, split)
    if key not in _OPEN_SPLITS:
        _OPEN_SPLITS[key] = datasets.load_from_disk(raw_dir)[split].cast_column("image", datasets.Image(decode=False))
    images = _OPEN_SPLITS[key][start:stop]["image"]
    return [prepare_image(image["bytes"] or b"", max_short_side, jpeg_quality) for image in images]


@dataclass
class SplitReport:
    images: int = 0
    dropped: list[dict] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    stored_short_sides: list[int] = field(default_factory=list)
    converted_modes: Counter = field(default_factory=Counter)
    reencoded: int = 0


@dataclass
class WrittenSplit:
    """A prepared split on disk, memory-mapped, with its kept rows' labels and source hashes."""

    dataset: datasets.Dataset
    fingerprint: str  # of the content: ids, labels and prepared bytes
    labels: list[int]
    ids: list[str]
    hashes: list[str]
    report: SplitReport


def write_split(name: str, raw_dir: Path, params: PrepareParams, workers: int, work: Path) -> WrittenSplit:
    """Prepares split `name` of the raw DatasetDict in `raw_dir` into an Arrow file in `work`, a chunk of images at a
    time, each chunk decoded by one of `workers` processes."""
    _OPEN_SPLITS.clear()  # forked processes must open what is on disk now
    raw = datasets.load_from_disk(str(raw_dir))[name]
    features = prepared_features(raw.features["label"].names)
    num_classes = features["label"].num_classes
    tasks = ((str(raw_dir), name, start, min(start + CHUNK, len(raw)), params.max_short_side, params.jpeg_quality)
             for start in range(0, len(raw), CHUNK))
    chunks = ordered_results(prepare_rows, tasks, workers)
    report, digest = SplitReport(), hashlib.sha256(name.encode())
    labels, ids, hashes = [], [], []
    path = work / f"{name}.arrow"
    writer = ArrowWriter(features=features, path=str(path), writer_batch_size=WRITER_BATCH)
    rows = zip(raw["id"], raw["label"], (result for chunk in chunks for result in chunk))
    for image_id, label, result in tqdm(rows, total=len(raw), desc=f"prepare {name}", unit="img"):
        report.images += 1
        if not result.error and not 0 <= label < num_classes:
            result.error = f"label {label} outside the {num_classes} classes"
        if result.error:
            report.dropped.append({"split": name, "id": image_id, "reason": result.error})
            continue
        writer.write({"id": image_id, "image": {"bytes": result.encoded, "path": None}, "label": label})
        digest.update(f"{image_id}\0{label}\0".encode() + hashlib.sha1(result.encoded).digest())
        labels.append(label)
        ids.append(image_id)
        hashes.append(result.source_hash)
        report.widths.append(result.width)
        report.heights.append(result.height)
        report.stored_short_sides.append(result.stored_short_side)
        report.reencoded += result.reencoded
        if result.mode != "RGB":
            report.converted_modes[result.mode] += 1
    writer.finalize()
    writer.close()
    # The fingerprint is the content's: DVC sees byte-identical output for the same input, and train's resume
    # check compares it.
    fingerprint = digest.hexdigest()[:32]
    dataset = datasets.Dataset(MemoryMappedTable.from_file(str(path)), info=datasets.DatasetInfo(features=features),
                               fingerprint=fingerprint)
    return WrittenSplit(dataset, fingerprint, labels, ids, hashes, report)


PARAM_OF_SPLIT = {"test": "data.test_fraction", "validation": "data.val_fraction"}


def carve_splits(train: WrittenSplit, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Row indices of train for train and each split of `fractions` (those > 0), stratified by label. A class
    keeps at least one train image, so a class of one image gives none away: a carved split left empty is an
    error, and classes left out of it are reported."""
    fractions = {split: fraction for split, fraction in fractions.items() if fraction > 0}
    assignment = stratified_assignment(train.labels, fractions, seed)
    carved = {split: np.flatnonzero(assignment == split) for split in ("train", *fractions)}
    per_class = np.bincount(np.asarray(train.labels, dtype=np.int64)) if train.labels else np.array([], int)
    for split, fraction in fractions.items():
        if len(carved[split]) == 0:
            raise StageError(f"{PARAM_OF_SPLIT[split]}={fraction:g} carved no {split} image out of train: every class "
                             f"keeps at least one train image, and the largest class has {per_class.max(initial=0)}. "
                             f"Add images, or give the source a {split} split")
        missing = len(set(train.labels) - set(np.asarray(train.labels)[carved[split]].tolist()))
        if missing:
            print(f"prepare: warning: {missing} class(es) have no {split} image ({PARAM_OF_SPLIT[split]}="
                  f"{fraction:g} takes none from a class of one image): their {split} accuracy is not measured",
                  file=sys.stderr)
    return carved


def check_split_layout(splits: list[str], data) -> None:
    """Each of validation and test comes from the source or is carved from train, never both or neither (test)."""
    for split, key in (("validation", "val_fraction"), ("test", "test_fraction")):
        if split in splits and getattr(data, key) > 0:
            raise StageError(f"data.source already has a {split} split; set data.{key}: 0 to use it, "
                             f"or remove that split from the source to carve one out of train")
    if "test" not in splits and data.test_fraction == 0:
        raise StageError("data.source has no test split: set data.test_fraction (e.g. 0.1, or a data.preset that "
                         "does) to carve a stratified test split out of train")


def stats(values: list[int | float]) -> dict:
    if not values:
        return {"min": 0, "mean": 0, "max": 0}
    return {"min": int(min(values)), "mean": round(float(np.mean(values)), 1), "max": int(max(values))}


def split_metrics(labels: list[int], report: SplitReport | None, num_classes: int) -> dict:
    per_class = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()
    metrics = {
        "images": len(labels),
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


DUPLICATE_COLUMNS = ["image", "label", "same_as", "same_as_label", "kind"]


def duplicate_images(members: dict[str, tuple[list[str], list[str]]], labels: dict[str, list[int]],
                     names: list[str]) -> list[dict]:
    """Every image whose source bytes were seen before it (splits in the order train, validation, test), naming
    the first copy: a copy in another split (a test image that is a train image is not held out: it lifts the
    test score), or the same photo under another label, in any split. A copy under the same label in the same
    split is harmless and not listed."""
    first_seen: dict[str, tuple[str, str, int]] = {}
    rows = []
    for split in SPLITS:
        ids, digests = members.get(split, ([], []))
        for image_id, digest, label in zip(ids, digests, labels.get(split, [])):
            if digest not in first_seen:
                first_seen[digest] = (split, image_id, label)
                continue
            other_split, other_id, other_label = first_seen[digest]
            kinds = ([f"{split} copy of a {other_split} image"] if other_split != split else []) + (
                ["labelled differently"] if label != other_label else [])
            if kinds:
                rows.append({"image": qualified(split, image_id), "label": names[label],
                             "same_as": qualified(other_split, other_id), "same_as_label": names[other_label],
                             "kind": "; ".join(kinds)})
    return rows


def duplicate_counts(rows: list[dict]) -> dict[str, int]:
    """What data.json says of them: copies across splits, test images that are train images (the only ones that
    can lift the test score), and photos under two labels."""
    return {"duplicates_across_splits": sum(1 for row in rows if "copy of" in row["kind"]),
            "test_copies_of_train": sum(1 for row in rows if "test copy of a train image" in row["kind"]),
            "conflicting_labels": sum(1 for row in rows if "labelled differently" in row["kind"])}


def qualified(split: str, image_id: str) -> str:
    """An image id with its split in front (a folder's ids already start with it)."""
    return image_id if image_id.startswith(f"{split}/") else f"{split}/{image_id}"


def left_out_by_fetch() -> list[dict]:
    return json.loads(LEFT_OUT_FILES.read_text()) if LEFT_OUT_FILES.is_file() else []


