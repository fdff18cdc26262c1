"""fetch: a hub id, an image folder or a save_to_disk folder becomes data/raw (id, image bytes, ClassLabel)."""

from __future__ import annotations

import time
from pathlib import Path

import datasets
import pytest

from finetune.params import DataParams
from finetune.sources import SourceError, check_image_folder, load_folder, load_source, save, source_kind, standardize
from tests.synthetic import class_image, make_image_folder


def data_params(source, **overrides) -> DataParams:
    return DataParams(**{"preset": "none", "source": str(source), "val_fraction": 0.0, "test_fraction": 0.0,
                         **overrides})


def fetch(source, **overrides) -> datasets.DatasetDict:
    params = data_params(source, **overrides)
    if source_kind(str(source)) == "folder":
        return load_folder(check_image_folder(Path(source)))
    return standardize(load_source(params), params)


def test_source_kinds(tmp_path, image_folder):
    assert source_kind("tanganke/stanford_cars") == "hub"
    assert source_kind(str(image_folder)) == "folder"
    with pytest.raises(SourceError, match="does not exist"):
        source_kind(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="does not exist"):
        source_kind("./cars")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SourceError, match="is a file"):
        source_kind(str(tmp_path / "file.txt"))


def test_image_folder_becomes_named_splits_with_ids(image_folder, tmp_path):
    save(fetch(image_folder), tmp_path / "raw")
    splits = datasets.load_from_disk(str(tmp_path / "raw"))
    assert list(splits) == ["train", "test"]
    assert splits["train"].column_names == ["id", "image", "label"]
    assert splits["train"].features["label"].names[:2] == ["Audi A5 Coupe 2012", "Audi S5 Coupe 2012"]
    assert len(splits["test"]) == 6 * 15
    row = splits["test"].cast_column("image", datasets.Image(decode=False))[0]
    assert row["id"] == "test/Audi A5 Coupe 2012/000.jpg"
    assert row["image"]["bytes"][:2] == b"\xff\xd8"  # the JPEG's own bytes are stored, not a path


def test_folder_with_one_class_is_refused(tmp_path):
    make_image_folder(tmp_path, num_classes=1, per_class={"train": 2, "test": 1})
    with pytest.raises(SourceError, match="has 1 class folder"):
        check_image_folder(tmp_path)


def test_folder_without_train_split_is_refused(tmp_path):
    make_image_folder(tmp_path, num_classes=2, per_class={"test": 2})
    with pytest.raises(SourceError, match="needs a train split folder"):
        check_image_folder(tmp_path)


def test_a_flat_folder_of_class_folders_is_told_to_move_them_under_train(tmp_path):
    """A new user's real photos, one folder per class with no split folders, were refused with "needs a train
    split folder": now the message says what to do."""
    make_image_folder(tmp_path, num_classes=3, per_class={"train": 2})
    for class_dir in (tmp_path / "train").iterdir():
        class_dir.rename(tmp_path / class_dir.name)
    (tmp_path / "train").rmdir()
    with pytest.raises(SourceError, match=f"holds class folders .* but no split folders: move your class folders "
                                          f"under {tmp_path}/train/ .*data.test_fraction"):
        check_image_folder(tmp_path)


def test_folder_without_test_split_is_fetched_for_prepare_to_carve(tmp_path):
    make_image_folder(tmp_path, num_classes=2, per_class={"train": 2})
    listing = check_image_folder(tmp_path)
    assert list(listing.files) == ["train"] and len(listing.files["train"]) == 4 and listing.left_out == []


def test_empty_class_folder_is_refused(tmp_path):
    make_image_folder(tmp_path, num_classes=2, per_class={"train": 2, "test": 1})
    (tmp_path / "test" / "Audi S5 Coupe 2012" / "000.jpg").unlink()
    with pytest.raises(SourceError, match="Audi S5 Coupe 2012 holds no image files"):
        check_image_folder(tmp_path)


def test_an_unreadable_class_folder_is_named_not_a_traceback(tmp_path, monkeypatch):
    """Before: a class folder that could not be listed (chmod 000; here faked, as root lists anything) gave a
    PermissionError traceback."""
    make_image_folder(tmp_path, num_classes=2, per_class={"train": 2, "test": 1})
    locked = tmp_path / "test" / "Audi S5 Coupe 2012"
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(SourceError, match=f"cannot list the folder {locked} \\(Permission denied\\): fix its "
                                          f"permissions"):
        check_image_folder(tmp_path)


