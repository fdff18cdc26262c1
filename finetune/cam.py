"""GradCAM (the grad-cam package) for the gradcam stage and for predict: the target layer of each model family,
and overlays of the CAM of a chosen class on the image the model saw.

grad-cam's hooks do not fire on a torch.compile'd module, so these take the plain model; constructing a CAM
puts the model in eval mode.
"""

from __future__ import annotations

import math
import sys
import textwrap
from functools import partial
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from finetune import timm_models
from finetune.errors import StageError
from finetune.files import atomic_path
from finetune.model import given_module, refuse_unless_spatial
from finetune.transforms import Preprocessing, eval_transform, to_model_input

IMAGE_WEIGHT = 0.6  # of the photo in a CAM overlay (the heat map: the rest)
MIN_MAP_SIDE = 4  # a CAM coarser than 4x4 says nothing about where the model looked


def vit_tokens_to_grid(tokens: torch.Tensor, prefix_tokens: int = 1) -> torch.Tensor:
    """ViT activations (N, prefix + h*w, C), class (and register) tokens first, as a (N, C, h, w) map for GradCAM."""
    patches = tokens[:, prefix_tokens:, :]
    side = int(patches.shape[1] ** 0.5)
    return patches.reshape(len(patches), side, side, -1).permute(0, 3, 1, 2)


def channels_last_to_first(activations: torch.Tensor) -> torch.Tensor:
    """Swin's stages output (N, h, w, C)."""
    return activations.permute(0, 3, 1, 2)


def gradcam_target(model: nn.Module, spec: str, resolution: int | None = None, what: str = "gradcam.target_layer"):
    """(layer, reshape_transform or None) for GradCAM: the last spatial block of each model family (the last
    residual block for ResNets, as the seeds' eval.py), or the module path given in gradcam.target_layer, which
    must be a module whose output is a map (N, C, H, W) at `resolution` (checked with one forward pass of a blank
    image: on the meta device in check, no compute)."""
    if spec != "auto":
        module = given_module(model, spec, what)
        if resolution is not None:
            refuse_unless_spatial(model, spec, module, resolution, what)
        return module, None
    if timm_models.is_timm_model(model):
        return timm_target(model)
    family = type(model).__name__
    by_family = {
        "ResNet": lambda: model.layer4[-1],  # also ResNeXt, Wide ResNet
        "Inception3": lambda: model.Mixed_7c,
        "GoogLeNet": lambda: model.inception5b,
        "RegNet": lambda: model.trunk_output,
        "ShuffleNetV2": lambda: model.conv5,
        "MNASNet": lambda: model.layers[-1],
        "VisionTransformer": lambda: model.encoder.layers[-1].ln_1,
        "SwinTransformer": lambda: model.features[-1],
    }
    reshape = {"VisionTransformer": vit_tokens_to_grid, "SwinTransformer": channels_last_to_first}.get(family)
    if family in by_family:
        return by_family[family](), reshape
    if isinstance(getattr(model, "features", None), nn.Sequential):  # VGG, DenseNet, MobileNet, EfficientNet...
        return model.features[-1], None
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise StageError(f"no convolution in {family}; set gradcam.target_layer to a module path")
    return convs[-1], None


def timm_target(model: nn.Module):
    """A timm model's: the last block's first norm for ViT-style models (ViT, DeiT, EVA, DINOv2: patch tokens after
    the class/register tokens), else the last stage its feature_info names (ConvNeXt stages.3, ResNet layer4,
    EfficientNet's last block...), permuted for the models whose stages output channels last (timm's Swin)."""
    prefix_tokens = getattr(model, "num_prefix_tokens", None)
    if prefix_tokens is not None and hasattr(model, "blocks"):
        return model.blocks[-1].norm1, partial(vit_tokens_to_grid, prefix_tokens=prefix_tokens)
    layer = model.get_submodule(model.feature_info[-1]["module"])
    return layer, channels_last_to_first if getattr(model, "output_fmt", "NCHW") == "NHWC" else None


def cam_overlays(model: nn.Module, target, images: torch.Tensor, classes: list[int],
                 preprocessing: Preprocessing, device) -> tuple[list[np.ndarray], tuple[int, int]]:
    """(RGB uint8 overlay per image, the CAM's own map size) for uint8 NCHW `images` already transformed for the
    model, each with the CAM of its class in `classes`. target: (layer, reshape_transform) of gradcam_target."""
    layer, reshape = target
    shapes = []
    hook = layer.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape)))
    inputs = to_model_input(images, device, False, preprocessing.mean, preprocessing.std)
    try:
        with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            heat = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(c) for c in classes])
    finally:
        hook.remove()
    # image_weight: the photo shows through the heat map (grad-cam's default 0.5 hid small objects)
    overlays = [show_cam_on_image(image.permute(1, 2, 0).numpy().astype(np.float32) / 255, mask, use_rgb=True,
                                  image_weight=IMAGE_WEIGHT) for image, mask in zip(images, heat)]
    return overlays, map_size(shapes[0] if shapes else (), reshape is not None)


