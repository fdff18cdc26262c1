"""Stage `train`: fine-tune `model.arch` on the prepared train split; save models/model.pt.

Default recipe (the seeds' run 7): full fine-tune, one lr for every layer, SGD lr 0.1
momentum 0.9 wd 1e-4, batch 128, 90 epochs, lr /10 every 30, RandomResizedCrop + flip.
The other recipes (AdamW, head lr multiplier, cosine/exponential schedules, warmup,
freezing, label smoothing, crop and augment policies) are params: stages/recipe.py.

Per epoch DVCLive logs train loss/accuracy, learning rate(s) and images/s, and, when
the prepared data has a validation split, validation loss/accuracy: the best
validation epoch is the one kept. Without one the last epoch is kept. The test split
is never read here; it belongs to `evaluate`.

Resume: after every epoch the whole training state (weights, optimizer, scheduler,
loss scaler, every RNG, the logged history) is written atomically to
checkpoints/train_state.pt (not a DVC output: DVC leaves it alone), deleted once the
model is saved. A run that finds a state made with the same params and data continues after its last
epoch and ends with the same weights as an uninterrupted run; any other state is
ignored, and the stage says so.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from torch import nn
from tqdm import tqdm

from stages.data import (IMAGENET_MEAN, IMAGENET_STD, MODEL_PATH, PREPARED_DIR, ImageSplit, SeededEpochSampler,
                         class_names, eval_transform, make_loader, open_split, resolve_workers, split_names,
                         stop_workers, to_model_input, train_transform)
from stages.files import atomic_path
from stages.model import (AUX_LOSS_WEIGHT, WeightsUnavailable, build_model, constructor_kwargs, input_size_problem,
                          save_checkpoint)
from stages.params import Params, TrainParams, load_params_or_exit
from stages.recipe import Freezer, build_optimizer, build_scheduler
from stages.runtime import (Processes, Precision, pick_device, predict_logits, relaunch_under_torchrun, seed_everything,
                            start_processes, stop_processes, under_torchrun)

LIVE_DIR = Path("metrics/train")
STATE_PATH = Path("checkpoints/train_state.pt")
LOG_EVERY_STEPS = 20  # how often the running loss is shown and checked (each check costs a host sync)
NOT_AFFECTING_RESULTS = ("num_workers",)  # train params a resumed run may change


class Interrupted(Exception):
    """SIGTERM (a stopped spot instance, `kill`), handled like Ctrl-C."""


class LossNotFinite(Exception):
    pass


class RecipeError(ValueError):
    """The params ask for something this model cannot do (a resolution, a module to unfreeze)."""


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    images: int
    seconds: float


@dataclass
class Progress:
    """Everything about the run so far that is not in the model/optimizer state."""

    epochs_done: int = 0
    history: list[dict] = field(default_factory=list)  # the metrics logged per epoch, replayed on resume
    best_accuracy: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None


class Trainer:
    def __init__(self, params: Params, num_classes: int, device: torch.device, processes: Processes = Processes()):
        p = params.train
        self.p = p
        self.device = device
        self.processes = processes
        self.on_cuda = device.type == "cuda"
        self.channels_last = p.channels_last and self.on_cuda
        m = params.model
        constructor = fit_to_resolution(m.arch, p.resolution)
        self.model = build_model(m.arch, num_classes, m.weights, m.head, m.head_hidden, m.head_dropout,
                                 **constructor)
        if p.sync_batchnorm and processes.distributed:
            if not self.on_cuda:
                raise RecipeError("train.sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only): "
                                  "set it to false for CPU processes")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model = self.model.to(device)
        try:
            self.freezer = Freezer(self.model, p)
        except ValueError as error:
            raise RecipeError(str(error)) from None
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # self.model is what gets saved and GradCAM'd; the steps run step_model (the same parameters, wrapped
        # for several processes and compiled), evaluation runs eval_model (compiled, never wrapped: a DDP
        # forward broadcasts buffers, a collective that validation shards of unequal size would deadlock).
        self.eval_model = torch.compile(self.model) if p.compile and self.on_cuda else self.model
        self.step_model, self.wrapped_for = self.eval_model, None
        self.precision = Precision(p.amp, device)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
        self.optimizer = build_optimizer(self.model, p)
        self.scheduler = build_scheduler(self.optimizer, p)

    def learning_rates(self) -> dict[str, float]:
        """The lr of this epoch: `lr` (the backbone's) and, when it differs, `lr_head`."""
        rates = {group["name"]: group["lr"] for group in self.optimizer.param_groups}
        lrs = {"lr": rates["backbone"]}
        if self.p.head_lr_multiplier != 1:
            lrs["lr_head"] = rates["head"]
        return lrs

    def loss(self, outputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, main logits). Inception/GoogLeNet in training mode also return auxiliary logits."""
        if isinstance(outputs, tuple):
            logits, aux = outputs[0], [extra for extra in outputs[1:] if extra is not None]
        else:
            logits, aux = outputs, []
        loss = self.criterion(logits, labels)
        for extra in aux:
            loss = loss + AUX_LOSS_WEIGHT * self.criterion(extra, labels)
        return loss, logits

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a uint8 batch; returns (loss, logits) without a host sync."""
        inputs = to_model_input(images, self.device, self.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with self.precision.autocast():
            loss, logits = self.loss(self.step_model(inputs), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.scaler.scale(loss).backward()
        self.precision.scaler.step(self.optimizer)
        self.precision.scaler.update()
        return loss, logits

    def wrap_for_steps(self) -> None:
        """DDP registers its gradient hooks on the params trainable when it is built: rebuilt when they change."""
        trainable = frozenset(name for name, param in self.model.named_parameters() if param.requires_grad)
        if not self.processes.distributed or trainable == self.wrapped_for:
            return
        ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if self.on_cuda else None)
        self.step_model = torch.compile(ddp) if self.p.compile and self.on_cuda else ddp
        self.wrapped_for = trainable

    def set_trainable(self, epoch: int) -> None:
        trainable, total = self.freezer.apply(epoch)
        self.wrap_for_steps()
        starts_phase = epoch == 0 or epoch == self.p.freeze_epochs
        if starts_phase and (trainable < total or epoch > 0):
            if epoch < self.p.freeze_epochs:
                what = "the new head only"
            elif self.p.unfreeze_from:
                what = f"from {self.p.unfreeze_from} on, and the head"
            else:
                what = "every layer"
            print(f"train: from epoch {epoch + 1}, {trainable} of {total} parameter tensors train ({what})")

    def train_epoch(self, loader, epoch: int) -> EpochResult:
        self.set_trainable(epoch)
        self.step_model.train()
        self.freezer.keep_frozen_norm_statistics()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.p.epochs}", unit="batch", leave=False)
        for step, (images, labels) in enumerate(bar):
            labels = labels.to(self.device, non_blocking=True)
            loss, logits = self.step(images, labels)
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            if step % LOG_EVERY_STEPS == 0:
                # Summed over the processes, so every one of them sees the same value and stops together.
                total_loss, total_seen = self.processes.sum(loss_sum, torch.tensor(seen, device=self.device))
                running = (total_loss / total_seen).item()
                if not math.isfinite(running):
                    raise LossNotFinite(running)
                bar.set_postfix(loss=f"{running:.3f}")
        # The epoch's one host sync (and, with several processes, one collective).
        total_loss, total_correct, total_seen = self.processes.sum(loss_sum, correct,
                                                                   torch.tensor(seen, device=self.device))
        loss_value, seen = (total_loss / total_seen.clamp(min=1)).item(), int(total_seen.item())
        if not math.isfinite(loss_value):
            raise LossNotFinite(loss_value)
        self.scheduler.step()
        return EpochResult(loss_value, total_correct.item() / max(seen, 1), seen, time.perf_counter() - start)

    def validate(self, loader) -> tuple[float, float]:
        """Loss and accuracy over the whole validation split (each process predicts its share)."""
        logits, labels = predict_logits(self.eval_model, loader, self.device, self.precision, self.channels_last,
                                        desc="validation")
        loss_sum, correct, count = self.processes.sum(
            nn.functional.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(1) == labels).sum(),
            torch.tensor(len(labels)))
        return (loss_sum / count).item(), (correct / count).item()


