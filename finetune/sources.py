"""Data sources: a Hugging Face hub dataset id, a local image folder (`split/class name/image`) or a folder
written by `save_to_disk`, loaded with `datasets` and standardized to the columns id, image (encoded bytes) and
label (a ClassLabel holding the class names).
"""

from __future__ import annotations

import json
import os
import re
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import datasets

from finetune.errors import StageError
from finetune.files import atomic_dir, escaped
from finetune.images import IMAGE_SUFFIXES
from finetune.params import DataParams
from finetune.paths import LEFT_OUT_FILES

REQUIRED_SPLITS = ("train",)  # no test split: prepare carves one out of train (data.test_fraction)
SPLIT_ALIASES = {"train": "train", "test": "test", "validation": "validation", "valid": "validation",
                 "val": "validation"}
SPLIT_ORDER = ("train", "validation", "test")
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class SourceError(StageError):
    pass


@dataclass
class FolderListing:
    """What fetch takes from an image folder, and what it leaves out (with the reason, for prepare to list)."""

    root: Path
    classes: list[str] = field(default_factory=list)
    files: dict[str, list[tuple[Path, int]]] = field(default_factory=dict)  # split -> (file, class index)
    left_out: list[dict] = field(default_factory=list)  # {"split", "id", "reason"}

    def leave_out(self, path: Path, reason: str) -> None:
        relative = escaped(path.relative_to(self.root).as_posix())  # a name that is not UTF-8 as \\xNN
        self.left_out.append({"split": relative.split("/")[0], "id": relative, "reason": reason})


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


def check_image_folder(root: Path) -> FolderListing:
    """The image files of a folder laid out split/class name/image, and what is left out and why; refuses
    layouts that cannot train. Hidden and symlinked folders are left out (and listed), file symlinks may point
    anywhere inside the folder but never outside it (a link to /etc/passwd must not reach the DVC cache)."""
    listing = FolderListing(root)
    splits = split_folders(root, listing)
    if "train" not in splits:
        raise SourceError(no_train_split(root))
    listing.classes = sorted(p.name for p in entries(splits["train"]) if usable_folder(p))
    if len(listing.classes) < 2:
        raise SourceError(f"data.source folder {splits['train']} has {len(listing.classes)} class folder(s); "
                          f"at least 2 are needed")
    for split, folder in splits.items():
        listing.files[split] = list_split_folder(folder, listing)
    if listing.left_out:
        print(f"fetch: left out {len(listing.left_out)} file(s) or folder(s) (listed in metrics/dropped_images.csv "
              f"by prepare): " + "; ".join(f"{row['id']}: {row['reason']}" for row in listing.left_out[:5])
              + (" ..." if len(listing.left_out) > 5 else ""))
    return listing


def split_folders(root: Path, listing: FolderListing) -> dict[str, Path]:
    """Split name (train, validation, test) -> its folder; anything else at the top is left out and listed."""
    splits = {}
    for entry in entries(root):
        if usable_folder(entry, listing):
            split = SPLIT_ALIASES.get(entry.name)
            if split is None:
                listing.leave_out(entry, "not a split folder (train, validation/val/valid, test): left out")
            elif split in splits:
                raise SourceError(f"{root} has two {split} folders ({splits[split].name}, {entry.name}); keep one")
            else:
                splits[split] = entry
        elif not entry.is_dir():
            listing.leave_out(entry, "a file outside the split/class folders: left out")
    return splits


def no_train_split(root: Path) -> str:
    """What to do about a folder without train/: a flat folder of class folders is told how to move them."""
    folders = [p for p in entries(root) if p.is_dir()]
    found = ", ".join(p.name for p in folders[:8]) + (f", ... ({len(folders)} folders)" if len(folders) > 8
                                                       else "") if folders else "no folders"
    if len(folders) >= 2 and all(any(child.is_file() for child in entries(folder)) for folder in folders):
        return (f"data.source folder {root} holds class folders ({found}) but no split folders: move your class "
                f"folders under {root}/train/ (mkdir {root}/train && mv the class folders into it), and set "
                f"data.test_fraction (0.2 is usual) to carve a test split out of train, or add {root}/test/ with "
                f"the same class folders")
    return (f"data.source folder {root} needs a train split folder (and test, or data.test_fraction > 0 to carve "
            f"one out of train; optionally validation), each holding one folder per class; found {found}")