def map_size(shape: tuple, tokens: bool) -> tuple[int, int]:
    """The CAM's resolution before it is upsampled to the image: the target layer's spatial size."""
    if tokens or len(shape) != 4:
        return (0, 0)  # reshaped tokens (ViT/Swin): their grid is the patch grid, fine at any usual size
    return int(shape[2]), int(shape[3])


_WARNED: set[tuple] = set()  # once per process: the gradcam stage draws two grids from the same layer


def warn_if_coarse(size: tuple[int, int], resolution: int, who: str) -> None:
    if 0 < min(size) < MIN_MAP_SIDE and (size, resolution, who) not in _WARNED:
        _WARNED.add((size, resolution, who))
        print(f"{who}: warning: at {resolution} px the GradCAM layer's map is {size[0]}x{size[1]}: too coarse to "
              f"show where the model looked; use a higher train.resolution or an earlier gradcam.target_layer "
              f"(e.g. layer3[-1])", file=sys.stderr)


COLUMNS = 3  # 690 px wide: two runs' grids side by side in `dvc plots diff` fit a 1400-px screen
BATCH = 16
TILE_INCHES, DPI = 2.3, 100


def worst_misclassified(per_class: list[dict], predictions: list[dict], count: int,
                        rng: np.random.Generator) -> list[str]:
    """Ids of misclassified test images: one from each class, worst class first."""
    wrong_by_class: dict[str, list[str]] = {}
    for row in predictions:
        if row["actual"] != row["predicted"]:
            wrong_by_class.setdefault(row["actual"], []).append(row["id"])
    chosen = []
    for row in sorted(per_class, key=lambda r: float(r["accuracy"])):
        if len(chosen) == count:
            break
        if wrong := wrong_by_class.get(row["class_name"]):
            chosen.append(wrong[rng.integers(len(wrong))])
    return chosen


def cam_tiles(model, target, split, rows: list[int], checkpoint, device
              ) -> list[tuple[np.ndarray, int, int, float]]:
    """(overlay RGB image, true label, predicted label, its probability) per row of the split; target: (layer,
    reshape)."""
    transform, preprocessing = eval_transform(checkpoint.preprocessing), checkpoint.preprocessing
    tiles = []
    for start in range(0, len(rows), BATCH):
        batch = [split[i] for i in rows[start:start + BATCH]]
        images = torch.stack([transform(r["image"]["bytes"]) for r in batch])
        with torch.no_grad():
            probs = model(to_model_input(images, device, False, preprocessing.mean, preprocessing.std)).softmax(1)
        confidence, predicted = (values.tolist() for values in probs.max(1))
        overlays, size = cam_overlays(model, target, images, predicted, preprocessing, device)
        if start == 0:
            warn_if_coarse(size, preprocessing.resolution, "gradcam")
        tiles += list(zip(overlays, [row["label"] for row in batch], predicted, confidence))
    return tiles


def draw_grid(tiles, names: list[str], title: str, path: Path) -> None:
    """Rows of COLUMNS tiles, always COLUMNS wide: a grid of one or two tiles keeps room for its title, and two
    runs' grids stay the same width side by side in `dvc plots diff`."""
    columns = COLUMNS
    rows = max(1, math.ceil(len(tiles) / columns))
    fig = Figure(figsize=(columns * TILE_INCHES, rows * (TILE_INCHES + 0.55) + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (overlay, true, pred, probability) in zip(axes.flat, tiles):
        ax.imshow(overlay)
        # parse_math=False: a class name is literal text; `under_$5_over_$10` is no mathtext formula
        ax.set_title(f"true: {wrap(names[true])}\npred: {wrap(names[pred])} ({probability:.0%})", fontsize=7,
                     color="darkgreen" if true == pred else "firebrick", parse_math=False)
    if not tiles:
        axes.flat[0].text(0, 0.5, "no misclassified test images", fontsize=12)
    fig.suptitle("\n".join(textwrap.wrap(title, 70)), fontsize=9, parse_math=False)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")


def wrap(name: str) -> str:
    return "\n".join(textwrap.wrap(name, 28))
