"""Stage `fetch`: load `data.source` with Hugging Face `datasets` and save its splits to data/raw.

A source is a hub dataset id (default tanganke/stanford_cars), a local image folder
laid out `split/class name/image`, or a folder written by `save_to_disk`. The output
is a DatasetDict in a few Arrow shards (DVC is slow on many small files) with the
columns id, image (encoded bytes) and label (a ClassLabel holding the class names).
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import run_stage
from finetune.params import load_params
from finetune.paths import RAW_DIR
from finetune.sources import (
    check_image_folder,
    load_folder,
    load_source,
    save,
    source_kind,
    standardize,
)


def main() -> None:
    params = load_params(look_up_models=False)
    kind = source_kind(params.data.source)
    if kind == "folder":
        listing = check_image_folder(Path(params.data.source).expanduser())
        splits, left_out = load_folder(listing), listing.left_out
    else:
        splits, left_out = standardize(load_source(params.data), params.data), []
    save(splits, RAW_DIR, left_out)
    names = splits["train"].features["label"].names
    sizes = ", ".join(f"{name} {len(split)}" for name, split in splits.items())
    print(f"fetch: {params.data.source} ({kind}) -> {RAW_DIR}: {len(names)} classes; {sizes} images")


if __name__ == "__main__":
    run_stage(main)
