"""The training machinery of stage `train`: the model and optimizer set up for a recipe, one optimizer step
(over train.accumulate_steps loader batches), one epoch, validation, and the loaders that feed them.
stages/train.py runs the epochs.

`self.model` holds the trained parameters; the steps run `step_model` (the same parameters, wrapped for several
processes and compiled). `kept_model` is what is validated and saved: the model, or its EMA (train.ema_decay).
Evaluation runs `eval_model` (kept_model compiled, never wrapped: a DDP forward broadcasts buffers, a collective
that validation shards of unequal size would deadlock).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from finetune.data import ImageSplit, SeededEpochSampler, make_loader
from finetune.errors import StageError
from finetune.model import AUX_LOSS_WEIGHT, RecipeError, build_model, fit_to_resolution, model_preprocessing
from finetune.params import Params, TrainParams
from finetune.probe_head import ProbeHead, initialize_head
from finetune.recipe import Freezer, build_ema, build_mixer, build_optimizer, build_scheduler
from finetune.runtime import (
    CPU_RUN_LIMIT_HOURS,
    Precision,
    Processes,
    predict_logits,
    resolve_channels_last,
    resolve_switch,
    seed_epoch,
)
from finetune.transforms import Preprocessing, eval_transform, to_model_input, train_transform

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


def pass_batch_size(p: TrainParams, world_size: int) -> int:
    """Images per forward/backward pass of each process: the global batch split over the processes and the
    accumulated passes."""
    return p.batch_size // (world_size * p.accumulate_steps)


def drops_last_batch(train_images: int, p: TrainParams, world_size: int) -> bool:
    """One process drops an epoch's last partial batch unless the split holds less than one batch (several:
    SeededEpochSampler hands out full global batches only)."""
    return world_size == 1 and train_images > p.batch_size


def loader_batches_per_epoch(train_images: int, p: TrainParams, world_size: int) -> int:
    """What make_loaders' train loader yields per epoch (each process), in batches of pass_batch_size."""
    if world_size > 1:
        return train_images // p.batch_size * p.accumulate_steps
    if drops_last_batch(train_images, p, world_size):
        return train_images // pass_batch_size(p, world_size)
    return math.ceil(train_images / pass_batch_size(p, world_size))


def optimizer_steps_per_epoch(train_images: int, p: TrainParams, world_size: int) -> int:
    return math.ceil(loader_batches_per_epoch(train_images, p, world_size) / p.accumulate_steps)


