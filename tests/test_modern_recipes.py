"""timm backbones and the regularizers of current fine-tuning recipes: each knob tested for what it does, and a
timm model with every knob on through the real pipeline, predict and export."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnxruntime
import pytest
import torch
import yaml
from torchvision.transforms import v2

from finetune.cam import gradcam_target, vit_tokens_to_grid
from finetune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from finetune.errors import StageError
from finetune.model import RecipeError, WeightsUnavailable, build_model, fit_to_resolution, model_preprocessing
from finetune.params import ParamsError, parse_params
from finetune.recipe import build_mixer, layer_ids, lr_factor
from finetune.timm_models import create
from finetune.trainer import Trainer, loader_batches_per_epoch, optimizer_steps_per_epoch
from finetune.transforms import train_transform
from tests.conftest import make_project, run, shipped_params, tiny_params

CPU = torch.device("cpu")
VIT = "timm/test_vit"  # timm's own tiny test models: a ViT (LayerNorm only, no BatchNorm) and a ConvNeXt
CONVNEXT = "timm/test_convnext"


def params_with(**overrides):
    raw = shipped_params()
    raw["model"].update(arch="resnet18", weights="none")
    raw["train"].update(resolution=32, num_workers=0)
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return parse_params(raw)


def trainer(num_classes: int = 4, seed: int = 0, **overrides) -> Trainer:
    torch.manual_seed(seed)
    return Trainer(params_with(**overrides), num_classes, CPU)


def batch(size: int = 8, side: int = 32, num_classes: int = 4, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 3, side, side), dtype=torch.uint8, generator=generator)
    return images, torch.arange(size) % num_classes


# --- timm backbones -------------------------------------------------------------------------------------------

def test_timm_model_brings_its_own_preprocessing_into_the_checkpoint(tmp_path):
    """test_vit's weights use mean/std 0.5, bicubic, crop 0.95 (its pretrained_cfg), not ImageNet's constants."""
    trained = trainer(**{"model.arch": VIT, "train.resolution": 64})
    p = trained.preprocessing
    assert (p.mean, p.std, p.interpolation, p.crop_fraction) == ((0.5,) * 3, (0.5,) * 3, "bicubic", 0.95)
    assert trained.constructor == {"img_size": 64}  # built for 64 px (its weights: 160 px)
    save_checkpoint(tmp_path / "model.pt", trained.model, Checkpoint(VIT, list("abcd"), p, {
        "head": "linear", "head_hidden": 8, "head_dropout": 0.0}, trained.constructor))
    model, checkpoint = load_checkpoint(tmp_path / "model.pt")
    assert checkpoint.preprocessing == p and model.patch_embed.img_size == (64, 64)
    images, _ = batch(2, 64)
    model = model.to(memory_format=torch.channels_last)  # as the trainer holds it: the same kernels, bit for bit
    with torch.no_grad():
        assert torch.equal(model(images.float()), trained.model.eval()(images.float()))


def test_timm_heads_are_replaced_and_drop_path_reaches_the_model():
    vit = build_model(VIT, 7, "none", head="mlp", head_hidden=16, drop_path=0.2, img_size=32)
    assert vit.head_paths == ("head",) and vit.head[-1].out_features == 7
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    convnext = build_model(CONVNEXT, 3, "none")
    assert convnext.head_paths == ("head.fc",) and convnext.head.fc.out_features == 3
    with pytest.raises(RecipeError, match="model.drop_path applies to timm models"):
        build_model("resnet18", 3, "none", drop_path=0.1)


def test_timm_local_weights_with_their_original_head_load_then_get_new_heads(tmp_path):
    original = build_model(CONVNEXT, 5, "none")
    source = create(CONVNEXT, pretrained=False)
    torch.save(source.state_dict(), tmp_path / "imagenet.pt")
    model = build_model(CONVNEXT, 5, str(tmp_path / "imagenet.pt"))
    assert torch.equal(model.stem[0].weight, source.stem[0].weight)
    assert model.head.fc.out_features == 5 and not torch.equal(model.stem[0].weight, original.stem[0].weight)


def test_timm_names_tags_and_weights_are_checked_before_any_work():
    with pytest.raises(RecipeError, match="unknown timm model 'convnext_tinyy'.*Did you mean timm/convnext_tiny"):
        fit_to_resolution("timm/convnext_tinyy", 224)
    with pytest.raises(RecipeError, match="has no pretrained tag 'nope'. Its tags: .*fb_in22k"):
        fit_to_resolution("timm/convnext_tiny.nope", 224, "pretrained")
    with pytest.raises(RecipeError, match="test_vit4 has no pretrained weights"):
        fit_to_resolution("timm/test_vit4", 160, "pretrained")
    with pytest.raises(RecipeError, match="cannot take train.resolution=40"):  # not a multiple of the 16-px patch
        fit_to_resolution(VIT, 40)
    with pytest.raises(ParamsError, match="model.weights 'IMAGENET1K_V2' is neither pretrained"):
        params_with(**{"model.arch": VIT, "model.weights": "IMAGENET1K_V2"})
    with pytest.raises(ParamsError, match="model.drop_path applies to timm models"):
        params_with(**{"model.drop_path": 0.1})


def test_unreachable_hub_weights_name_the_offline_options():
    """HF_HUB_OFFLINE=1 (conftest): the same error timm gets without a network, without its retries."""
    with pytest.raises(WeightsUnavailable) as caught:
        build_model("timm/test_vit.r160_in1k", 3, "pretrained")
    message = str(caught.value)
    assert "could not get the timm weights of timm/test_vit.r160_in1k" in message
    assert "hf download timm/test_vit.r160_in1k" in message and "model.weights: none" in message


@pytest.mark.parametrize("arch,layer,tokens", [(VIT, "blocks.5.norm1", True), (CONVNEXT, "stages.3", False),
                                               ("timm/test_resnet", "layer4", False)])
def test_gradcam_finds_the_target_layer_of_timm_families(arch, layer, tokens):
    model = build_model(arch, 3, "none", **fit_to_resolution(arch, 64)).eval()
    target, reshape = gradcam_target(model, "auto")
    assert target is model.get_submodule(layer) and (reshape is not None) == tokens
    if tokens:  # class token dropped, the 4x4 patch grid kept
        assert reshape(torch.zeros(2, 1 + 16, 64)).shape == (2, 64, 4, 4)
        assert reshape.func is vit_tokens_to_grid


# --- regularizers and optimization knobs ----------------------------------------------------------------------

def test_ema_weights_are_the_exponential_average_of_the_steps():
    decay = 0.5
    ema_run = trainer(**{"train.ema_decay": decay, "train.momentum": 0.0, "train.lr": 0.1})
    history = []
    for seed in range(3):
        ema_run.train_step([batch(seed=seed)])
        history.append({k: v.detach().clone() for k, v in ema_run.model.state_dict().items()})
    expected = history[0]  # the first update copies the weights
    for weights in history[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] if weights[k].is_floating_point()
                    else weights[k] for k in weights}
    kept = ema_run.weights_copy()
    assert all(torch.allclose(kept[k].float(), expected[k].float(), atol=1e-6) for k in expected if
               "num_batches_tracked" not in k)
    assert not torch.equal(kept["fc.weight"], history[-1]["fc.weight"])  # the kept weights are the EMA's
    assert ema_run.eval_model is ema_run.ema.module


def epoch_weights(accumulate: int, batches: list) -> dict:
    """timm's ViT (no BatchNorm) after one epoch over `batches`, from the same initial weights."""
    run_ = trainer(**{"model.arch": VIT, "train.resolution": 32, "train.batch_size": 8,
                      "train.accumulate_steps": accumulate, "train.momentum": 0.9, "train.lr": 0.05})
    run_.train_epoch(batches, 0)
    return run_.model.state_dict()


