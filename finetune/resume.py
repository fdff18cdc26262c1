"""The resume state of an unfinished training run: written after every epoch, read when train starts.

It holds the weights, optimizer, scheduler, loss scaler, every RNG state and the metrics logged so far, as
tensors and plain Python values only, so it is read with torch.load(weights_only=True): a planted or foreign
file cannot run code. They are serialized once more inside the file with their SHA-256 beside them: torch checks
no checksum, and a state damaged on disk or in transfer would otherwise resume (into NaNs blamed on the lr).

Each run has its own file, named by its fingerprint (the params that shape training, and the prepared data), so
a run with other params in the same train.state_dir never touches an unfinished run's state, and deletes only
its own when it ends. An unreadable, foreign or damaged state is ignored with one line, and the run starts fresh;
a finished one (the run stopped after its last epoch, before writing the model) finishes the run. It is not a
DVC output: DVC would delete it before the stage runs (see dvc.yaml).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from finetune.errors import StageError
from finetune.files import TorchFileUnreadable, read_torch, save_torch

FORMAT = "transfer-learning-train-state/4"  # 3: with the EMA weights; 4: checksummed, one file per fingerprint
STATE_PREFIX = "train_state-"  # + the fingerprint's digest + .pt
# Train params a resumed run may change: loader processes, CPU threads (they change the order of float sums, so a
# resume is bit-exact only with the same thread count, but not the recipe), the device choice, and where the
# state is kept.
NOT_AFFECTING_RESULTS = ("num_workers", "num_threads", "device", "state_dir")


@dataclass
class Progress:
    """Everything about the run so far that is not in the model/optimizer state."""

    epochs_done: int = 0
    history: list[dict] = field(default_factory=list)  # the metrics logged per epoch, replayed on resume
    best_accuracy: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None


def run_fingerprint(model_params: dict, train_params: dict, data_fingerprints: dict) -> dict:
    """What must match for a saved state to be resumed: the params that shape training, and the data."""
    train = {k: v for k, v in train_params.items() if k not in NOT_AFFECTING_RESULTS}
    return {"model": model_params, "train": train, "data": data_fingerprints}


def state_path(state_dir: str | Path, fingerprint: dict) -> Path:
    """This run's state file in train.state_dir: the same on every machine for the same params and data."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return Path(state_dir).expanduser() / f"{STATE_PREFIX}{digest}.pt"


def refuse_blocked_state_files(state_dir: str | Path) -> None:
    """Something other than a file (a folder, a FIFO) at a state file's name would make train's first save fail
    after a whole epoch, and again on every rerun: refused before any work."""
    folder = Path(state_dir).expanduser()
    blocked = sorted(p for p in folder.glob(f"{STATE_PREFIX}*.pt") if not p.is_file()) if folder.is_dir() else []
    if blocked:
        kind = "a folder" if blocked[0].is_dir() else "not a regular file"
        raise StageError(f"{blocked[0]} is {kind}, at the name where train saves a run's resume state"
                         + (f" ({len(blocked)} such names in {folder})" if len(blocked) > 1 else "")
                         + ": move it away, or set train.state_dir to another folder")


def check_writable_state_dir(state_dir: Path) -> None:
    """A real write: as root os.access says yes to almost anything (/sys, /proc), and a FUSE bucket mount can
    accept permissions it then refuses. Folders created for the check are removed again."""
    existing = next(folder for folder in (state_dir, *state_dir.parents) if folder.exists())
    created = [folder for folder in (state_dir, *state_dir.parents) if not folder.exists()]
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=state_dir).close()
    except OSError as error:
        raise StageError(f"train.state_dir {state_dir} cannot be written ({existing}: {error.strerror}): mount "
                         f"the shared storage, fix its permissions, or set train.state_dir: checkpoints") from None
    finally:
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()


def refuse_unusable_state_dir(state_dir: str | Path) -> None:
    """check and train both: a train.state_dir that cannot be written, or a name where a state file goes that is
    taken by something else, would fail after the first epoch's work."""
    check_writable_state_dir(Path(state_dir).expanduser())
    refuse_blocked_state_files(state_dir)


def other_states(path: Path) -> list[Path]:
    """Unfinished runs of other params or data kept beside this run's state (left alone, never deleted)."""
    folder = path.parent
    return sorted(p for p in folder.glob(f"{STATE_PREFIX}*.pt") if p != path) if folder.is_dir() else []