class EpochTally:
    """The epoch's loss and accuracy so far, kept on the device (no host sync per step). A mixed image (MixUp,
    CutMix) counts its target's share of the predicted class."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.seen = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += loss.detach() * len(logits)
        predicted = logits.argmax(1)
        self.correct += (targets.gather(1, predicted[:, None]).sum() if targets.ndim == 2
                         else (predicted == targets).sum())
        self.seen += len(logits)

    def running_loss(self, processes: Processes) -> float:
        """Summed over the processes, so every one of them sees the same value and stops together."""
        total_loss, total_seen = processes.sum(self.loss_sum, torch.tensor(self.seen, device=self.device))
        running = (total_loss / total_seen).item()
        if not math.isfinite(running):
            raise LossNotFinite(running)
        return running

    def totals(self, processes: Processes) -> tuple[float, float, int]:
        """(mean loss, accuracy, images) over every process."""
        total_loss, correct, seen = processes.sum(self.loss_sum, self.correct,
                                                  torch.tensor(self.seen, device=self.device))
        loss, seen = (total_loss / seen.clamp(min=1)).item(), int(seen.item())
        if not math.isfinite(loss):
            raise LossNotFinite(loss)
        return loss, correct.item() / max(seen, 1), seen


class RunProjection:
    """The projected training time of the rest of a run, measured on its first steps and printed once; a CPU run
    that train.device: auto fell back to is stopped when the projection is over CPU_RUN_LIMIT_HOURS."""

    def __init__(self, p: TrainParams, device: torch.device, processes: Processes):
        self.p, self.device, self.processes = p, device, processes
        self.hours_limit = CPU_RUN_LIMIT_HOURS if device.type == "cpu" and p.device == "auto" else None
        self.done = False

    def project(self, seconds: float, steps: int, steps_per_epoch: int, epoch: int) -> None:
        """From `seconds` for `steps` loader steps, averaged over the processes so that all of them take the same
        decision (steps only, validation aside)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        (total,) = self.processes.sum(torch.tensor(seconds / max(steps, 1)))
        per_step = total.item() / self.processes.world_size
        hours = per_step * steps_per_epoch * (self.p.epochs - epoch) / 3600
        self.done = True
        print(f"train: {per_step:.2f} s per step: the remaining {self.p.epochs - epoch} epoch(s) should take "
              f"{format_hours(hours)} on {self.device.type}")
        if self.hours_limit is not None and hours > self.hours_limit:
            raise StageError(
                f"no usable GPU (see above), and on this CPU the run would take about {format_hours(hours)} "
                f"({per_step:.2f} s per step x {steps_per_epoch} steps x {self.p.epochs - epoch} epochs), more than "
                f"the {self.hours_limit:g} h train.device: auto allows. Fix the GPU (README 'GPU drivers'), shrink "
                f"the run (README 'Try it on a CPU'), or set train.device: cpu to train on the CPU anyway")


def learning_rates(optimizer: torch.optim.Optimizer, head_lr_multiplier: float) -> dict[str, float]:
    """The lr now: `lr` (train.lr under the schedule: the top backbone layer's under layer decay) and, when it
    differs, `lr_head`."""
    groups = optimizer.param_groups
    # The top backbone group (scale 1, or the largest): under a strong train.layer_decay the stem's scale can
    # underflow to 0 (1e-70 ** 4), and it must not be divided by.
    backbone = max((g for g in groups if g["name"].startswith("backbone")), key=lambda g: g["lr_scale"])
    lrs = {"lr": backbone["lr"] / backbone["lr_scale"]}
    if head_lr_multiplier != 1:
        lrs["lr_head"] = next(g for g in groups if g["name"].startswith("head"))["lr"]
    return lrs