def test_accumulated_batches_equal_one_big_batch_without_batchnorm():
    images, labels = batch(12)
    # 2 passes of 4 images then a last step of 1 pass: as 8 images in one step, then 4.
    accumulated = epoch_weights(2, [(images[:4], labels[:4]), (images[4:8], labels[4:8]), (images[8:], labels[8:])])
    whole = epoch_weights(1, [(images[:8], labels[:8]), (images[8:], labels[8:])])
    assert all(torch.allclose(accumulated[k], whole[k], atol=1e-6) for k in whole)
    p = params_with(**{"train.batch_size": 8, "train.accumulate_steps": 2}).train
    assert loader_batches_per_epoch(100, p, 1) == 25 and optimizer_steps_per_epoch(100, p, 1) == 13
    assert loader_batches_per_epoch(100, p, 2) == 24 and optimizer_steps_per_epoch(100, p, 2) == 12


def test_accumulation_must_split_the_batch_evenly():
    with pytest.raises(ParamsError, match="does not split evenly into train.devices=1 x train.accumulate_steps=3"):
        params_with(**{"train.batch_size": 32, "train.accumulate_steps": 3})


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_sum_to_one_and_train_accuracy_counts_shares(mixup, cutmix):
    p = params_with(**{"train.mixup_alpha": mixup, "train.cutmix_alpha": cutmix}).train
    images, labels = batch(8)
    mixed, targets = build_mixer(p, 4)(images.float(), labels)
    assert mixed.shape == images.shape and targets.shape == (8, 4)
    assert torch.allclose(targets.sum(1), torch.ones(8)) and (targets > 0).sum(1).max() <= 2
    assert build_mixer(params_with().train, 4) is None
    mixing = trainer(**{"train.mixup_alpha": mixup, "train.cutmix_alpha": cutmix, "train.label_smoothing": 0.1})
    result = mixing.train_epoch([batch(8, seed=s) for s in range(3)], 0)
    assert 0 <= result.accuracy <= 1 and np.isfinite(result.loss)


