"""The epoch loop of `train` and what surrounds it: logging each epoch to DVCLive, keeping the best epoch,
saving the resume state and the model, and the lines it prints. The machinery of one step and one epoch is
finetune/trainer.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from dvclive import Live

from finetune.calibration import Calibration, calibrate
from finetune.checkpoint import Checkpoint, save_checkpoint
from finetune.data import ImageSplit, class_names, make_loader, open_split, resolve_workers, split_names, stop_workers
from finetune.errors import StageError
from finetune.files import file_digest
from finetune.model import constructor_kwargs
from finetune.params import Params, TrainParams
from finetune.paths import LIVE_DIR, MODEL_PATH, PREPARED_DIR, PROBE_HEAD
from finetune.probe_head import load_probe
from finetune.resume import (
    Progress,
    load_state,
    other_states,
    refuse_unusable_state_dir,
    run_fingerprint,
    save_state,
    state_path,
)
from finetune.runtime import (
    Processes,
    keep_freed_memory,
    predict_logits,
    resolve_threads,
    seed_everything,
    start_processes,
    stop_processes,
    training_device,
)
from finetune.trainer import LossNotFinite, Trainer, make_loaders, pass_batch_size
from finetune.transforms import eval_transform
from finetune.wise import choose_mix


class Interrupted(Exception):
    """SIGTERM (a stopped spot instance, `kill`), handled like Ctrl-C."""


class RunStopped(Exception):
    """Ctrl-C or SIGTERM ended the run between two saved epochs: not an error, main says how to resume."""


def run_epochs(trainer: Trainer, progress: Progress, train_loader, validation_loader, fingerprint: dict,
               state: Path, start: dict | None) -> None:
    """Epochs from the first unfinished one to the last: train, validate, keep the best, save the state, log;
    then, with train.wise_ft, the kept weights mixed with `start` (the weights before the first step).

    A fresh DVCLive dir each run; a resumed run replays the logged epochs first, so the curves have every
    epoch exactly once whether or not the run was interrupted."""
    p, is_main = trainer.p, trainer.processes.is_main
    with Live(str(LIVE_DIR), dvcyaml=False, save_dvc_exp=False, report=None) if is_main else nullcontext() as live:
        for done, metrics in enumerate(progress.history, start=1):
            log_epoch(live, metrics, done)
        for epoch in range(progress.epochs_done, p.epochs):
            train_loader.sampler.set_epoch(epoch)
            lrs = trainer.learning_rates()
            result = trainer.train_epoch(train_loader, epoch)
            metrics = {**lrs, "train/loss": result.loss, "train/acc": result.accuracy,
                       "train/images_per_s": result.images / result.seconds}
            if validation_loader is not None and should_validate(epoch, p):
                loss, accuracy = trainer.validate(validation_loader)
                metrics |= {"validation/loss": loss, "validation/acc": accuracy}
                if accuracy > progress.best_accuracy:
                    progress.best_accuracy, progress.best_epoch = accuracy, epoch + 1
                    # every process mixes them with train.wise_ft (its validation is a collective)
                    progress.best_state = trainer.weights_copy() if is_main or start is not None else None
            print(epoch_line(epoch, p, metrics))
            progress.epochs_done = epoch + 1
            progress.history.append(metrics)
            if is_main:
                save_state(state, trainer, progress, fingerprint)
            log_epoch(live, metrics, epoch + 1)
        if start is not None:
            choice = choose_mix(trainer.kept_model, start, progress.best_state or trainer.weights_copy(), p.wise_ft,
                                lambda: trainer.validate(validation_loader))
            progress.best_state = choice.weights
            print(choice.line())
        if is_main:
            live.summary["kept_epoch"] = progress.best_epoch or p.epochs
            if start is not None:
                live.summary["wise_ft"] = choice.summary()


def check_same_start(processes: Processes, progress: Progress, path: Path) -> None:
    """Every process must resume from the same epoch. On several machines each reads the state from its own
    train.state_dir: unless that is storage they all see, rank 0 alone finds it. (All processes take the same
    decision from the same two sums, so none is left waiting in a collective.)"""
    if not processes.distributed:
        return
    done = torch.tensor(float(progress.epochs_done))
    total, squares = processes.sum(done, done * done)
    if processes.world_size * squares.item() != total.item() ** 2:
        raise StageError(f"the training processes found different resume states (this one: {progress.epochs_done} "
                         f"finished epoch(s) in {path}). On several machines, set train.state_dir to storage every "
                         f"machine sees (NFS, a mounted bucket), or delete {path} on each to start fresh")


def should_validate(epoch: int, p: TrainParams) -> bool:
    last = epoch == p.epochs - 1
    return last or (p.eval_every > 0 and (epoch + 1) % p.eval_every == 0)


def epoch_line(epoch: int, p: TrainParams, metrics: dict) -> str:
    lrs = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("lr"))
    line = f"epoch {epoch + 1}/{p.epochs}: {lrs}, train loss {metrics['train/loss']:.4f} acc {metrics['train/acc']:.4f}"
    if "validation/acc" in metrics:
        line += f", validation loss {metrics['validation/loss']:.4f} acc {metrics['validation/acc']:.4f}"
    return f"{line}, {metrics['train/images_per_s']:.0f} images/s"


def log_epoch(live: Live | None, metrics: dict, epoch: int) -> None:
    """DVCLive's step is the epoch, counted from 1 as the logs count it (its own count starts at 0): `dvc plots`
    draws epoch 1-10 for a 10-epoch run, as train prints them and the report draws them."""
    if live is None:  # not rank 0
        return
    live.step = epoch
    for name, value in metrics.items():
        live.log_metric(name, value)
    live.next_step()


def save_model(params: Params, trainer: Trainer, progress: Progress, names: list[str], state: Path,
               validation_split, workers: int) -> None:
    """The best validation epoch's weights (the EMA's with train.ema_decay), else the last epoch's, with the
    temperature that calibrates their confidence on the validation split."""
    trainer.model.load_state_dict(progress.best_state if progress.best_state is not None else trainer.weights_copy())
    calibration = fit_calibration(trainer, validation_split, workers)
    kept_epoch = progress.best_epoch or params.train.epochs
    m = params.model
    save_checkpoint(MODEL_PATH, trainer.model, Checkpoint(
        arch=m.arch, class_names=names, preprocessing=trainer.preprocessing,
        head={"head": m.head, "head_hidden": m.head_hidden, "head_dropout": m.head_dropout},
        constructor=constructor_kwargs(trainer.model, trainer.constructor), epoch=kept_epoch,
        params=params.model_dump(), calibration=calibration,
        weights_sha256=file_digest(m.weights) if Path(m.weights).is_file() else ""))
    state.unlink(missing_ok=True)  # this run's own state only: other runs' states in the folder stay
    print(f"train: saved epoch {kept_epoch} to {MODEL_PATH}")


def fit_calibration(trainer: Trainer, validation_split, workers: int) -> Calibration:
    """Temperature scaling of the kept weights on the validation split (one more pass over it); never the test
    split. Without a validation split the model stays uncalibrated, and says why."""
    if validation_split is None:
        return Calibration(reason="no validation split to fit a temperature on (data.val_fraction: 0); set "
                                  "data.val_fraction (0.1 is usual) to calibrate")
    loader = make_loader(ImageSplit(validation_split, eval_transform(trainer.preprocessing)), trainer.p.batch_size,
                         workers)
    logits, labels = predict_logits(trainer.model, loader, trainer.device, trainer.precision, trainer.channels_last,
                                    trainer.preprocessing, desc="calibration")
    stop_workers(loader)
    calibration = calibrate(logits, labels)
    print(f"train: confidence calibrated: {calibration.describe()}")
    return calibration


def prepared_fingerprints() -> dict:
    """Each prepared split's content fingerprint (prepare derives it from the images, ids and labels)."""
    return {split: json.loads((PREPARED_DIR / split / "state.json").read_text())["_fingerprint"]
            for split in split_names()}