def loss_and_logits(criterion: nn.Module, outputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, main logits). Inception/GoogLeNet in training mode also return auxiliary logits."""
    if isinstance(outputs, tuple):
        logits, aux = outputs[0], [extra for extra in outputs[1:] if extra is not None]
    else:
        logits, aux = outputs, []
    loss = criterion(logits, labels)
    for extra in aux:
        loss = loss + AUX_LOSS_WEIGHT * criterion(extra, labels)
    return loss, logits


def new_model(params: Params, num_classes: int, head: ProbeHead | None, processes: Processes):
    """(the model to fine-tune, with its new head(s) and the probe's weights in the head when given; the
    constructor kwargs fitted to the resolution)."""
    m, p = params.model, params.train
    constructor = fit_to_resolution(m.arch, p.resolution, m.weights)
    if constructor.get("aux_logits") is False and processes.is_main:
        print(f"train: {m.arch}'s auxiliary classifier needs larger inputs than {p.resolution} px: training "
              f"without it (299 px keeps it)")
    model = build_model(m.arch, num_classes, m.weights, m.head, m.head_hidden, m.head_dropout, m.drop_path,
                        **constructor)
    if head is not None:
        initialize_head(model, head)
    return model, constructor


def training_phase(p: TrainParams, epoch: int) -> str:
    if epoch < p.freeze_epochs:
        return "the new head only"
    return f"from {p.unfreeze_from} on, and the head" if p.unfreeze_from else "every layer"


class Trainer:
    def __init__(self, params: Params, num_classes: int, device: torch.device, processes: Processes | None = None,
                 train_images: int | None = None, head: ProbeHead | None = None):
        """train_images: the train split's size, which a per-step lr schedule needs (None: one step per epoch).
        head: the linear probe the new head starts from (train.head_init: probe), else PyTorch's init."""
        processes = processes or Processes()
        p = params.train
        self.p = p
        self.device = device
        self.processes = processes
        self.on_cuda = device.type == "cuda"
        self.channels_last = resolve_channels_last(p.channels_last)
        self.compiled = resolve_switch(p.compile, device)
        self.model, self.constructor = new_model(params, num_classes, head, processes)
        self.preprocessing = model_preprocessing(self.model, p.resolution, p.crop)
        if p.sync_batchnorm and processes.distributed:
            if not self.on_cuda:
                raise RecipeError("train.sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only): "
                                  "set it to false for CPU processes")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model = self.model.to(device)
        self.freezer = Freezer(self.model, p)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = build_ema(self.model, p)
        self.kept_model = self.ema.module if self.ema is not None else self.model
        self.eval_model = torch.compile(self.kept_model) if self.compiled else self.kept_model
        self.step_model = torch.compile(self.model) if self.compiled else self.model
        self.ddp, self.wrapped_for = None, None
        self.precision = Precision(p.amp, device)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
        self.mixer = build_mixer(p, num_classes)
        self.optimizer = build_optimizer(self.model, p)
        self.steps_per_epoch = optimizer_steps_per_epoch(train_images, p, processes.world_size) if train_images else 1
        self.scheduler = build_scheduler(self.optimizer, p, self.steps_per_epoch)
        self.projection = RunProjection(p, device, processes)
        self.run_started, self.run_steps = time.perf_counter(), 0  # for the whole run's time left on the bar

    def weights_copy(self) -> dict:
        """The kept model's weights now, on the host: the best epoch's, kept while training goes on."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.kept_model.state_dict().items()}

    def learning_rates(self) -> dict[str, float]:
        return learning_rates(self.optimizer, self.p.head_lr_multiplier)

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, weight: float = 1.0):
        """Adds weight x the gradient of the loss on a uint8 batch (mixed by train.mixup/cutmix) to the params'
        gradients; returns (loss, logits, targets) without a host sync. targets: the labels, or the mixed one-hot
        targets (N, classes)."""
        inputs = to_model_input(images, self.device, self.channels_last, self.preprocessing.mean,
                                self.preprocessing.std)
        targets = labels.to(self.device, non_blocking=True)
        if self.mixer is not None:
            inputs, targets = self.mixer(inputs, targets)
        with self.precision.autocast():
            loss, logits = loss_and_logits(self.criterion, self.step_model(inputs), targets)
        self.precision.scaler.scale(loss * weight if weight != 1 else loss).backward()
        return loss, logits, targets

    def optimizer_step(self) -> None:
        """Clip (train.grad_clip_norm), step, clear the gradients, update the EMA and a per-step lr schedule."""
        if self.p.grad_clip_norm:
            self.precision.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.p.grad_clip_norm)
        self.precision.scaler.step(self.optimizer)
        self.precision.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.p.lr_schedule_unit == "step":
            self.scheduler.step()

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple]:
        """One optimizer step over `batches`: train.accumulate_steps uint8 loader batches (the last step of an epoch
        may gather fewer; each weighs 1 / their count). Returns each batch's (loss, logits, targets) without a host
        sync. The one step `train` runs; tests and benchmarks measure this one too."""
        outputs = []
        for index, (images, labels) in enumerate(batches):
            with self.gradients_synced(index == len(batches) - 1):
                outputs.append(self.forward_backward(images, labels, 1 / len(batches)))
        self.optimizer_step()
        return outputs

    def gradients_synced(self, synced: bool):
        """DDP averages gradients over the processes in every backward pass unless told not to: only the last
        accumulated batch of an optimizer step needs it."""
        return nullcontext() if synced or self.ddp is None else self.ddp.no_sync()

    def wrap_for_steps(self) -> None:
        """DDP registers its gradient hooks on the params trainable when it is built: rebuilt when they change."""
        trainable = frozenset(name for name, param in self.model.named_parameters() if param.requires_grad)
        if not self.processes.distributed or trainable == self.wrapped_for:
            return
        self.ddp = nn.parallel.DistributedDataParallel(self.model,
                                                       device_ids=[self.device.index] if self.on_cuda else None)
        self.step_model = torch.compile(self.ddp) if self.compiled else self.ddp
        self.wrapped_for = trainable

    def set_trainable(self, epoch: int) -> None:
        trainable, total = self.freezer.apply(epoch)
        self.wrap_for_steps()
        starts_phase = epoch == 0 or epoch == self.p.freeze_epochs
        if starts_phase and (trainable < total or epoch > 0):
            print(f"train: from epoch {epoch + 1}, {trainable} of {total} parameter tensors train "
                  f"({training_phase(self.p, epoch)})")

    def train_epoch(self, loader, epoch: int) -> EpochResult:
        self.set_trainable(epoch)
        self.step_model.train()
        self.freezer.keep_frozen_norm_statistics()
        tally = EpochTally(self.device)
        start = first_step_done = time.perf_counter()
        batches, group = len(loader), []
        loader_batches = iter(loader)  # before seed_epoch: a new iterator draws its workers' seed from the generator
        seed_epoch(self.p.seed, epoch, self.device)
        bar = tqdm(loader_batches, total=batches, desc=f"epoch {epoch + 1}/{self.p.epochs}", unit="batch",
                   leave=False)
        for step, batch in enumerate(bar):
            if step == 1:
                first_step_done = time.perf_counter()  # the first step includes compilation and warm-up
            elif step == 1 + PROJECT_AFTER_STEPS and not self.projection.done:
                self.projection.project(time.perf_counter() - first_step_done, PROJECT_AFTER_STEPS, batches, epoch)
            group.append(batch)
            if len(group) < self.p.accumulate_steps and step < batches - 1:
                continue
            for loss, logits, targets in self.train_step(group):
                tally.add(loss, logits, targets)
            self.run_steps += len(group)
            group = []
            if step % LOG_EVERY_STEPS == 0 or step == batches - 1:
                running = tally.running_loss(self.processes)
                steps_left = batches * (self.p.epochs - epoch) - step - 1
                seconds_left = (time.perf_counter() - self.run_started) / self.run_steps * steps_left
                bar.set_postfix(loss=f"{running:.3f}", run_left=format_duration(seconds_left))
        if not self.projection.done:  # an epoch too short to project from its first steps
            self.projection.project(time.perf_counter() - start, batches, batches, epoch)
        if self.p.lr_schedule_unit == "epoch":
            self.scheduler.step()
        loss, accuracy, seen = tally.totals(self.processes)  # the epoch's one host sync (and collective)
        return EpochResult(loss, accuracy, seen, time.perf_counter() - start)

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
    transform = train_transform(p.resolution, p.crop, p.crop_scale, p.crop_padding, p.augment,
                                preprocessing.interpolation, p.hflip, p.random_erasing, preprocessing.mean)
    sampler = SeededEpochSampler(len(train_split), p.seed, p.batch_size, processes.rank, processes.world_size)
    train_loader = make_loader(ImageSplit(train_split, transform), pass_batch_size(p, processes.world_size), workers,
                               sampler=sampler, drop_last=drops_last_batch(len(train_split), p, processes.world_size))
    if validation_split is None:
        return train_loader, None
    shard = range(processes.rank, len(validation_split), processes.world_size) if processes.distributed else None
    validation_loader = make_loader(ImageSplit(validation_split, eval_transform(preprocessing)),
                                    p.batch_size * 2 // processes.world_size, workers, sampler=shard)
    return train_loader, validation_loader
