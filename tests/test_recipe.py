"""Each recipe knob of train, checked for its effect: optimizer groups, schedules, freezing, loss, crops, archs,
dataset presets."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch import nn

from finetune.model import RecipeError
from finetune.params import ParamsError, parse_params
from finetune.recipe import Freezer, build_optimizer, build_scheduler, param_groups
from finetune.trainer import Trainer, loss_and_logits
from finetune.transforms import train_transform
from tests.conftest import tiny_params

CPU = torch.device("cpu")


def params_with(**overrides):
    return parse_params(tiny_params("/nonexistent", **overrides))


def trainer_with(num_classes: int = 3, **overrides) -> Trainer:
    torch.manual_seed(0)
    return Trainer(params_with(**{"train.resolution": 32, **overrides}), num_classes, CPU)


def batches(count: int = 2, size: int = 32, num_classes: int = 3):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=generator),
             torch.randint(0, num_classes, (8,), generator=generator)) for _ in range(count)]


def lrs_by_epoch(**overrides) -> list[float]:
    p = params_with(**overrides).train
    model = nn.Linear(2, 2)
    model.head_paths = ()
    optimizer = build_optimizer(model, p)
    scheduler = build_scheduler(optimizer, p)
    lrs = []
    for _ in range(p.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


# -- optimizer and param groups ---------------------------------------------------------------------------------

def test_default_is_one_sgd_lr_for_every_layer():
    trainer = trainer_with()
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"backbone", "head"}
    assert groups["backbone"]["lr"] == groups["head"]["lr"] == 0.05
    assert groups["backbone"]["momentum"] == 0.9 and groups["backbone"]["nesterov"] is False
    assert {id(p) for p in groups["head"]["params"]} == {id(trainer.model.fc.weight), id(trainer.model.fc.bias)}


def test_head_lr_multiplier_gives_the_head_its_own_lr():
    trainer = trainer_with(**{"train.lr": 1e-4, "train.head_lr_multiplier": 10.0})
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups == {"backbone": 1e-4, "head": pytest.approx(1e-3)}
    assert trainer.learning_rates() == {"lr": 1e-4, "lr_head": pytest.approx(1e-3)}


def test_adamw_and_nesterov_are_chosen_by_params():
    assert isinstance(trainer_with(**{"train.optimizer": "adamw"}).optimizer, torch.optim.AdamW)
    assert trainer_with(**{"train.nesterov": True}).optimizer.param_groups[0]["nesterov"] is True


def test_norm_and_bias_params_can_skip_weight_decay():
    model = trainer_with().model
    p = params_with(**{"train.no_weight_decay_on_norm_and_bias": True, "train.weight_decay": 5e-4}).train
    groups = {g["name"]: g for g in param_groups(model, p)}
    assert set(groups) == {"backbone", "backbone/no_decay", "head", "head/no_decay"}
    assert groups["backbone/no_decay"]["weight_decay"] == 0 and groups["backbone"]["weight_decay"] == 5e-4
    assert all(param.ndim == 1 for param in groups["backbone/no_decay"]["params"])  # BN weights/biases
    assert [param.shape for param in groups["head/no_decay"]["params"]] == [model.fc.bias.shape]
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


# -- lr schedules -----------------------------------------------------------------------------------------------

def test_step_schedule_is_the_seeds_divide_by_ten_every_30_epochs():
    lrs = lrs_by_epoch(**{"train.epochs": 90, "train.lr": 0.1, "train.lr_step_epochs": 30})
    assert lrs[0] == lrs[29] == 0.1
    assert lrs[30] == pytest.approx(0.01) and lrs[59] == pytest.approx(0.01)
    assert lrs[60] == pytest.approx(0.001) and lrs[89] == pytest.approx(0.001)


def test_exponential_schedule_multiplies_every_epoch():
    lrs = lrs_by_epoch(**{"train.epochs": 30, "train.lr": 1e-3, "train.lr_schedule": "exponential",
                          "train.lr_gamma": 0.9})
    assert lrs[0] == 1e-3 and lrs[1] == pytest.approx(9e-4) and lrs[10] == pytest.approx(1e-3 * 0.9**10)


def test_cosine_schedule_with_warmup():
    lrs = lrs_by_epoch(**{"train.epochs": 105, "train.lr": 0.1, "train.lr_schedule": "cosine",
                          "train.warmup_epochs": 5})
    assert lrs[:5] == pytest.approx([0.1 * k / 6 for k in range(1, 6)])  # linear ramp up
    assert lrs[5] == pytest.approx(0.1)  # the cosine starts at the full lr after warmup
    assert lrs[55] == pytest.approx(0.05)  # half way through the 100 cosine epochs
    assert lrs[104] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def test_cosine_with_warmup_as_long_as_the_run_ends_at_the_full_lr():
    """Before: warmup_epochs == epochs (the schema allows it) divided by zero at the scheduler step after the last
    epoch, and every resume hit it again."""
    for unit in ("epoch", "step"):
        p = params_with(**{"train.epochs": 3, "train.warmup_epochs": 3, "train.lr_schedule": "cosine",
                           "train.lr_schedule_unit": unit}).train
        optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=p.lr)
        scheduler = build_scheduler(optimizer, p, steps_per_epoch=4)
        for _ in range(3 * (4 if unit == "step" else 1)):
            optimizer.step()
            scheduler.step()  # the one after the last unit asks for unit `length` of an empty schedule
        assert optimizer.param_groups[0]["lr"] == pytest.approx(p.lr)


def test_a_layer_decay_that_underflows_the_stem_still_trains_and_reports_its_lr():
    """Before: layer_decay 1e-70 (the schema asks only > 0) made the stem's lr scale 0, and the lr report divided
    by it at epoch 1."""
    trainer = trainer_with(**{"train.layer_decay": 1e-70, "train.epochs": 1})
    scales = [g["lr_scale"] for g in trainer.optimizer.param_groups]
    assert min(scales) == 0.0  # underflowed: the stem does not learn, as asked
    assert trainer.learning_rates()["lr"] == pytest.approx(0.05)
    trainer.train_epoch(batches(), epoch=0)


def test_constant_schedule():
    assert set(lrs_by_epoch(**{"train.epochs": 5, "train.lr_schedule": "constant"})) == {0.05}


# -- freezing ---------------------------------------------------------------------------------------------------

def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_frozen_backbone_is_bit_for_bit_unchanged_then_partly_unfrozen():
    trainer = trainer_with(**{"train.epochs": 3, "train.freeze_epochs": 1, "train.unfreeze_from": "layer4",
                              "train.weight_decay": 1e-2})
    start = snapshot(trainer.model)
    trainer.train_epoch(batches(), epoch=0)
    after_frozen = snapshot(trainer.model)
    # Only the head moved: every backbone weight and BatchNorm statistic is as it was, despite weight decay.
    assert changed(start, after_frozen) == {"fc.weight", "fc.bias"}
    trainer.train_epoch(batches(), epoch=1)
    moved = changed(after_frozen, snapshot(trainer.model))
    assert {"fc.weight", "layer4.1.conv2.weight", "layer4.0.bn1.running_mean"} <= moved
    assert not {name for name in moved if name.startswith(("conv1", "bn1", "layer1", "layer2", "layer3"))}


def test_unfreeze_from_everything_after_the_freeze():
    trainer = trainer_with(**{"train.epochs": 2, "train.freeze_epochs": 1})
    assert trainer.freezer.trainable(0) == {"fc.weight", "fc.bias"}
    assert trainer.freezer.trainable(1) == {name for name, _ in trainer.model.named_parameters()}


def test_unknown_module_to_unfreeze_names_the_modules_there_are():
    with pytest.raises(RecipeError, match=r"no module 'Mixed_7a'.*conv1, bn1, layer1, layer2, layer3, layer4, fc"):
        trainer_with(**{"train.unfreeze_from": "Mixed_7a"})


def test_frozen_batchnorm_layers_run_in_eval_mode():
    trainer = trainer_with(**{"train.epochs": 2, "train.freeze_epochs": 1})
    trainer.freezer.apply(0)
    trainer.model.train()
    trainer.freezer.keep_frozen_norm_statistics()
    assert not trainer.model.bn1.training and not trainer.model.layer4[1].bn2.training
    freezer = Freezer(trainer.model, trainer.p)
    freezer.apply(1)
    trainer.model.train()
    freezer.keep_frozen_norm_statistics()
    assert trainer.model.bn1.training



def test_pretrained_norm_statistics_keep_every_batchnorm_in_eval_mode_while_its_weights_train():
    trainer = trainer_with()
    p = trainer.p.model_copy(update={"norm_statistics": "pretrained"})
    freezer = Freezer(trainer.model, p)
    freezer.apply(0)
    trainer.model.train()
    freezer.keep_frozen_norm_statistics()
    norms = [m for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert all(m.weight.requires_grad for m in norms) and trainer.model.layer1.training
    before = trainer.model.bn1.running_mean.clone()
    trainer.model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(trainer.model.bn1.running_mean, before)


def test_pretrained_norm_statistics_need_pretrained_weights():
    with pytest.raises(ParamsError, match="train.norm_statistics: pretrained needs pretrained weights"):
        params_with(**{"train.norm_statistics": "pretrained"})

# -- loss and head ----------------------------------------------------------------------------------------------

def test_label_smoothing_changes_the_loss():
    logits = torch.tensor([[4.0, 0.0, -2.0], [0.5, 3.0, 0.0]])
    labels = torch.tensor([0, 1])
    plain, _ = loss_and_logits(trainer_with().criterion, logits, labels)
    smoothed, _ = loss_and_logits(trainer_with(**{"train.label_smoothing": 0.1}).criterion, logits, labels)
    assert smoothed > plain
    assert smoothed == pytest.approx(nn.functional.cross_entropy(logits, labels, label_smoothing=0.1).item())


def test_mlp_head_trains_a_step():
    trainer = trainer_with(**{"model.head": "mlp", "model.head_hidden": 16, "model.head_dropout": 0.5})
    assert isinstance(trainer.model.fc, nn.Sequential)
    result = trainer.train_epoch(batches(1), epoch=0)
    assert math.isfinite(result.loss)


def test_head_dropout_without_a_hidden_layer_is_refused():
    with pytest.raises(ParamsError, match="head_dropout only applies to model.head: mlp"):
        params_with(**{"model.head_dropout": 0.5})


# -- crop and augment policies ----------------------------------------------------------------------------------

@pytest.mark.parametrize("crop", ["random_resized", "resize_then_crop"])
@pytest.mark.parametrize("augment", ["none", "trivial_augment", "color_jitter"])
def test_every_crop_and_augment_policy_gives_uint8_squares(crop, augment):
    image = Image.effect_noise((150, 90), 60).convert("RGB")
    transform = train_transform(64, crop, [0.25, 1.0], 8, augment)
    torch.manual_seed(0)
    tensor = transform(image)
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, 64, 64)


def test_resize_then_crop_pads_a_square_resize():
    names = [type(t).__name__ for t in train_transform(448, "resize_then_crop", [0.08, 1.0], 8).transforms]
    assert names[:3] == ["DecodeForResize", "Resize", "RandomCrop"]
    resize, crop = train_transform(448, "resize_then_crop", [0.08, 1.0], 8).transforms[1:3]
    assert resize.size == [512, 512] and crop.padding == [8, 8, 8, 8]


def test_crop_scale_is_passed_and_checked():
    assert train_transform(64, "random_resized", [0.25, 1.0]).transforms[0].scale == (0.25, 1.0)
    with pytest.raises(ParamsError, match="crop_scale must be"):
        params_with(**{"train.crop_scale": [0.5, 0.2]})


# -- architectures ----------------------------------------------------------------------------------------------

def test_inception_v3_trains_a_step_with_its_auxiliary_head_at_299():
    trainer = trainer_with(**{"model.arch": "inception_v3", "train.resolution": 299})
    assert trainer.model.aux_logits and trainer.model.head_paths == ("fc", "AuxLogits.fc")
    before = trainer.model.AuxLogits.fc.weight.detach().clone()
    images, labels = batches(1, 299)[0]
    result = trainer.train_epoch([(images[:2], labels[:2])], epoch=0)
    assert math.isfinite(result.loss)
    assert not torch.equal(before, trainer.model.AuxLogits.fc.weight)  # the auxiliary loss reached its head


def test_inception_v3_below_299_trains_without_its_auxiliary_head(capsys):
    trainer = trainer_with(**{"model.arch": "inception_v3", "train.resolution": 96})
    assert trainer.model.AuxLogits is None and trainer.model.head_paths == ("fc",)
    assert "auxiliary classifier needs larger inputs" in capsys.readouterr().out
    images, labels = batches(1, 96)[0]
    assert math.isfinite(trainer.train_epoch([(images[:4], labels[:4])], epoch=0).loss)


def test_a_resolution_the_model_cannot_take_is_refused_before_training():
    with pytest.raises(RecipeError, match="inception_v3 cannot take train.resolution=64"):
        trainer_with(**{"model.arch": "inception_v3", "train.resolution": 64})


# -- dataset presets --------------------------------------------------------------------------------------------

def preset_data(preset: str, **data):
    raw = tiny_params("/x")
    raw["data"] |= {"preset": preset, "source": None, "val_fraction": None, "test_fraction": None} | data
    return parse_params(raw).data


def test_presets_resolve_to_their_hub_sources_and_splits():
    cars, caltech, flowers = preset_data("stanford_cars"), preset_data("caltech101"), preset_data("flowers102")
    assert (cars.source, cars.val_fraction, cars.test_fraction) == ("tanganke/stanford_cars", 0.0, 0.0)
    assert (caltech.source, caltech.val_fraction, caltech.test_fraction) == ("flwrlabs/caltech101", 0.2, 0.1)
    assert (flowers.source, flowers.val_fraction, flowers.test_fraction) == ("dpdl-benchmark/oxford_flowers102", 0, 0)


def test_explicit_values_win_over_the_preset():
    data = preset_data("caltech101", source="/data/caltech_copy", val_fraction=0.1)
    assert (data.source, data.val_fraction, data.test_fraction) == ("/data/caltech_copy", 0.1, 0.1)


def test_no_preset_needs_a_source():
    with pytest.raises(ParamsError, match="data.source is null and data.preset is none"):
        preset_data("none")
    with pytest.raises(ParamsError, match="leaves too little to train on"):
        preset_data("caltech101", val_fraction=0.5, test_fraction=0.45)
