"""Stage `prepare`: decode every image once, make it RGB and at most `prepare.max_short_side` on its shorter
side, and save the splits to data/prepared (a few Arrow shards).

Training then decodes small JPEGs instead of full-size photos, once per epoch and image. An RGB JPEG that needs
no resize, and that training's decoder reads whole, keeps its original bytes (re-encoding would only lose
quality). Images are decoded by a pool of processes in chunks and written to Arrow as they come back, so
memory stays flat however many images there are. Unreadable or refused images are dropped, counted in
metrics/data.json and listed by id in metrics/dropped_images.csv, beside the files fetch left out; an image
that fails in any way is dropped alone, the others go on. The same input gives byte-identical output.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable

import datasets

from finetune.errors import StageError, run_stage
from finetune.files import atomic_dir, scratch_dir, write_csv, write_json
from finetune.params import Params, load_params
from finetune.paths import DATA_METRICS, DROPPED_LIST, DUPLICATES_LIST, PREPARED_DIR, RAW_DIR
from finetune.preparation import (
    DUPLICATE_COLUMNS,
    SPLITS,
    SplitReport,
    carve_splits,
    check_split_layout,
    duplicate_counts,
    duplicate_images,
    left_out_by_fetch,
    split_metrics,
    write_split,
)


def prepare(params: Params) -> None:
    if not (RAW_DIR / "dataset_dict.json").is_file():
        raise StageError(f"{RAW_DIR} is missing or incomplete: run `dvc repro fetch` (or `dvc pull`)")
    raw = datasets.load_from_disk(str(RAW_DIR))
    check_split_layout(list(raw), params.data)
    names = raw["train"].features["label"].names
    workers = params.prepare.num_workers or os.cpu_count() or 1
    with scratch_dir(PREPARED_DIR.with_name("prepare-work")) as work:
        written = {name: write_split(name, RAW_DIR, params.prepare, workers, work) for name in SPLITS if name in raw}
        train = written["train"]
        carved = carve_splits(train, {"test": params.data.test_fraction, "validation": params.data.val_fraction},
                              params.data.split_seed)
        outputs, labels, members = {}, {}, {}
        for name in SPLITS:
            if name in carved:
                rows = carved[name]
                fingerprint = hashlib.sha256(f"{train.fingerprint} {name} {rows.tolist()}".encode())
                outputs[name] = train.dataset.select(rows, new_fingerprint=fingerprint.hexdigest()[:32])
                labels[name] = [train.labels[i] for i in rows]
                members[name] = ([train.ids[i] for i in rows], [train.hashes[i] for i in rows])
            elif name in written:
                outputs[name] = written[name].dataset
                labels[name] = written[name].labels
                members[name] = (written[name].ids, written[name].hashes)
        with atomic_dir(PREPARED_DIR) as out:
            datasets.DatasetDict(outputs).save_to_disk(str(out), max_shard_size="500MB")
    report_data(names, labels, {name: split.report for name, split in written.items()},
                duplicate_images(members, labels, names))



def report_data(names: list[str], labels: dict[str, list[int]], reports: dict[str, SplitReport],
                duplicates: list[dict]) -> None:
    left_out = left_out_by_fetch()
    dropped = [row for report in reports.values() for row in report.dropped]
    write_csv(DROPPED_LIST, dropped + [{**row, "reason": f"fetch: {row['reason']}"} for row in left_out],
              ["split", "id", "reason"])
    write_csv(DUPLICATES_LIST, duplicates, DUPLICATE_COLUMNS)
    train_labels = set(labels["train"])
    without_train = [name for i, name in enumerate(names) if i not in train_labels]
    write_json(DATA_METRICS, {
        "classes": len(names),
        "dropped": len(dropped),
        "ignored_files": len(left_out),
        **duplicate_counts(duplicates),
        "classes_without_train_images": len(without_train),
        "splits": {name: split_metrics(split_labels, reports.get(name), len(names))
                   for name, split_labels in labels.items()},
    })
    sizes = ", ".join(f"{name} {len(split_labels)}" for name, split_labels in labels.items())
    print(f"prepare: {sizes} images kept; {len(dropped)} unreadable or refused dropped, {len(left_out)} files left "
          f"out by fetch (all listed in {DROPPED_LIST})")
    for row in dropped[:10]:
        print(f"  dropped {row['id']}: {row['reason']}")
    copies = [row for row in duplicates if "copy of" in row["kind"]]
    warn(copies, lambda row: f"{row['image']} is the same image as {row['same_as']}",
         f"image(s) appear in two splits (the same bytes; all listed in {DUPLICATES_LIST}); a test copy of a train "
         "image is not held out. Remove the copies from the source")
    warn([row for row in duplicates if "labelled differently" in row["kind"]],
         lambda row: f"{row['image']} is the same image as {row['same_as']}: labelled {row['label']!r} here and "
                     f"{row['same_as_label']!r} there",
         f"image(s) carry two labels (the same bytes under two classes; listed in {DUPLICATES_LIST}). Keep each "
         "photo in its one right class")
    warn(without_train, lambda name: name, "class(es) have no train image left (all dropped or left out); the "
         "model cannot learn them. Add images or remove the class")



def warn(items: list, describe: Callable, what: str) -> None:
    if items:
        print(f"prepare: warning: {len(items)} {what}:\n" + "\n".join(f"  {describe(item)}" for item in items[:10])
              + ("\n  ..." if len(items) > 10 else ""), file=sys.stderr)



def main() -> None:
    prepare(load_params(look_up_models=False))


if __name__ == "__main__":
    run_stage(main)
