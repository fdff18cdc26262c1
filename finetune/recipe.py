"""The training recipe knobs of `train`: optimizer and its param groups (layer-wise lr decay included), the lr
schedule, layer freezing, the EMA of the weights and batch mixing (MixUp/CutMix).

Each is a function of TrainParams (and the model) alone, so the same params always give the same recipe (and a
resumed run rebuilds exactly what it saved). With the defaults this is the seeds' run 7: one SGD lr for every
layer, weight decay everywhere, lr / 10 every 30 epochs, nothing frozen, no EMA, no mixing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from finetune.model import RecipeError
from finetune.params import TrainParams


def is_head_param(name: str, head_paths: tuple[str, ...]) -> bool:
    return any(name.startswith(f"{path}.") for path in head_paths)


def has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def trunk_blocks(model: nn.Module) -> list[str]:
    """The module paths of a torchvision model's successive blocks, for layer-wise lr decay: ResNet's stages
    (layer1..layer4), else the children of the outermost nn.Sequential with at least 4 children that have
    parameters (the `features` of ConvNeXt, EfficientNet, MobileNet, VGG, Swin, DenseNet; a ViT's
    `encoder.layers`), else its top-level children."""
    stages = [name for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, name)]
    if stages:
        return stages
    sequences = []
    for name, module in model.named_modules():
        with_params = sum(has_parameters(child) for child in module.children())
        if name and isinstance(module, nn.Sequential | nn.ModuleList) and with_params >= 4:
            sequences.append((name.count("."), -with_params, name))
    if sequences:
        *_, trunk = min(sequences)
        return [f"{trunk}.{child}" for child, module in model.get_submodule(trunk).named_children()
                if has_parameters(module)]
    return [name for name, child in model.named_children() if has_parameters(child)]


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Each parameter's depth, 0 for the stem up to the head's: timm models by their own group_matcher (ViT
    blocks, ConvNeXt/ResNet stages and blocks), torchvision ones by trunk_blocks (params before the first block:
    0; in block i: i + 1; after the last, and the head: the top)."""
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        return group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    blocks = trunk_blocks(model)
    ids, depth = {}, 0
    for name, _ in model.named_parameters():
        inside = [i for i, block in enumerate(blocks) if name.startswith(f"{block}.")]
        if inside:
            depth = inside[0] + 1
        elif depth:  # past the trunk: the final norm, the head
            depth = len(blocks) + 1
        ids[name] = depth
    return ids


def lr_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """Each parameter's lr multiple under layer-wise lr decay: layer_decay ** (layers between it and the top)."""
    if layer_decay == 1:
        return {name: 1.0 for name, _ in model.named_parameters()}
    ids = layer_ids(model)
    top = max(ids.values())
    return {name: layer_decay ** (top - ids.get(name, top)) for name, _ in model.named_parameters()}


def param_groups(model: nn.Module, p: TrainParams) -> list[dict]:
    """backbone and head groups (the head at lr * head_lr_multiplier), each split into decayed and
    not-decayed params when train.no_weight_decay_on_norm_and_bias is set (norm weights and biases: 1-d), and
    the backbone into one group per lr scale under train.layer_decay. `lr_scale` is each group's lr / train.lr."""
    scales = lr_scales(model, p.layer_decay)
    groups: dict[tuple[str, float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        head = is_head_param(name, model.head_paths)
        scale = p.head_lr_multiplier if head else scales[name]
        decayed = not (p.no_weight_decay_on_norm_and_bias and param.ndim <= 1)
        groups.setdefault(("head" if head else "backbone", scale, decayed), []).append(param)
    ordered = sorted(groups, key=lambda key: (key[0] == "head", key[1], not key[2]))  # stem first, head last
    layered = p.layer_decay < 1
    return [
        {"name": part + (f"/x{scale:.3g}" if layered and part == "backbone" else "") + ("" if decayed else "/no_decay"),
         "params": groups[part, scale, decayed], "lr": p.lr * scale, "lr_scale": scale,
         "weight_decay": p.weight_decay if decayed else 0.0}
        for part, scale, decayed in ordered
    ]


def build_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    groups = param_groups(model, p)
    if p.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=p.lr)
    return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov and p.momentum > 0)


def lr_factor(t: int, p: TrainParams, steps_per_epoch: int = 1) -> float:
    """The multiple of each group's base lr used during unit `t` (0-based): epochs, or optimizer steps with
    train.lr_schedule_unit: step. A linear warmup over warmup_epochs ((t + 1) / (warmup + 1) of the lr, warmup
    in units), then the schedule, counted from the end of warmup."""
    per_epoch = steps_per_epoch if p.lr_schedule_unit == "step" else 1
    warmup, length = p.warmup_epochs * per_epoch, (p.epochs - p.warmup_epochs) * per_epoch
    if t < warmup:
        return (t + 1) / (warmup + 1)
    t -= warmup
    if p.lr_schedule == "step":
        return p.lr_gamma ** (t // (p.lr_step_epochs * per_epoch))
    if p.lr_schedule == "exponential":
        return p.lr_gamma ** (t / per_epoch)
    if p.lr_schedule == "cosine":  # warmup_epochs == epochs leaves no unit to decay over (scheduler.step() after
        return 0.5 * (1 + math.cos(math.pi * t / max(length, 1)))  # the last one still asks for it)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, p: TrainParams,
                    steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per epoch, or after every optimizer step with train.lr_schedule_unit: step. The lambda is
    rebuilt from the params on resume (LambdaLR saves no functions)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(t, p, steps_per_epoch))


def build_ema(model: nn.Module, p: TrainParams) -> torch.optim.swa_utils.AveragedModel | None:
    """train.ema_decay > 0: an exponential moving average of the weights and BatchNorm statistics, updated
    after every optimizer step (ema = decay * ema + (1 - decay) * weights; the first update copies)."""
    if p.ema_decay == 0:
        return None
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(p.ema_decay), use_buffers=True)


def build_mixer(p: TrainParams, num_classes: int):
    """train.mixup_alpha / cutmix_alpha: torchvision's MixUp / CutMix on the normalized batch (one of them, drawn
    per batch, when both are on); (images, labels) -> (mixed images, mixed one-hot targets). None when off."""
    from torchvision.transforms import v2

    mixes = []
    if p.mixup_alpha:
        mixes.append(v2.MixUp(alpha=p.mixup_alpha, num_classes=num_classes))
    if p.cutmix_alpha:
        mixes.append(v2.CutMix(alpha=p.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


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
        top_level = [name for name, child in self.model.named_children() if has_parameters(child)]
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
        """Call after model.train(): frozen BatchNorm layers back to eval mode, and every one of them with
        train.norm_statistics: pretrained."""
        keep_all = self.p.norm_statistics == "pretrained"
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (keep_all or (
                    module.weight is not None and not module.weight.requires_grad)):
                module.eval()