def test_layer_decay_gives_each_layer_its_lr():
    lr, decay = 0.1, 0.5
    resnet = trainer(**{"train.layer_decay": decay, "train.lr": lr, "train.head_lr_multiplier": 10.0})
    rate = {name: group["lr"] for group in resnet.optimizer.param_groups for name in
            [n for n, p in resnet.model.named_parameters() if any(p is q for q in group["params"])]}
    # stem, layer1..layer4, then the head at lr x head_lr_multiplier
    for name, depth in [("conv1.weight", 0), ("layer1.0.conv1.weight", 1), ("layer4.1.bn2.bias", 4)]:
        assert rate[name] == pytest.approx(lr * decay ** (5 - depth)), name
    assert rate["fc.weight"] == pytest.approx(lr * 10)
    assert resnet.learning_rates() == {"lr": pytest.approx(lr), "lr_head": pytest.approx(lr * 10)}
    vit = build_model(VIT, 3, "none", img_size=32)
    ids = layer_ids(vit)  # timm's own grouping: embeddings 0, block i at i + 1, final norm, head on top
    assert ids["pos_embed"] == 0 and ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.5.mlp.fc2.bias"] == 6
    assert ids["head.weight"] == max(ids.values())


def test_gradient_clipping_bounds_the_update():
    """Plain SGD at lr 1 without weight decay: the update is the (clipped) gradient itself."""
    clip = 0.01
    clipped = trainer(**{"train.grad_clip_norm": clip, "train.lr": 1.0, "train.momentum": 0.0,
                         "train.weight_decay": 0.0})
    before = [p.detach().clone() for p in clipped.model.parameters()]
    clipped.train_step([batch()])
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(clipped.model.parameters(), before)])
    assert update.norm().item() == pytest.approx(clip, rel=1e-3)


def test_per_step_schedule_follows_the_epoch_curve_smoothly():
    epochs = params_with(**{"train.lr_schedule": "cosine", "train.epochs": 10, "train.warmup_epochs": 2}).train
    steps = params_with(**{"train.lr_schedule": "cosine", "train.epochs": 10, "train.warmup_epochs": 2,
                           "train.lr_schedule_unit": "step"}).train
    per_epoch = 50
    for epoch in range(2, 10):  # after warmup: at each epoch's first step, the per-epoch value
        assert lr_factor(epoch * per_epoch, steps, per_epoch) == pytest.approx(lr_factor(epoch, epochs))
    warmup = [lr_factor(s, steps, per_epoch) for s in range(2 * per_epoch)]
    assert warmup == sorted(warmup) and warmup[0] == pytest.approx(1 / 101) and warmup[-1] == pytest.approx(100 / 101)
    stepped = Trainer(params_with(**{"train.lr_schedule_unit": "step", "train.warmup_epochs": 1, "train.epochs": 2,
                                     "train.batch_size": 4}), 4, CPU, train_images=12)
    assert stepped.steps_per_epoch == 3
    lrs = []
    for images, labels in [batch(4, seed=s) for s in range(3)]:
        lrs.append(stepped.learning_rates()["lr"])
        stepped.train_step([(images, labels)])
    assert lrs == pytest.approx([0.1 / 4, 0.2 / 4, 0.3 / 4]) and stepped.scheduler.last_epoch == 3


def test_hflip_off_never_flips_and_on_does():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, :, :8] = 255  # a bright left edge
    def outputs(hflip):
        transform = train_transform(32, crop_scale=(1.0, 1.0), hflip=hflip)
        results = []
        for seed in range(20):
            torch.manual_seed(seed)
            results.append(transform(image))
        return results
    assert all(torch.equal(out, image) for out in outputs(False))
    assert any(torch.equal(out, image.flip(2)) for out in outputs(True))
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in train_transform(32, hflip=False).transforms)