def test_test_class_unknown_to_train_is_refused(tmp_path):
    make_image_folder(tmp_path, num_classes=2, per_class={"train": 2, "test": 1})
    extra = tmp_path / "test" / "Ghost Car 1999"
    extra.mkdir()
    class_image(0, 2, __import__("numpy").random.default_rng(0)).save(extra / "a.jpg")
    with pytest.raises(SourceError, match="Ghost Car 1999 is not among the train classes"):
        check_image_folder(tmp_path)


def test_val_folder_becomes_validation_split(tmp_path):
    make_image_folder(tmp_path, num_classes=2, per_class={"train": 3, "val": 2, "test": 2})
    assert list(fetch(tmp_path)) == ["train", "validation", "test"]


def test_unreachable_hub_fails_fast_with_the_fix(tmp_path):
    start = time.perf_counter()
    with pytest.raises(SourceError) as caught:
        load_source(data_params("someone/no_such_dataset"))
    assert time.perf_counter() - start < 60
    message = str(caught.value)
    assert "could not load hub dataset 'someone/no_such_dataset' in offline mode" in message
    assert "HF_HUB_OFFLINE=1" in message and "local folder" in message


def saved_dataset(path: Path, label_feature) -> Path:
    rng = __import__("numpy").random.default_rng(0)
    import io

    def encoded(label):
        out = io.BytesIO()
        class_image(label, 2, rng).save(out, format="PNG")
        return {"bytes": out.getvalue(), "path": None}

    features = datasets.Features({"img": datasets.Image(), "fine_label": label_feature})
    split = lambda n: datasets.Dataset.from_dict(  # noqa: E731
        {"img": [encoded(i % 2) for i in range(n)], "fine_label": [i % 2 for i in range(n)]}, features=features)
    datasets.DatasetDict({"train": split(4), "test": split(2), "extra": split(1)}).save_to_disk(str(path))
    return path


def test_saved_dataset_with_other_column_names(tmp_path, capsys):
    source = saved_dataset(tmp_path / "saved", datasets.ClassLabel(names=["cat", "dog"]))
    assert source_kind(str(source)) == "saved"
    splits = fetch(source, image_column="img", label_column="fine_label")
    assert list(splits) == ["train", "test"]
    assert "ignoring split 'extra' (1 images)" in capsys.readouterr().out
    assert splits["train"].features["label"].names == ["cat", "dog"]
    assert splits["train"]["id"] == [f"train/{i:06d}" for i in range(4)]


def test_integer_labels_get_padded_names(tmp_path, capsys):
    source = saved_dataset(tmp_path / "saved", datasets.Value("int64"))
    splits = fetch(source, image_column="img", label_column="fine_label")
    assert splits["train"].features["label"].names == ["0", "1"]
    assert "integer labels without names" in capsys.readouterr().out


def test_wrong_column_param_is_named(tmp_path):
    source = saved_dataset(tmp_path / "saved", datasets.ClassLabel(names=["cat", "dog"]))
    with pytest.raises(SourceError, match="data.image_column 'image' is not a column"):
        fetch(source)


def test_hidden_and_symlinked_folders_are_left_out_and_listed(tmp_path):
    """Before: .x, ..x and symlinked class folders vanished without a word (14 classes became 11)."""
    root, elsewhere = tmp_path / "source", tmp_path / "elsewhere"
    make_image_folder(root, num_classes=5, per_class={"train": 2})
    make_image_folder(elsewhere, num_classes=1, per_class={"train": 2})
    train = root / "train"
    (train / "Audi A5 Coupe 2012").rename(train / ".hidden class")
    (train / "Audi S5 Coupe 2012").rename(train / "..dots")
    (train / "linked class").symlink_to(elsewhere / "train" / "Audi A5 Coupe 2012")
    (train / "BMW M3 Coupe 2012" / ".DS_Store").write_bytes(b"\0")
    listing = check_image_folder(root)
    assert listing.classes == ["BMW M3 Coupe 2012", "Dodge Caliber Wagon 2007", "Dodge Caliber Wagon 2012"]
    reasons = {row["id"]: row["reason"] for row in listing.left_out}
    assert reasons["train/.hidden class"].startswith("hidden folder")
    assert reasons["train/..dots"].startswith("hidden folder")
    assert reasons["train/linked class"].startswith("symlinked folder")
    assert reasons["train/BMW M3 Coupe 2012/.DS_Store"] == "hidden file: left out"
    assert {row["split"] for row in listing.left_out} == {"train"}


