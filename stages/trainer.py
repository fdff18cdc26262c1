"""The training machinery of stage `train`: the model and optimizer set up for a recipe, one optimizer step,
one epoch, validation, and the loaders that feed them. stages/train.py runs the epochs.

`self.model` is what gets saved and GradCAM'd; the steps run `step_model` (the same parameters, wrapped for
several processes and compiled), evaluation runs `eval_model` (compiled, never wrapped: a DDP forward
broadcasts buffers, a collective that validation shards of unequal size would deadlock).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from stages.data import ImageSplit, SeededEpochSampler, make_loader
from stages.errors import StageError
from stages.model import AUX_LOSS_WEIGHT, RecipeError, build_model, fit_to_resolution
from stages.params import Params, TrainParams
from stages.recipe import Freezer, build_optimizer, build_scheduler
from stages.runtime import CPU_RUN_LIMIT_HOURS, Precision, Processes, predict_logits, resolve_switch
from stages.transforms import Preprocessing, eval_transform, to_model_input, train_transform

LOG_EVERY_STEPS = 5  # how often the running loss is shown and checked (each check costs one host sync)
PROJECT_AFTER_STEPS = 5  # steps timed (after the first, which compiles and warms up) to project the run's length


class LossNotFinite(Exception):
    pass


def format_hours(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def format_duration(seconds: float) -> str:
    """1:02:03 (h:mm:ss) or 2:03 (m:ss): the training time left in the run, validation aside."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    images: int
    seconds: float


