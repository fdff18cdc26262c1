"""Stage `train`: fine-tune `model.arch` on the prepared train split; save models/model.pt.

Default recipe (the seeds' run 7): full fine-tune, one lr for every layer, SGD lr 0.1
momentum 0.9 wd 1e-4, batch 128, 90 epochs, lr /10 every 30, RandomResizedCrop + flip.

Per epoch DVCLive logs train loss/accuracy, learning rate, images/s and a held-out
loss/accuracy: on the validation split when there is one (it then picks the kept
epoch), else on the test split for the curve only (the kept model is the last epoch,
so the test split never selects anything).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from dvclive import Live
from torch import nn
from tqdm import tqdm

from stages.data import (IMAGENET_MEAN, IMAGENET_STD, MODEL_PATH, ImageSplit, class_names, eval_transform,
                         make_loader, open_split, resolve_workers, split_names, to_model_input, train_transform)
from stages.model import WeightsUnavailable, build_model, save_checkpoint
from stages.params import Params, TrainParams, load_params_or_exit
from stages.runtime import Precision, pick_device, predict_logits, seed_everything

LIVE_DIR = Path("metrics/train")
LOG_EVERY_STEPS = 20  # how often the progress bar shows the running loss (each costs a host sync)


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    images: int
    seconds: float


class Trainer:
    def __init__(self, params: Params, num_classes: int, device: torch.device):
        p = params.train
        self.p = p
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.channels_last = p.channels_last and self.on_cuda
        self.model = build_model(params.model.arch, num_classes, params.model.weights).to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Compiled module for the steps; self.model (same parameters) is what gets saved and GradCAM'd.
        self.step_model = torch.compile(self.model) if p.compile and self.on_cuda else self.model
        self.precision = Precision(p.amp, device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=p.lr, momentum=p.momentum,
                                         weight_decay=p.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=p.lr_step_epochs, gamma=p.lr_gamma)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_epoch(self, loader, epoch: int) -> EpochResult:
        self.step_model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.p.epochs}", unit="batch", leave=False)
        for step, (images, labels) in enumerate(bar):
            inputs = to_model_input(images, self.device, self.channels_last)
            labels = labels.to(self.device, non_blocking=True)
            with self.precision.autocast():
                logits = self.step_model(inputs)
                loss = self.criterion(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.scaler.scale(loss).backward()
            self.precision.scaler.step(self.optimizer)
            self.precision.scaler.update()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            if step % LOG_EVERY_STEPS == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")
        loss_value = loss_sum.item() / max(seen, 1)  # the epoch's one host sync
        self.scheduler.step()
        return EpochResult(loss_value, correct.item() / max(seen, 1), seen, time.perf_counter() - start)

    def held_out(self, loader) -> tuple[float, float]:
        logits, labels = predict_logits(self.step_model, loader, self.device, self.precision, self.channels_last,
                                        desc="held-out")
        return nn.functional.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def check_finite(loss: float, p: TrainParams, epoch: int) -> None:
    if not math.isfinite(loss):
        sys.exit(f"error: the training loss became {loss} in epoch {epoch + 1}. The learning rate is likely too "
                 f"high for this batch size (train.lr={p.lr}, train.batch_size={p.batch_size}): scale it with the "
                 f"batch size (the seeds' 0.1 is for batch 128) or lower it.")


def should_evaluate(epoch: int, p: TrainParams) -> bool:
    last = epoch == p.epochs - 1
    return last or (p.eval_every > 0 and (epoch + 1) % p.eval_every == 0)


def main() -> None:
    params = load_params_or_exit()
    p = params.train
    seed_everything(p.seed)
    device = pick_device()
    train_split = open_split("train")
    names = class_names(train_split)
    held_out_name = "validation" if "validation" in split_names() else "test"
    held_out_split = open_split(held_out_name)
    try:
        trainer = Trainer(params, len(names), device)
    except WeightsUnavailable as error:
        sys.exit(f"error: {error}")

    workers = resolve_workers(p.num_workers)
    # drop_last: every step sees a full batch (no 1-image batch for BatchNorm, no recompile for torch.compile);
    # the reshuffle each epoch still shows every image.
    train_loader = make_loader(ImageSplit(train_split, train_transform(p.resolution)), p.batch_size, shuffle=True,
                               workers=workers, seed=p.seed, drop_last=len(train_split) > p.batch_size)
    held_out_loader = make_loader(ImageSplit(held_out_split, eval_transform(p.resolution)), p.batch_size * 2,
                                  shuffle=False, workers=workers)
    print(f"train: {params.model.arch} ({params.model.weights}) on {device} ({trainer.precision.name}), "
          f"{len(train_split)} train / {len(held_out_split)} {held_out_name} images, {len(names)} classes, "
          f"{p.resolution}px, batch {p.batch_size}, {workers} loader workers")
    if held_out_name == "test":
        print("train: no validation split (data.val_fraction: 0): the test curve is logged for monitoring only; "
              "the last epoch is kept")

    best_accuracy, best_state, kept_epoch = -1.0, None, p.epochs - 1
    with Live(str(LIVE_DIR), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        for epoch in range(p.epochs):
            lr = trainer.lr
            result = trainer.train_epoch(train_loader, epoch)
            check_finite(result.loss, p, epoch)
            live.log_metric("epoch", epoch + 1)
            live.log_metric("lr", lr)
            live.log_metric("train/loss", result.loss)
            live.log_metric("train/acc", result.accuracy)
            live.log_metric("train/images_per_s", result.images / result.seconds)
            line = f"epoch {epoch + 1}/{p.epochs}: lr {lr:.4g}, train loss {result.loss:.4f} acc {result.accuracy:.4f}"
            if should_evaluate(epoch, p):
                loss, accuracy = trainer.held_out(held_out_loader)
                live.log_metric(f"{held_out_name}/loss", loss)
                live.log_metric(f"{held_out_name}/acc", accuracy)
                line += f", {held_out_name} loss {loss:.4f} acc {accuracy:.4f}"
                if held_out_name == "validation" and accuracy > best_accuracy:
                    best_accuracy, kept_epoch = accuracy, epoch
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
            print(f"{line}, {result.images / result.seconds:.0f} images/s")
            live.next_step()
        if best_state is not None:
            trainer.model.load_state_dict(best_state)
        live.summary["kept_epoch"] = kept_epoch + 1

    save_checkpoint(MODEL_PATH, trainer.model, arch=params.model.arch, class_names=names,
                    resolution=p.resolution, mean=IMAGENET_MEAN, std=IMAGENET_STD, epoch=kept_epoch + 1,
                    params=params.model_dump())
    print(f"train: saved epoch {kept_epoch + 1} to {MODEL_PATH}")


if __name__ == "__main__":
    main()