def test_a_file_symlink_out_of_the_source_is_refused_one_inside_is_kept(tmp_path):
    """Before: passwd.jpg -> /etc/passwd was copied into data/raw, the DVC cache and so a remote."""
    root = tmp_path / "source"
    make_image_folder(root, num_classes=2, per_class={"train": 2, "test": 1})
    secret = tmp_path / "secret.jpg"
    secret.write_text("root:x:0:0")
    folder = root / "train" / "Audi A5 Coupe 2012"
    (folder / "passwd.jpg").symlink_to(secret)
    (folder / "alias.jpg").symlink_to(folder / "000.jpg")
    listing = check_image_folder(root)
    reasons = {row["id"]: row["reason"] for row in listing.left_out}
    assert "outside data.source: refused" in reasons["train/Audi A5 Coupe 2012/passwd.jpg"]
    save(load_folder(listing), tmp_path / "raw", listing.left_out)
    train = datasets.load_from_disk(str(tmp_path / "raw"))["train"].cast_column("image", datasets.Image(decode=False))
    assert "train/Audi A5 Coupe 2012/alias.jpg" in train["id"]
    assert all(b"root:x" not in row["bytes"] for row in train["image"])
    assert "passwd" in (tmp_path / "raw" / "left_out.json").read_text()


def test_an_unreachable_hub_is_known_in_seconds_not_after_a_minute_of_retries(monkeypatch):
    """Issue 31: a refused hub connection (no network, not in offline mode) took 60 s of the hub client's retries
    before the message; now a 3-second connection probe finds it and the local cache is tried at once."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    for proxy in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    start = time.perf_counter()
    with pytest.raises(SourceError) as caught:
        load_source(data_params("someone/no_such_dataset"))
    assert time.perf_counter() - start < 5
    message = str(caught.value)
    assert "could not load hub dataset 'someone/no_such_dataset' (the hub was unreachable: no connection within 3 s"\
        in message and "HF_HUB_OFFLINE=1" in message


def test_names_that_are_not_utf8_are_kept_escaped_and_said(tmp_path, capsys):
    """Hostile round 3, F1: a Latin-1 class folder (`Citro\\xebn C3`) or file name (`caf\\xe9.jpg`) ended fetch in a
    pyarrow UnicodeEncodeError traceback that named neither. The rule now: kept, each byte that is not UTF-8
    written as \\xNN in the id and the class name, and the count said."""
    import os

    source = tmp_path / "photos"
    make_image_folder(source, num_classes=2, per_class={"train": 3, "test": 2})
    root = os.fsencode(source)
    for split in ("train", "test"):
        first = sorted((source / split).iterdir())[0]
        os.rename(os.fsencode(first), root + f"/{split}/".encode() + b"Citro\xebn C3")
    latin = root + b"/train/Citro\xebn C3/caf\xe9.jpg"
    class_image(0, 2, __import__("numpy").random.default_rng(0)).save(os.fsdecode(latin))
    with open(root + b"/train/Citro\xebn C3/notes\xe9.txt", "w") as notes:  # left out, and listed as such
        notes.write("not an image")
    listing = check_image_folder(source)
    save(load_folder(listing), tmp_path / "raw", listing.left_out)
    left_out = __import__("json").loads((tmp_path / "raw" / "left_out.json").read_text(encoding="utf-8"))
    assert [row["id"] for row in left_out] == ["train/Citro\\xebn C3/notes\\xe9.txt"]
    assert "fetch: 6 image(s) whose folder or file name is not UTF-8" in capsys.readouterr().out
    saved = datasets.load_from_disk(str(tmp_path / "raw"))
    assert "Citro\\xebn C3" in saved["train"].features["label"].names
    assert "train/Citro\\xebn C3/caf\\xe9.jpg" in saved["train"]["id"]
    row = saved["train"].cast_column("image", datasets.Image(decode=False))[saved["train"]["id"].index(
        "train/Citro\\xebn C3/caf\\xe9.jpg")]
    assert row["image"]["bytes"] == open(latin, "rb").read()  # the photo itself, not a name that cannot be opened