def test_random_erasing_paints_the_mean_pixel_and_augment_policies_apply():
    image = torch.zeros(3, 48, 48, dtype=torch.uint8)
    torch.manual_seed(0)
    erased = train_transform(48, crop_scale=(1.0, 1.0), hflip=False, random_erasing=1.0, mean=(0.5, 0.25, 0.75))(image)
    painted = erased.flatten(1)[:, erased[0].flatten() > 0]
    assert painted.shape[1] > 0 and painted.unique(dim=1).tolist() == [[128], [64], [191]]
    for augment, kind in [("randaugment", v2.RandAugment), ("autoaugment", v2.AutoAugment)]:
        for interpolation in ("bilinear", "bicubic"):  # bicubic: timm models' resize
            transform = train_transform(32, augment=augment, interpolation=interpolation)
            assert any(isinstance(t, kind) for t in transform.transforms)
            for seed in range(30):  # every op drawn at least once
                torch.manual_seed(seed)
                assert transform(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)).shape == (3, 32, 32)


def test_torchvision_preprocessing_is_unchanged():
    model = build_model("resnet18", 3, "none")
    p = model_preprocessing(model, 224, "random_resized")
    assert (p.mean, p.interpolation, p.crop_fraction) == ((0.485, 0.456, 0.406), "bilinear", 0.875)


# --- the real pipeline ----------------------------------------------------------------------------------------

EVERY_KNOB = {"model.arch": VIT, "model.drop_path": 0.1, "train.resolution": 64, "train.batch_size": 16,
              "train.optimizer": "adamw", "train.lr": 1e-3, "train.weight_decay": 0.05,
              "train.no_weight_decay_on_norm_and_bias": True, "train.lr_schedule": "cosine", "train.warmup_epochs": 1,
              "train.lr_schedule_unit": "step", "train.layer_decay": 0.8, "train.accumulate_steps": 2,
              "train.grad_clip_norm": 1.0, "train.ema_decay": 0.9, "train.label_smoothing": 0.1,
              "train.mixup_alpha": 0.2, "train.cutmix_alpha": 1.0, "train.augment": "randaugment",
              "train.random_erasing": 0.25, "train.epochs": 3}


@pytest.mark.slow
def test_a_timm_model_with_every_knob_goes_through_every_stage_predict_and_export(tmp_path, image_folder):
    params = tiny_params(image_folder, **{"gradcam.num_samples": 2, "gradcam.num_misclassified": 1})
    project = make_project(tmp_path / "project", params)
    knobs = [word for key, value in EVERY_KNOB.items() for word in ("-S", f"{key}={value}")]
    result = run(["dvc", "exp", "run", *knobs], project)
    log = result.stdout + result.stderr
    assert "timm/test_vit (none)" in log and "EMA 0.9" in log and "in 2 passes of 8" in log
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert 0 <= evaluation["top1"] <= 1
    _, checkpoint = load_checkpoint(project / "models/model.pt")
    assert checkpoint.arch == VIT and checkpoint.preprocessing.mean == (0.5, 0.5, 0.5)
    assert checkpoint.constructor == {"img_size": 64} and checkpoint.params["train"]["ema_decay"] == 0.9
    assert (project / "plots/gradcam/samples.png").stat().st_size > 0
    check = json.loads((project / "metrics/export.json").read_text())
    assert check["relative_logit_difference"] <= 1e-4 and check["top1_agreement"] == 1
    session = onnxruntime.InferenceSession(str(project / "models/export/model.onnx"))
    logits = session.run(["logits"], {"image": np.random.rand(2, 3, 64, 64).astype(np.float32)})[0]
    assert logits.shape == (2, 6)
    photos = tmp_path / "photos"
    photos.mkdir()
    for class_dir in sorted((image_folder / "test").iterdir())[:2]:
        shutil.copy(sorted(class_dir.glob("*.jpg"))[0], photos / f"{class_dir.name}.jpg")
    out = tmp_path / "preds"
    predicted = run([sys.executable, "-m", "commands.predict", str(photos), "--out", str(out), "--gradcam",
                     str(tmp_path / "cams")], project)
    assert "2 image(s) classified" in predicted.stdout and len(list((tmp_path / "cams").glob("*.png"))) == 2
    lr_curve = (project / "metrics/train/plots/metrics/lr.tsv").read_text().splitlines()
    assert len(lr_curve) == 1 + 3


def test_check_stage_refuses_a_bad_timm_recipe_up_front(tmp_path, image_folder, monkeypatch):
    from finetune.params import load_params
    from finetune.preflight import check

    params = tiny_params(image_folder, **{"model.arch": "timm/convnext_tiny.nope", "model.weights": "pretrained"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match="no pretrained tag 'nope'"):
        check(load_params())
