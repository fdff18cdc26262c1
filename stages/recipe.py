"""The training recipe knobs of `train`: optimizer and its param groups, the lr schedule, layer freezing.

Each is a function of TrainParams alone, so the same params always give the same recipe (and a resumed
run rebuilds exactly what it saved). With the defaults this is the seeds' run 7: one SGD lr for every
layer, weight decay everywhere, lr / 10 every 30 epochs, nothing frozen.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stages.model import RecipeError
from stages.params import TrainParams


def is_head_param(name: str, head_paths: tuple[str, ...]) -> bool:
    return any(name.startswith(f"{path}.") for path in head_paths)


def param_groups(model: nn.Module, p: TrainParams) -> list[dict]:
    """backbone and head groups (the head at lr * head_lr_multiplier), each split into decayed and
    not-decayed params when train.no_weight_decay_on_norm_and_bias is set (norm weights and biases: 1-d)."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        part = "head" if is_head_param(name, model.head_paths) else "backbone"
        decayed = not (p.no_weight_decay_on_norm_and_bias and param.ndim <= 1)
        groups.setdefault((part, decayed), []).append(param)
    return [
        {"name": part if decayed else f"{part}/no_decay", "params": groups[part, decayed],
         "lr": p.lr * (p.head_lr_multiplier if part == "head" else 1.0),
         "weight_decay": p.weight_decay if decayed else 0.0}
        for part in ("backbone", "head") for decayed in (True, False) if (part, decayed) in groups
    ]


def build_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    groups = param_groups(model, p)
    if p.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=p.lr)
    return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov and p.momentum > 0)


def lr_factor(epoch: int, p: TrainParams) -> float:
    """The multiple of each group's base lr used during `epoch` (0-based): a linear warmup over
    warmup_epochs ((e + 1) / (warmup + 1) of the lr), then the schedule, counted from the end of warmup."""
    if epoch < p.warmup_epochs:
        return (epoch + 1) / (p.warmup_epochs + 1)
    t, length = epoch - p.warmup_epochs, p.epochs - p.warmup_epochs
    if p.lr_schedule == "step":
        return p.lr_gamma ** (t // p.lr_step_epochs)
    if p.lr_schedule == "exponential":
        return p.lr_gamma ** t
    if p.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t / length))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, p: TrainParams) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per epoch. The lambda is rebuilt from the params on resume (LambdaLR saves no functions)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, p))


class Freezer:
    """Which params train in which epoch: only the new head for the first freeze_epochs, then the params
    from module `unfreeze_from` on (in definition order), or all of them.

    Frozen params get no gradient, so the optimizers skip them entirely (no update, no weight decay, no
    momentum). BatchNorm layers whose weights are frozen run in eval mode: their running statistics stay
    those of the pretrained weights instead of drifting while nothing else in them can adapt.
    """

    def __init__(self, model: nn.Module, p: TrainParams):
        self.model = model
        self.p = p
        self.names = [name for name, _ in model.named_parameters()]
        self.head = {name for name in self.names if is_head_param(name, model.head_paths)}
        self.first_unfrozen = 0
        if p.unfreeze_from is not None:
            self.first_unfrozen = self.first_param_index(self.names, p.unfreeze_from)

    def first_param_index(self, names: list[str], module_path: str) -> int:
        prefix = f"{module_path}."
        for index, name in enumerate(names):
            if name.startswith(prefix):
                return index
        top_level = [name for name, child in self.model.named_children() if next(child.parameters(), None) is not None]
        raise RecipeError(f"train.unfreeze_from: {type(self.model).__name__} has no module '{module_path}' with "
                         f"parameters. Its top-level modules, in order: {', '.join(top_level)}")

    def trainable(self, epoch: int) -> set[str]:
        if epoch < self.p.freeze_epochs:
            return set(self.head)
        return set(self.names[self.first_unfrozen:]) | self.head

    def apply(self, epoch: int) -> tuple[int, int]:
        """Sets requires_grad for `epoch`; returns (trainable, total) param tensor counts."""
        trainable = self.trainable(epoch)
        total = 0
        for name, param in self.model.named_parameters():
            param.requires_grad_(name in trainable)
            total += 1
        return len(trainable), total

    def keep_frozen_norm_statistics(self) -> None:
        """Call after model.train(): frozen BatchNorm layers back to eval mode."""
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None \
                    and not module.weight.requires_grad:
                module.eval()