def fit_to_resolution(arch: str, resolution: int) -> dict:
    """Constructor kwargs for `arch` at `resolution`, checked before anything heavy: an input the model cannot
    take is an error; Inception's auxiliary classifier (which needs 299 px) is switched off below its size."""
    problem = input_size_problem(arch, resolution, training=False)
    if problem:
        raise RecipeError(f"model.arch {arch} cannot take train.resolution={resolution}: {problem}. "
                          f"Pick a resolution the model accepts (inception_v3: >= 75, its auxiliary head: 299; "
                          f"ViT/Swin: the size their weights were trained at)")
    training_problem = input_size_problem(arch, resolution, training=True)
    if training_problem is None:
        return {}
    try:
        if input_size_problem(arch, resolution, training=True, aux_logits=False) is None:
            print(f"train: {arch}'s auxiliary classifier needs larger inputs than {resolution} px: training "
                  f"without it (299 px keeps it)")
            return {"aux_logits": False}
    except TypeError:  # no aux_logits switch: the failure is elsewhere
        pass
    raise RecipeError(f"model.arch {arch} cannot train at train.resolution={resolution}: {training_problem}")


def run_fingerprint(params: Params) -> dict:
    """What must match for a saved state to be resumed: the params that shape training, and the data."""
    train = {k: v for k, v in params.train.model_dump().items() if k not in NOT_AFFECTING_RESULTS}
    data = {split: json.loads((PREPARED_DIR / split / "state.json").read_text())["_fingerprint"]
            for split in split_names()}
    return {"model": params.model.model_dump(), "train": train, "data": data}