def rng_states() -> dict:
    """The data order and augmentation are seeded per epoch (SeededEpochSampler); these cover anything else.
    numpy's and Python's states become tensors and lists, which weights_only loading accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "python": [version, list(python_state), gauss],
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))


def save_state(path: Path, trainer, progress: Progress, fingerprint: dict) -> None:
    """trainer: a finetune.trainer.Trainer (model, optimizer, scheduler, precision.scaler)."""
    save_torch(path, pack({
        "format": FORMAT,
        "fingerprint": fingerprint,
        "progress": progress.__dict__,
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.precision.scaler.state_dict(),
        "rng": rng_states(),
    }))


def pack(state: dict) -> dict:
    """The state serialized inside an outer record with its SHA-256, which `unpack` verifies."""
    serialized = io.BytesIO()
    torch.save(state, serialized)
    payload = serialized.getbuffer()
    return {"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
            "payload": torch.frombuffer(payload, dtype=torch.uint8)}


def unpack(outer) -> dict:
    """The state inside a state file, its checksum verified; TorchFileUnreadable says what is wrong."""
    if not isinstance(outer, dict) or outer.get("format") != FORMAT or not isinstance(outer.get("payload"),
                                                                                       torch.Tensor):
        raise TorchFileUnreadable("it was not written by this version of train")
    payload = outer["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != outer.get("sha256"):
        raise TorchFileUnreadable("its checksum does not match its contents: the file was damaged on disk or in "
                                  "transfer")
    loaded = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    return loaded if isinstance(loaded, dict) else {}


def read_state(path: Path, fingerprint: dict, epochs: int) -> dict | None:
    """The saved state if it can be resumed by this run, else None after saying why in one line."""
    if not path.is_file():
        return None
    try:
        outer = read_torch(path)
    except TorchFileUnreadable as error:  # truncated, not a torch file, or a pickle that would run code
        return ignore(path, f"it is not a readable state file ({error})")
    try:
        state = unpack(outer)
    except TorchFileUnreadable as error:  # another version's, or damaged
        return ignore(path, str(error))
    except Exception as error:  # contents torch cannot read despite a matching checksum (a broken writer)
        return ignore(path, f"its contents are not a readable state ({type(error).__name__})")
    if state.get("format") != FORMAT:
        return ignore(path, "it was not written by this version of train")
    if state.get("fingerprint") != fingerprint:
        saved = state.get("fingerprint") if isinstance(state.get("fingerprint"), dict) else {}
        changed = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
        return ignore(path, f"it was made with other {' and '.join(changed) or 'settings'}")
    try:
        progress = Progress(**state["progress"])
    except (KeyError, TypeError) as error:
        return ignore(path, f"its progress record is damaged ({error})")
    if problem := progress_problem(progress, epochs):
        return ignore(path, f"its progress record is damaged ({problem})")
    if progress.epochs_done > epochs:
        return ignore(path, f"it records {progress.epochs_done} epochs, more than train.epochs={epochs}")
    return state


def progress_problem(progress: Progress, epochs: int) -> str:
    """What makes a progress record impossible ("" when it is sound): a state with a valid checksum can still hold
    crafted values, which would train the wrong epochs or be written into the model checkpoint."""
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not whole(progress.epochs_done) or progress.epochs_done < 0:
        return f"epochs_done {progress.epochs_done!r} is not a count of epochs"
    if not whole(progress.best_epoch) or not 0 <= progress.best_epoch <= progress.epochs_done:
        return f"best_epoch {progress.best_epoch!r} is not one of its {progress.epochs_done} epochs"
    if not isinstance(progress.best_accuracy, float):
        return f"best_accuracy {progress.best_accuracy!r} is not a number"
    if not isinstance(progress.history, list) or len(progress.history) != progress.epochs_done or not all(
            isinstance(row, dict) for row in progress.history):
        return "its history is not one metrics record per finished epoch"
    if progress.best_state is not None and not isinstance(progress.best_state, dict):
        return "its best weights are not a state dict"
    return ""


def ignore(path: Path, why: str) -> None:
    print(f"train: ignoring {path}: {why}; starting fresh")
    return None


def load_state(path: Path, trainer, fingerprint: dict) -> Progress:
    """The progress of a matching saved run (weights etc. restored into trainer), or a fresh one."""
    state = read_state(path, fingerprint, trainer.p.epochs)
    if state is None:
        return Progress()
    expected = {k: v.shape for k, v in trainer.model.state_dict().items()}
    saved = state.get("model")
    if not isinstance(saved, dict) or {k: getattr(v, "shape", None) for k, v in saved.items()} != expected:
        ignore(path, "its weights do not fit this model")
        return Progress()
    try:
        trainer.optimizer.load_state_dict(state["optimizer"])  # checks the groups before changing anything
        trainer.model.load_state_dict(saved)
        if trainer.ema is not None:
            trainer.ema.load_state_dict(state["ema"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.precision.scaler.load_state_dict(state["scaler"])
        restore_rng_states(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise StageError(f"{path} matched this run but could not be restored ({error}); delete it and run "
                         f"again") from None
    progress = Progress(**state["progress"])
    if progress.epochs_done == trainer.p.epochs:  # stopped between its last epoch and writing the model
        print(f"train: {path} holds every epoch of this run (it stopped before writing the model): writing the "
              f"model from it, no epoch trained again")
    else:
        print(f"train: resuming after epoch {progress.epochs_done}/{trainer.p.epochs} from {path}")
    return progress
