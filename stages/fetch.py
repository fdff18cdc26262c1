"""Stage `fetch`: load `data.source` with Hugging Face `datasets` and save its splits to data/raw.

A source is a hub dataset id (default tanganke/stanford_cars), a local image folder
laid out `split/class name/image`, or a folder written by `save_to_disk`. The output
is a DatasetDict in a few Arrow shards (DVC is slow on many small files) with the
columns id, image (encoded bytes) and label (a ClassLabel holding the class names).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import datasets

from stages.data import IGNORED_FILES, RAW_DIR
from stages.files import atomic_dir
from stages.params import DataParams, load_params_or_exit

REQUIRED_SPLITS = ("train",)  # no test split: prepare carves one out of train (data.test_fraction)
SPLIT_ALIASES = {"train": "train", "test": "test", "validation": "validation", "valid": "validation", "val": "validation"}
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class SourceError(ValueError):
    pass


def source_kind(source: str) -> str:
    """'folder', 'saved' or 'hub', checked before anything is loaded."""
    path = Path(source).expanduser()
    if path.is_dir():
        return "saved" if (path / "dataset_dict.json").is_file() else "folder"
    if path.exists():
        raise SourceError(f"data.source '{source}' is a file; it must be a folder or a hub dataset id")
    if source.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(source):
        raise SourceError(
            f"data.source '{source}' does not exist. Give an existing folder (laid out split/class name/image, "
            f"or written by Dataset.save_to_disk) or a Hugging Face hub dataset id such as tanganke/stanford_cars"
        )
    return "hub"


def check_image_folder(root: Path) -> list[str]:
    """Files in class folders that are not images (by suffix); refuses layouts that cannot train."""
    splits = {SPLIT_ALIASES.get(p.name): p for p in sorted(root.iterdir()) if p.is_dir()}
    missing = [s for s in REQUIRED_SPLITS if s not in splits]
    if missing:
        found = ", ".join(p.name for p in root.iterdir() if p.is_dir()) or "no folders"
        raise SourceError(
            f"data.source folder {root} needs a train split folder (and test, or data.test_fraction > 0 to carve "
            f"one out of train; optionally validation), each holding one folder per class; found {found}"
        )
    classes = sorted(p.name for p in splits["train"].iterdir() if p.is_dir())
    if len(classes) < 2:
        raise SourceError(f"data.source folder {splits['train']} has {len(classes)} class folder(s); at least 2 are needed")
    ignored = []
    for split, folder in splits.items():
        if split is None:
            continue
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            if class_dir.name not in classes:
                raise SourceError(f"class folder {class_dir} is not among the train classes; add it to train or remove it")
            files = [f for f in class_dir.iterdir() if f.is_file()]
            if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in files):
                raise SourceError(f"class folder {class_dir} holds no image files; add images or remove the folder")
            ignored += [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
    names = [str(f.relative_to(root)) for f in ignored]
    if names:
        print(f"fetch: ignored {len(names)} file(s) without an image suffix: {', '.join(names[:5])}"
              f"{' ...' if len(names) > 5 else ''}")
    return names


def load_source(data: DataParams) -> datasets.DatasetDict:
    kind = source_kind(data.source)
    if kind == "saved":
        return datasets.load_from_disk(data.source)
    if kind == "folder":
        return datasets.load_dataset("imagefolder", data_dir=str(Path(data.source).expanduser()))
    try:
        return datasets.load_dataset(data.source, revision=data.revision)
    except Exception as error:  # the hub raises many types; each means the same to the user
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        raise SourceError(
            f"could not load hub dataset '{data.source}'{' in offline mode' if offline else ''}: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
            f"To fix: run `dvc repro fetch` once where huggingface.co is reachable (the download is cached in "
            f"{datasets.config.HF_DATASETS_CACHE}), then set HF_HUB_OFFLINE=1 to work from that cache; "
            f"or set data.source to a local folder laid out split/class name/image."
        ) from None


def standardize(splits: datasets.DatasetDict, data: DataParams, kind: str) -> datasets.DatasetDict:
    """Splits named train/validation/test; columns id, image, label (ClassLabel)."""
    renamed = {}
    for name, split in splits.items():
        standard = SPLIT_ALIASES.get(name)
        if standard is None:
            print(f"fetch: ignoring split '{name}' ({len(split)} images): only train, validation and test are used")
            continue
        renamed[standard] = standardize_columns(split, data, name, kind)
    missing = [s for s in REQUIRED_SPLITS if s not in renamed]
    if missing:
        raise SourceError(f"data.source '{data.source}' has splits {list(splits)}; it needs a train split")
    names = renamed["train"].features["label"].names
    for name, split in renamed.items():
        if split.features["label"].names != names:
            raise SourceError(f"split '{name}' of '{data.source}' has other class names than train")
    return datasets.DatasetDict({s: renamed[s] for s in ("train", "validation", "test") if s in renamed})


def standardize_columns(split: datasets.Dataset, data: DataParams, split_name: str, kind: str) -> datasets.Dataset:
    for param, column in (("image_column", data.image_column), ("label_column", data.label_column)):
        if column not in split.column_names:
            raise SourceError(f"data.{param} '{column}' is not a column of split '{split_name}' (columns: {split.column_names})")
    if not isinstance(split.features[data.image_column], datasets.Image):
        raise SourceError(f"data.image_column '{data.image_column}' is a {split.features[data.image_column]}, not an Image")
    split = split.cast_column(data.image_column, datasets.Image(decode=False))
    ids = image_ids(split, data.image_column, split_name, kind)
    split = split.select_columns([data.image_column, data.label_column])
    split = split.rename_columns({data.image_column: "image", data.label_column: "label"})
    split = as_class_label(split, split_name)
    return split.add_column("id", ids).select_columns(["id", "image", "label"])


def as_class_label(split: datasets.Dataset, split_name: str) -> datasets.Dataset:
    feature = split.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return split
    if feature.dtype == "string":
        return split.class_encode_column("label")
    labels = split["label"]
    width = len(str(max(labels)))
    names = [str(i).zfill(width) for i in range(max(labels) + 1)]
    print(f"fetch: split '{split_name}' has integer labels without names; naming classes {names[0]}..{names[-1]}")
    return split.cast_column("label", datasets.ClassLabel(names=names))


def image_ids(split: datasets.Dataset, image_column: str, split_name: str, kind: str) -> list[str]:
    """Stable ids to name images in reports: the file path for folders, an `id` column, or split/row."""
    if kind == "folder":
        paths = split.data.column(image_column).combine_chunks().field("path").to_pylist()
        return [f"{split_name}/{Path(p).parent.name}/{Path(p).name}" for p in paths]
    if "id" in split.column_names:
        return [str(i) for i in split["id"]]
    return [f"{split_name}/{i:06d}" for i in range(len(split))]


def save(splits: datasets.DatasetDict, out: Path, ignored_files: list[str] = ()) -> None:
    """The splits, and beside them the ignored files for prepare to count and report."""
    with atomic_dir(out) as tmp:
        splits.save_to_disk(str(tmp), max_shard_size="500MB")
        (tmp / IGNORED_FILES).write_text(json.dumps(list(ignored_files), indent=1) + "\n")


def main() -> None:
    params = load_params_or_exit()
    try:
        kind = source_kind(params.data.source)
        ignored = check_image_folder(Path(params.data.source).expanduser()) if kind == "folder" else []
        splits = standardize(load_source(params.data), params.data, kind)
    except SourceError as error:
        sys.exit(f"error: {error}")
    save(splits, RAW_DIR, ignored)
    names = splits["train"].features["label"].names
    sizes = ", ".join(f"{name} {len(split)}" for name, split in splits.items())
    print(f"fetch: {params.data.source} ({kind}) -> {RAW_DIR}: {len(names)} classes; {sizes} images")


if __name__ == "__main__":
    main()