def rng_states() -> dict:
    """The data order and augmentation are seeded per epoch (SeededEpochSampler); these cover anything else."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def save_state(trainer: Trainer, progress: Progress, fingerprint: dict) -> None:
    state = {
        "fingerprint": fingerprint,
        "progress": progress.__dict__,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.precision.scaler.state_dict(),
        "rng": rng_states(),
    }
    with atomic_path(STATE_PATH) as tmp:
        torch.save(state, tmp)


def load_state(trainer: Trainer, fingerprint: dict) -> Progress:
    """The progress of a matching saved run (weights etc. restored into trainer), or a fresh one."""
    if not STATE_PATH.is_file():
        return Progress()
    # Our own file, written by save_state: it holds numpy/python RNG states, which weights_only refuses.
    state = torch.load(STATE_PATH, map_location=trainer.device, weights_only=False)
    if state["fingerprint"] != fingerprint:
        changed = [k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k]]
        print(f"train: ignoring {STATE_PATH}: it was made with other {' and '.join(changed)}; starting fresh")
        return Progress()
    progress = Progress(**state["progress"])
    if progress.epochs_done >= trainer.p.epochs:  # the run stopped between its last epoch and saving the model
        print(f"train: {STATE_PATH} is a finished run; starting fresh")
        return Progress()
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.precision.scaler.load_state_dict(state["scaler"])
    restore_rng_states(state["rng"])
    print(f"train: resuming after epoch {progress.epochs_done}/{trainer.p.epochs} from {STATE_PATH}")
    return progress


def should_validate(epoch: int, p: TrainParams) -> bool:
    last = epoch == p.epochs - 1
    return last or (p.eval_every > 0 and (epoch + 1) % p.eval_every == 0)


def log_epoch(live: Live | None, metrics: dict) -> None:
    if live is None:  # not rank 0
        return
    for name, value in metrics.items():
        live.log_metric(name, value)
    live.next_step()


def run_epochs(trainer: Trainer, progress: Progress, train_loader, validation_loader, fingerprint: dict) -> None:
    p = trainer.p
    is_main = trainer.processes.is_main
    # A fresh DVCLive dir each run; a resumed run replays the logged epochs first, so the curves have
    # every epoch exactly once whether or not the run was interrupted.
    with Live(str(LIVE_DIR), dvcyaml=False, save_dvc_exp=False, report=None) if is_main else nullcontext() as live:
        for metrics in progress.history:
            log_epoch(live, metrics)
        for epoch in range(progress.epochs_done, p.epochs):
            train_loader.sampler.set_epoch(epoch)
            lrs = trainer.learning_rates()
            result = trainer.train_epoch(train_loader, epoch)
            metrics = {"epoch": epoch + 1, **lrs, "train/loss": result.loss, "train/acc": result.accuracy,
                       "train/images_per_s": result.images / result.seconds}
            line = (f"epoch {epoch + 1}/{p.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in lrs.items())
                    + f", train loss {result.loss:.4f} acc {result.accuracy:.4f}")
            if validation_loader is not None and should_validate(epoch, p):
                loss, accuracy = trainer.validate(validation_loader)
                metrics |= {"validation/loss": loss, "validation/acc": accuracy}
                line += f", validation loss {loss:.4f} acc {accuracy:.4f}"
                if accuracy > progress.best_accuracy:
                    progress.best_accuracy, progress.best_epoch = accuracy, epoch + 1
                    if is_main:
                        progress.best_state = {k: v.detach().to("cpu", copy=True)
                                               for k, v in trainer.model.state_dict().items()}
            print(f"{line}, {result.images / result.seconds:.0f} images/s")
            progress.epochs_done = epoch + 1
            progress.history.append(metrics)
            if is_main:
                save_state(trainer, progress, fingerprint)
            log_epoch(live, metrics)
        if is_main:
            live.summary["kept_epoch"] = progress.best_epoch or p.epochs


def raise_interrupted(signum, frame):
    raise Interrupted()


def main() -> None:
    params = load_params_or_exit()
    devices = params.train.devices
    if devices > 1 and not under_torchrun():
        relaunch_under_torchrun("stages.train", devices)  # does not return
    processes = start_processes()
    try:
        if processes.world_size != devices:
            sys.exit(f"error: started as {processes.world_size} process(es) but train.devices={devices}: set "
                     f"train.devices to the number of processes (it is part of the recipe and the resume check)")
        if not processes.is_main:  # rank 0 alone prints; errors still reach stderr from every rank
            sys.stdout = open(os.devnull, "w")
            os.environ["TQDM_DISABLE"] = "1"
        train(params, processes)
    finally:
        stop_processes(processes)


def train(params: Params, processes: Processes) -> None:
    p = params.train
    seed_everything(p.seed)
    device = pick_device(processes.local_rank)
    train_split = open_split("train")
    names = class_names(train_split)
    validation_split = open_split("validation") if "validation" in split_names() else None
    try:
        trainer = Trainer(params, len(names), device, processes)
    except (WeightsUnavailable, RecipeError) as error:
        sys.exit(f"error: {error}")

    workers = resolve_workers(p.num_workers, processes.world_size)
    train_loader, validation_loader = make_loaders(p, train_split, validation_split, workers, processes)
    fingerprint = run_fingerprint(params)
    progress = load_state(trainer, fingerprint)
    validation_count = f"{len(validation_split)} validation" if validation_split is not None else "no validation"
    where = f"{processes.world_size} processes x {device.type}" if processes.distributed else str(device)
    print(f"train: {params.model.arch} ({params.model.weights}) on {where} ({trainer.precision.name}), "
          f"{len(train_split)} train / {validation_count} images, {len(names)} classes, "
          f"{p.resolution}px, batch {p.batch_size}"
          + (f" ({p.batch_size // processes.world_size} per process)" if processes.distributed else "")
          + f", {workers} loader workers" + (" per process" if processes.distributed else ""))
    if validation_split is None:
        print("train: no validation split (data.val_fraction: 0): the last epoch is kept; the test split is only "
              "read by evaluate")

    signal.signal(signal.SIGTERM, raise_interrupted)
    interrupted = False
    try:
        run_epochs(trainer, progress, train_loader, validation_loader, fingerprint)
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
    except LossNotFinite as error:
        sys.exit(f"error: the training loss became {error} in epoch {progress.epochs_done + 1}. The learning rate is "
                 f"likely too high for this batch size (train.lr={p.lr}, train.batch_size={p.batch_size}): scale it "
                 f"with the batch size (the seeds' 0.1 is for batch 128) or lower it."
                 + (f" The last good epoch ({progress.epochs_done}) is kept in {STATE_PATH}."
                    if progress.epochs_done else ""))
    except torch.OutOfMemoryError:
        sys.exit(f"error: CUDA out of memory at train.batch_size={p.batch_size}, train.resolution={p.resolution}. "
                 f"Lower train.batch_size (and scale train.lr with it: lr 0.1 per 128 images), keep train.amp: bf16, "
                 f"or lower the resolution.")
    finally:
        stop_workers(train_loader, validation_loader)

    if interrupted:
        sys.exit(f"train: interrupted in epoch {progress.epochs_done + 1}; {progress.epochs_done} finished epoch(s) "
                 f"are saved in {STATE_PATH}: run `dvc repro` again to resume")
    if not processes.is_main:
        return
    if progress.best_state is not None:
        trainer.model.load_state_dict(progress.best_state)
    kept_epoch = progress.best_epoch or p.epochs
    save_checkpoint(MODEL_PATH, trainer.model, arch=params.model.arch, class_names=names,
                    resolution=p.resolution, crop=p.crop, mean=IMAGENET_MEAN, std=IMAGENET_STD, epoch=kept_epoch,
                    constructor=constructor_kwargs(trainer.model), params=params.model_dump())
    STATE_PATH.unlink(missing_ok=True)  # a finished run is never resumed; it would only take disk space
    print(f"train: saved epoch {kept_epoch} to {MODEL_PATH}")


def make_loaders(p: TrainParams, train_split, validation_split, workers: int, processes: Processes):
    """(train loader, validation loader or None) for this process.

    One process: drop_last, so every step sees a full batch (no 1-image batch for BatchNorm, no recompile for
    torch.compile); the reshuffle each epoch still shows every image. Several: the sampler hands each process
    its part of every full global batch, and each process validates every world_size-th image."""
    transform = train_transform(p.resolution, p.crop, p.crop_scale, p.crop_padding, p.augment)
    try:
        sampler = SeededEpochSampler(len(train_split), p.seed, p.batch_size, processes.rank, processes.world_size)
    except ValueError as error:
        sys.exit(f"error: {error}")
    train_loader = make_loader(ImageSplit(train_split, transform), p.batch_size // processes.world_size, workers,
                               sampler=sampler,
                               drop_last=not processes.distributed and len(train_split) > p.batch_size)
    if validation_split is None:
        return train_loader, None
    shard = range(processes.rank, len(validation_split), processes.world_size) if processes.distributed else None
    validation_loader = make_loader(ImageSplit(validation_split, eval_transform(p.resolution, p.crop)),
                                    p.batch_size * 2 // processes.world_size, workers, sampler=shard)
    return train_loader, validation_loader


if __name__ == "__main__":
    main()