class Trainer:
    def __init__(self, params: Params, num_classes: int, device: torch.device, processes: Processes | None = None):
        processes = processes or Processes()
        p = params.train
        self.p = p
        self.device = device
        self.processes = processes
        self.on_cuda = device.type == "cuda"
        self.channels_last = resolve_switch(p.channels_last, device)
        self.compiled = resolve_switch(p.compile, device)
        m = params.model
        constructor = fit_to_resolution(m.arch, p.resolution)
        if constructor.get("aux_logits") is False and processes.is_main:
            print(f"train: {m.arch}'s auxiliary classifier needs larger inputs than {p.resolution} px: training "
                  f"without it (299 px keeps it)")
        self.preprocessing = Preprocessing.for_training(p.resolution, p.crop)
        self.model = build_model(m.arch, num_classes, m.weights, m.head, m.head_hidden, m.head_dropout,
                                 **constructor)
        if p.sync_batchnorm and processes.distributed:
            if not self.on_cuda:
                raise RecipeError("train.sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only): "
                                  "set it to false for CPU processes")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model = self.model.to(device)
        self.freezer = Freezer(self.model, p)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.eval_model = torch.compile(self.model) if self.compiled else self.model
        self.step_model, self.wrapped_for = self.eval_model, None
        self.precision = Precision(p.amp, device)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
        self.optimizer = build_optimizer(self.model, p)
        self.scheduler = build_scheduler(self.optimizer, p)
        # A CPU run that train.device: auto fell back to is stopped when its projection is over the limit.
        self.hours_limit = CPU_RUN_LIMIT_HOURS if device.type == "cpu" and p.device == "auto" else None
        self.projected = False
        self.run_started, self.run_steps = time.perf_counter(), 0  # for the whole run's time left on the bar

    def weights_copy(self) -> dict:
        """The weights now, on the host: the best epoch's, kept while training goes on."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

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
        inputs = to_model_input(images, self.device, self.channels_last, self.preprocessing.mean,
                                self.preprocessing.std)
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
        self.step_model = torch.compile(ddp) if self.compiled else ddp
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
        start = first_step_done = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.p.epochs}", unit="batch", leave=False)
        for step, (images, labels) in enumerate(bar):
            labels = labels.to(self.device, non_blocking=True)
            if step == 1:
                first_step_done = time.perf_counter()  # the first step includes compilation and warm-up
            elif step == 1 + PROJECT_AFTER_STEPS and not self.projected:
                self.project_run(time.perf_counter() - first_step_done, PROJECT_AFTER_STEPS, len(loader), epoch)
            loss, logits = self.step(images, labels)
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            self.run_steps += 1
            if step % LOG_EVERY_STEPS == 0 or step == len(loader) - 1:
                # Summed over the processes, so every one of them sees the same value and stops together.
                total_loss, total_seen = self.processes.sum(loss_sum, torch.tensor(seen, device=self.device))
                running = (total_loss / total_seen).item()
                if not math.isfinite(running):
                    raise LossNotFinite(running)
                steps_left = len(loader) * (self.p.epochs - epoch) - step - 1
                seconds_left = (time.perf_counter() - self.run_started) / self.run_steps * steps_left
                bar.set_postfix(loss=f"{running:.3f}", run_left=format_duration(seconds_left))
        # The epoch's one host sync (and, with several processes, one collective).
        total_loss, total_correct, total_seen = self.processes.sum(loss_sum, correct,
                                                                   torch.tensor(seen, device=self.device))
        loss_value, seen = (total_loss / total_seen.clamp(min=1)).item(), int(total_seen.item())
        if not math.isfinite(loss_value):
            raise LossNotFinite(loss_value)
        if not self.projected:  # an epoch too short to project from its first steps
            self.project_run(time.perf_counter() - start, len(loader), len(loader), epoch)
        self.scheduler.step()
        return EpochResult(loss_value, total_correct.item() / max(seen, 1), seen, time.perf_counter() - start)

    def project_run(self, seconds: float, steps: int, steps_per_epoch: int, epoch: int) -> None:
        """Prints the projected training time of the rest of the run (steps only, validation aside), averaged
        over the processes so that all of them take the same decision; stops a CPU fallback run over the limit."""
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        (total,) = self.processes.sum(torch.tensor(seconds / max(steps, 1)))
        per_step = total.item() / self.processes.world_size
        hours = per_step * steps_per_epoch * (self.p.epochs - epoch) / 3600
        self.projected = True
        print(f"train: {per_step:.2f} s per step: the remaining {self.p.epochs - epoch} epoch(s) should take "
              f"{format_hours(hours)} on {self.device.type}")
        if self.hours_limit is not None and hours > self.hours_limit:
            raise StageError(
                f"no usable GPU (see above), and on this CPU the run would take about {format_hours(hours)} "
                f"({per_step:.2f} s per step x {steps_per_epoch} steps x {self.p.epochs - epoch} epochs), more than "
                f"the {self.hours_limit:g} h train.device: auto allows. Fix the GPU (README 'GPU drivers'), shrink "
                f"the run (README 'Try it on a CPU'), or set train.device: cpu to train on the CPU anyway")

    def validate(self, loader) -> tuple[float, float]:
        """Loss and accuracy over the whole validation split (each process predicts its share)."""
        logits, labels = predict_logits(self.eval_model, loader, self.device, self.precision, self.channels_last,
                                        self.preprocessing, desc="validation")
        loss_sum, correct, count = self.processes.sum(
            nn.functional.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(1) == labels).sum(),
            torch.tensor(len(labels)))
        return (loss_sum / count).item(), (correct / count).item()


def make_loaders(p: TrainParams, preprocessing: Preprocessing, train_split, validation_split, workers: int,
                 processes: Processes):
    """(train loader, validation loader or None) for this process; validation through the eval transform of the
    preprocessing the model will be saved with.

    One process: drop_last, so every step sees a full batch (no 1-image batch for BatchNorm, no recompile for
    torch.compile); the reshuffle each epoch still shows every image. Several: the sampler hands each process
    its part of every full global batch, and each process validates every world_size-th image."""
    transform = train_transform(p.resolution, p.crop, p.crop_scale, p.crop_padding, p.augment)
    sampler = SeededEpochSampler(len(train_split), p.seed, p.batch_size, processes.rank, processes.world_size)
    train_loader = make_loader(ImageSplit(train_split, transform), p.batch_size // processes.world_size, workers,
                               sampler=sampler,
                               drop_last=not processes.distributed and len(train_split) > p.batch_size)
    if validation_split is None:
        return train_loader, None
    shard = range(processes.rank, len(validation_split), processes.world_size) if processes.distributed else None
    validation_loader = make_loader(ImageSplit(validation_split, eval_transform(preprocessing)),
                                    p.batch_size * 2 // processes.world_size, workers, sampler=shard)
    return train_loader, validation_loader
