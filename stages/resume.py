"""The resume state of an unfinished training run: written after every epoch, read when train starts.

It holds the weights, optimizer, scheduler, loss scaler, every RNG state and the metrics logged so far, as
tensors and plain Python values only, so it is read with torch.load(weights_only=True): a planted or foreign
file cannot run code. A state is used only if it was made by the same params and the same prepared data
(its fingerprint); an unreadable, foreign, finished or mismatched state is ignored with one line, and the
run starts fresh. It is not a DVC output: DVC would delete it before the stage runs (see dvc.yaml).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stages.errors import StageError
from stages.files import save_torch

FORMAT = "transfer-learning-train-state/3"  # 3: with the EMA weights
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
    """trainer: a stages.trainer.Trainer (model, optimizer, scheduler, precision.scaler)."""
    save_torch(path, {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "progress": progress.__dict__,
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.precision.scaler.state_dict(),
        "rng": rng_states(),
    })


def read_state(path: Path, fingerprint: dict, epochs: int) -> dict | None:
    """The saved state if it can be resumed by this run, else None after saying why in one line."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or a pickle that would run code
        return ignore(path, f"it is not a readable state file ({type(error).__name__})")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return ignore(path, "it was not written by this version of train")
    if state.get("fingerprint") != fingerprint:
        saved = state.get("fingerprint") if isinstance(state.get("fingerprint"), dict) else {}
        changed = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
        return ignore(path, f"it was made with other {' and '.join(changed) or 'settings'}")
    try:
        progress = Progress(**state["progress"])
    except (KeyError, TypeError) as error:
        return ignore(path, f"its progress record is damaged ({error})")
    if progress.epochs_done >= epochs:  # the run stopped between its last epoch and saving the model
        return ignore(path, "it is a finished run")
    return state


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
    print(f"train: resuming after epoch {progress.epochs_done}/{trainer.p.epochs} from {path}")
    return progress