def start_line(params: Params, trainer: Trainer, processes: Processes, train_images: int, validation_split,
               classes: int, workers: int, threads: int) -> str:
    p = params.train
    validation = f"{len(validation_split)} validation" if validation_split is not None else (
        "no validation (data.val_fraction: 0: the last epoch is kept)")
    where = (f"{processes.world_size} processes x {trainer.device.type}" if processes.distributed
             else str(trainer.device))
    per_process = f" ({p.batch_size // processes.world_size} per process)" if processes.distributed else ""
    switches = [trainer.precision.name] + ["channels_last"] * trainer.channels_last + [
        "torch.compile (inductor)"] * trainer.compiled + [f"EMA {p.ema_decay:g}"] * (trainer.ema is not None)
    accumulated = (f" in {p.accumulate_steps} passes of {pass_batch_size(p, processes.world_size)}"
                   if p.accumulate_steps > 1 else "")
    each = " per process" if processes.distributed else ""
    threads_rule = "train.num_threads: auto, the cores left by the loader workers" if p.num_threads == "auto" else (
        "train.num_threads")
    return (f"train: {params.model.arch} ({params.model.weights}) on {where} ({', '.join(switches)}), "
            f"{train_images} train / {validation} images, {classes} classes, {p.resolution}px, batch {p.batch_size}"
            f"{per_process}{accumulated}, {workers} loader workers{each}, {threads} CPU thread(s){each} "
            f"({threads_rule})")


def raise_interrupted(signum, frame):
    raise Interrupted()