def list_split_folder(folder: Path, listing: FolderListing) -> list[tuple[Path, int]]:
    """(image, label) of each class folder of a split; a class train lacks, or an empty one, is refused."""
    files = []
    for class_dir in entries(folder):
        if not usable_folder(class_dir, listing):  # a hidden or symlinked folder is listed by usable_folder
            if not class_dir.is_dir():
                listing.leave_out(class_dir, "a file outside the class folders: left out")
            continue
        if class_dir.name not in listing.classes:
            raise SourceError(f"class folder {class_dir} is not among the train classes; add it to train or "
                              f"remove it")
        images = list_class_folder(class_dir, listing)
        if not images:
            raise SourceError(f"class folder {class_dir} holds no image files; add images or remove the folder")
        files += [(image, listing.classes.index(class_dir.name)) for image in images]
    return files


def entries(folder: Path) -> list[Path]:
    """A folder's entries, sorted; one that cannot be listed (permissions, a dead mount) names itself."""
    try:
        return sorted(folder.iterdir())
    except OSError as error:
        raise SourceError(f"cannot list the folder {folder} ({error.strerror or type(error).__name__}): fix its "
                          f"permissions (chmod +rx), or move it out of data.source") from None


def usable_folder(path: Path, listing: FolderListing | None = None) -> bool:
    """A real, visible folder. Hidden and symlinked folders are left out; with a listing, they are listed."""
    if not path.is_dir():
        return False
    reason = None
    if path.name.startswith("."):
        reason = "hidden folder (its name starts with '.'): left out"
    elif path.is_symlink():
        reason = "symlinked folder: left out (point data.source at the real folder, or copy it in)"
    if reason and listing is not None:
        listing.leave_out(path, reason)
    return reason is None


def list_class_folder(class_dir: Path, listing: FolderListing) -> list[Path]:
    """The image files of one class folder (by suffix), each a regular file readable here and inside the source."""
    images = []
    for path in entries(class_dir):
        reason = None
        if path.is_dir():
            reason = "a folder inside a class folder: left out (images must sit directly in the class folder)"
        elif path.name.startswith("."):
            reason = "hidden file: left out"
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            reason = "no image file suffix: left out"
        elif path.is_symlink() and not path.resolve().is_relative_to(listing.root.resolve()):
            reason = f"symlink to {path.resolve()}, outside data.source: refused"
        elif not path.is_file():
            reason = "not a regular file (a broken link, a device or a pipe): left out"
        elif not os.access(path, os.R_OK):
            reason = "not readable (permissions): left out"
        if reason:
            listing.leave_out(path, reason)
        else:
            images.append(path)
    return images


def load_folder(listing: FolderListing) -> datasets.DatasetDict:
    """The listed files as splits (id = the path inside the folder, image = the file's bytes, label). The bytes
    are read as save_to_disk writes each batch, so memory stays flat however many images there are."""
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(decode=False),
                                  "label": datasets.ClassLabel(names=[escaped(name) for name in listing.classes])})
    foreign = [path for files in listing.files.values() for path, _ in files if not utf8(str(path))]
    if foreign:
        print(f"fetch: {len(foreign)} image(s) whose folder or file name is not UTF-8 (e.g. "
              f"{escaped(foreign[0].relative_to(listing.root).as_posix())}): kept, their names written with \\xNN "
              f"for each byte that is not UTF-8")
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({
            "id": [escaped(path.relative_to(listing.root).as_posix()) for path, _ in files],
            # a name Arrow cannot store: its bytes read now (few), under the escaped name
            "image": [{"path": str(path), "bytes": None} if utf8(str(path)) else
                      {"path": escaped(str(path)), "bytes": path.read_bytes()} for path, _ in files],
            "label": [label for _, label in files],
        }, features=features)
        for split, files in sorted(listing.files.items(), key=lambda item: SPLIT_ORDER.index(item[0]))
    })


