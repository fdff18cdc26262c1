"""Output files are written to a temporary name and renamed into place, so an interrupted stage never leaves
a truncated model or metrics file for DVC to cache. A full disk is a StageError naming the file, not a raw
OSError from deep inside torch or json; temporary leftovers of a killed run are removed by the next one."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.errors import StageError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fresh_temporary_sibling(path: Path) -> Path:
    """This process's temporary name beside `path`, nothing there, and the leftovers of dead processes gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = temporary_sibling(path)
    remove(tmp)
    return tmp


def remove(path: Path) -> None:
    """A file or a folder, whichever `path` is, if it exists."""
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def remove_stale_siblings(path: Path) -> list[Path]:
    """Deletes `.NAME.tmpPID` leftovers of processes that are gone (a killed stage); returns them."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp(\d+)")
    removed = []
    for candidate in path.parent.glob(f".{path.name}.tmp*") if path.parent.is_dir() else []:
        match = pattern.fullmatch(candidate.name)
        if match and not process_alive(int(match.group(1))):
            remove(candidate)
            removed.append(candidate)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def disk_full_as_stage_error(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
        raise StageError(f"no space left on the device while writing {path} ({free / 2**20:.0f} MiB free): "
                         f"free some space (e.g. `dvc gc -w` drops cached outputs of old runs) and run again") from None


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds."""
    path = Path(path)
    tmp = fresh_temporary_sibling(path)
    try:
        with disk_full_as_stage_error(path):
            yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yields a fresh temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = fresh_temporary_sibling(path)
    try:
        with disk_full_as_stage_error(path):
            yield tmp
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def scratch_dir(path: Path | str) -> Iterator[Path]:
    """A fresh temporary folder beside `path` (named as atomic_dir names its own), always deleted afterwards."""
    path = Path(path)
    tmp = fresh_temporary_sibling(path)
    tmp.mkdir()
    try:
        with disk_full_as_stage_error(path):
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_torch(path: Path | str, data) -> None:
    """torch.save, atomically. Through a Python file object: torch's own writer reports a full disk as
    'unexpected pos', this one as ENOSPC."""
    import torch  # here: fetch and prepare write no tensors and need not import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(data, f)


class TorchFileUnreadable(Exception):
    """A file torch.load(weights_only=True) refuses or cannot read; the message is the reason, for a person."""


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
LEGACY_MAGIC = b"\x80"  # a pickle protocol header: torch.save's format before 1.6


def refused_pickle(error: str) -> str:
    """What weights_only refused, in words, without torch's advice to allow-list the class (advice a user cannot
    and should not follow for a file that may be hostile)."""
    named = re.search(r"GLOBAL ([\w.]+)", error)
    what = named.group(1) if named else ""
    if re.search(r"(^|\.)(models?|nn\.modules)\.|^__main__\.", what):
        return (f"it holds a whole pickled model ({what}, as torch.save(model) writes), which loading would have to "
                f"run: refused (files are read with weights_only=True). Save its weights instead: "
                f"torch.save(model.state_dict(), path)")
    return ("it holds Python objects that loading would have to run, refused (files are read with weights_only=True)"
            + (f": {what}" if what else ""))


def read_torch(path: Path | str):
    """torch.load(path, weights_only=True): tensors and plain Python values only, never code. Anything else is a
    TorchFileUnreadable saying what the file is, without torch's advice to retry with weights_only=False (wrong
    advice for a file that may be hostile)."""
    import pickle

    import torch

    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((ZIP_MAGIC, LEGACY_MAGIC)):
        raise TorchFileUnreadable(f"not a PyTorch file (it starts with {head!r}; torch.save writes a zip archive)"
                                  if head else "an empty file (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only met something that is not a tensor or a plain value
        raise TorchFileUnreadable(refused_pickle(str(error))) from None
    except Exception as error:  # truncated zip, a foreign archive, a legacy file with objects
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        first = re.split(r" In PyTorch 2\.6, we changed", first)[0]  # torch's weights_only=False advice
        raise TorchFileUnreadable(f"{type(error).__name__}: {first}") from None


def escaped(text: str) -> str:
    """Text UTF-8 can hold: the bytes of a file name that were not UTF-8 (Python keeps them as lone surrogates,
    which no UTF-8 file can store) written as \\xNN, e.g. a Latin-1 `caf\\xe9.jpg`."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that did not come from a byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def escaped_values(data):
    if isinstance(data, str):
        return escaped(data)
    if isinstance(data, dict):
        return {escaped_values(key): escaped_values(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [escaped_values(value) for value in data]
    return data


def write_json(path: Path | str, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(escaped_values(data), indent=2, ensure_ascii=False) + "\n")


def write_csv(path: Path | str, rows: list[dict], columns: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(escaped_values(rows))


def read_csv(path: Path | str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_json(path: Path | str, made_by: str):
    """A JSON output of another stage; a missing one says which stage makes it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(f"{path} not found: run `dvc repro {made_by}` first") from None


def file_digest(path: Path | str) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (a weights file can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