def train(params: Params, processes: Processes) -> None:
    p = params.train
    keep_freed_memory()  # before the model and the loader workers: they inherit it
    seed_everything(p.seed)
    device = training_device(p.device, processes.local_rank)
    train_split = open_split("train")
    names = class_names(train_split)
    validation_split = open_split("validation") if "validation" in split_names() else None
    if p.wise_ft and validation_split is None:
        raise StageError("train.wise_ft chooses its mix on the validation split, and the prepared data has none: set "
                         "data.val_fraction (0.1 is usual), or train.wise_ft: []")
    head = load_probe(PROBE_HEAD, names) if p.head_init == "probe" else None
    trainer = Trainer(params, len(names), device, processes, train_images=len(train_split), head=head)
    workers = resolve_workers(p.num_workers, processes.world_size)
    threads = resolve_threads(p.num_threads, workers, processes.world_size)
    torch.set_num_threads(threads)
    train_loader, validation_loader = make_loaders(p, trainer.preprocessing, train_split, validation_split, workers,
                                                   processes)
    starts_from = {"probe": file_digest(PROBE_HEAD)} if head is not None else {}
    fingerprint = run_fingerprint(params.model.model_dump(), p.model_dump(), prepared_fingerprints() | starts_from)
    state = state_path(p.state_dir, fingerprint)
    refuse_unusable_state_dir(p.state_dir)  # check did too; the folder may have changed since, or no check ran
    start = trainer.weights_copy() if p.wise_ft else None  # before a resumed state replaces them
    progress = load_state(state, trainer, fingerprint)
    check_same_start(processes, progress, state)
    print(start_line(params, trainer, processes, len(train_split), validation_split, len(names), workers, threads))
    if processes.is_main:
        mention_other_states(state)

    # SIGTERM stops training between two saved epochs; once the last epoch's state is saved it takes its default
    # action again: a run killed while writing the model finishes from that state when run again.
    previous_handler = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        run_epochs(trainer, progress, train_loader, validation_loader, fingerprint, state, start)
    except (KeyboardInterrupt, Interrupted):
        raise RunStopped(stopped_message(progress.epochs_done, p.epochs, state)) from None
    except LossNotFinite as error:
        raise loss_not_finite(error, p, progress.epochs_done, state) from None
    except torch.OutOfMemoryError:
        raise StageError(f"CUDA out of memory at train.batch_size={p.batch_size}, train.resolution={p.resolution}. "
                         f"Lower train.batch_size (and scale train.lr with it: lr 0.1 per 128 images), keep "
                         f"train.amp: bf16, or lower the resolution.") from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        stop_workers(train_loader, validation_loader)

    if processes.is_main:
        save_model(params, trainer, progress, names, state, validation_split, workers)


def mention_other_states(state: Path) -> None:
    if others := other_states(state):
        print(f"train: {state.parent} also holds the state of {len(others)} unfinished run(s) of other params or "
              f"data ({', '.join(o.name for o in others[:3])}{', ...' if len(others) > 3 else ''}): left as they "
              f"are, to resume when their params come back; delete them when you no longer need them")


def loss_not_finite(error: LossNotFinite, p: TrainParams, epochs_done: int, state: Path) -> StageError:
    return StageError(
        f"the training loss became {error} in epoch {epochs_done + 1}. The learning rate is likely too high for this "
        f"batch size (train.lr={p.lr}, train.batch_size={p.batch_size}): scale it with the batch size (the seeds' "
        f"0.1 is for batch 128) or lower it."
        + (f" The last good epoch ({epochs_done}) is kept in {state}." if epochs_done else ""))


def stopped_message(epochs_done: int, epochs: int, state: Path) -> str:
    """Ctrl-C or SIGTERM: where the run stopped and how to resume it (a signal can also arrive after the last
    epoch's state is saved, before the model is written)."""
    where = (f"after its last epoch, before the model was written; all {epochs}" if epochs_done >= epochs else
             f"in epoch {epochs_done + 1} of {epochs}; {epochs_done} finished")
    return f"train: interrupted {where} epoch(s) are saved in {state}: run `dvc repro` again to resume"


def run(params: Params) -> None:
    """The whole training run in this process (one of train.devices under torchrun); Ctrl-C or SIGTERM end it with
    the command that resumes it."""
    devices = params.train.devices
    processes = start_processes()
    try:
        if processes.world_size != devices:
            raise StageError(f"started as {processes.world_size} process(es) but train.devices={devices}: set "
                             f"train.devices to the number of processes (it is part of the recipe and the resume "
                             f"check)")
        if not processes.is_main:  # rank 0 alone prints; errors still reach stderr from every rank
            sys.stdout = open(os.devnull, "w")
            os.environ["TQDM_DISABLE"] = "1"
        train(params, processes)
    except RunStopped as stopped:
        sys.exit(str(stopped))
    finally:
        stop_processes(processes)