def utf8(text: str) -> bool:
    """Whether a name is UTF-8 (Python keeps the other bytes of a file name as lone surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


HUB_PROBE_SECONDS = 3  # a connection to the hub (or the proxy) not made in this long: the hub is unreachable


def hub_reachable() -> bool:
    """Whether a TCP connection to the hub (HF_ENDPOINT, or the https proxy when one is set) opens within
    HUB_PROBE_SECONDS. Without this, a refused or unroutable connection costs about a minute of the hub client's
    retries before the same error."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
    target = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}") if proxy else endpoint
    default_port = 443 if target.scheme == "https" else 80
    try:
        socket.create_connection((target.hostname, target.port or default_port), HUB_PROBE_SECONDS).close()
        return True
    except (OSError, ValueError, TypeError):
        return False


@contextmanager
def hub_offline():
    """The hub clients' offline mode for one call (they read these flags at call time): the local cache only."""
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_source(data: DataParams) -> datasets.DatasetDict:
    """A saved DatasetDict or a hub dataset, as its author laid it out (standardize renames it). When the hub
    cannot be reached, the local cache is used (what a run offline has), found in seconds."""
    kind = source_kind(data.source)
    if kind == "saved":
        return datasets.load_from_disk(data.source)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    unreachable = not offline and not hub_reachable()
    try:
        with hub_offline() if unreachable else nullcontext():
            return datasets.load_dataset(data.source, revision=data.revision)
    except Exception as error:  # the hub raises many types; each means the same to the user
        where = (" in offline mode" if offline else
                 f" (the hub was unreachable: no connection within {HUB_PROBE_SECONDS} s; not in the local cache "
                 f"either)" if unreachable else "")
        raise SourceError(
            f"could not load hub dataset '{data.source}'{where}: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
            f"To fix: run `dvc repro fetch` once where huggingface.co is reachable (the download is cached in "
            f"{datasets.config.HF_DATASETS_CACHE}), then set HF_HUB_OFFLINE=1 to work from that cache; "
            f"or set data.source to a local folder laid out split/class name/image."
        ) from None


def standardize(splits: datasets.DatasetDict, data: DataParams) -> datasets.DatasetDict:
    """Splits named train/validation/test; columns id, image, label (ClassLabel)."""
    renamed = {}
    for name, split in splits.items():
        standard = SPLIT_ALIASES.get(name)
        if standard is None:
            print(f"fetch: ignoring split '{name}' ({len(split)} images): only train, validation and test are used")
            continue
        renamed[standard] = standardize_columns(split, data, name)
    missing = [s for s in REQUIRED_SPLITS if s not in renamed]
    if missing:
        raise SourceError(f"data.source '{data.source}' has splits {list(splits)}; it needs a train split")
    names = renamed["train"].features["label"].names
    for name, split in renamed.items():
        if split.features["label"].names != names:
            raise SourceError(f"split '{name}' of '{data.source}' has other class names than train")
    return datasets.DatasetDict({s: renamed[s] for s in SPLIT_ORDER if s in renamed})


def standardize_columns(split: datasets.Dataset, data: DataParams, split_name: str) -> datasets.Dataset:
    for param, column in (("image_column", data.image_column), ("label_column", data.label_column)):
        if column not in split.column_names:
            raise SourceError(f"data.{param} '{column}' is not a column of split '{split_name}' "
                              f"(columns: {split.column_names})")
    if not isinstance(split.features[data.image_column], datasets.Image):
        raise SourceError(f"data.image_column '{data.image_column}' is a {split.features[data.image_column]}, "
                          f"not an Image")
    split = split.cast_column(data.image_column, datasets.Image(decode=False))
    ids = image_ids(split, split_name)
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


def image_ids(split: datasets.Dataset, split_name: str) -> list[str]:
    """Stable ids to name images in reports: an `id` column, or split/row."""
    if "id" in split.column_names:
        return [str(i) for i in split["id"]]
    return [f"{split_name}/{i:06d}" for i in range(len(split))]


def save(splits: datasets.DatasetDict, out: Path, left_out: list[dict] = ()) -> None:
    """The splits, and beside them the files left out, for prepare to count and list."""
    with atomic_dir(out) as tmp:
        splits.save_to_disk(str(tmp), max_shard_size="500MB")
        (tmp / LEFT_OUT_FILES.name).write_text(json.dumps(list(left_out), indent=1, ensure_ascii=False) + "\n")
