"""The one definition of the train and eval transforms, and the preprocessing a model is saved with.

Images travel as uint8 from decode to the device and are normalized there (`to_model_input`): a uint8 batch
is a quarter of the float32 one to collate and copy, and the arithmetic is free on a GPU.

Both transforms take a prepared JPEG's bytes, a PIL image (predict's photos, opened but not yet decoded), or a
uint8 tensor, and give a uint8 tensor: every image is cropped and resized by the same tensor kernels. Their
first step decodes: a JPEG is decoded at the largest DCT-domain reduction (1/2, 1/4, 1/8) that still leaves
what the crop or resize needs at least its output size, so the resize after it still shrinks (BENCHMARKS.md
says how these pixels differ from a full decode's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from finetune.images import MAX_ASPECT_RATIO, dct_reduction, decode_prepared, jpeg_size, load_pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # the usual ImageNet eval: resize the short side to res/0.875, centre-crop res
TTA_CROP_FRACTIONS = (1.0, EVAL_CROP_FRACTION, 0.75)  # 3 scales (x 2 flips) for test-time augmentation
COLOR_JITTER = 0.4  # brightness, contrast and saturation range of train.augment: color_jitter (torchvision's usual)
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    """How a model's inputs are made; saved in its checkpoint, so evaluate, gradcam, predict and export
    feed it exactly what it was trained on."""

    resolution: int  # the square the model sees
    resize: str = "shorter_side"  # eval resize before the centre crop: "shorter_side" or "square"
    crop_fraction: float = EVAL_CROP_FRACTION  # the crop is this share of the resized side
    mean: tuple[float, float, float] = IMAGENET_MEAN  # of pixel values / 255
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @classmethod
    def for_training(cls, resolution: int, crop: str) -> Preprocessing:
        """train.crop resize_then_crop trains on a square resize, so eval resizes to a square too."""
        return cls(resolution, resize="square" if crop == "resize_then_crop" else "shorter_side")

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        """As a checkpoint stores it; a damaged or foreign record is a ValueError naming the field."""
        if not isinstance(values, dict) or set(values) != set(cls.__dataclass_fields__):
            raise ValueError(f"preprocessing record {sorted(values) if isinstance(values, dict) else values!r} does "
                             f"not have the fields {sorted(cls.__dataclass_fields__)}")
        def bad(field: str, allowed: str) -> ValueError:
            return ValueError(f"preprocessing {field} {values[field]!r} is not {allowed}")
        resolution, fraction = values["resolution"], values["crop_fraction"]
        if type(resolution) is not int or not 16 <= resolution <= 4096:
            raise bad("resolution", "a whole number of pixels (16-4096)")
        if values["resize"] not in ("shorter_side", "square"):
            raise bad("resize", "shorter_side or square")
        if type(fraction) not in (int, float) or not 0 < fraction <= 1:
            raise bad("crop_fraction", "a number in (0, 1]")
        if values["interpolation"] not in INTERPOLATIONS:
            raise bad("interpolation", f"one of {', '.join(INTERPOLATIONS)}")
        for field in ("mean", "std"):
            numbers = values[field]
            if (not isinstance(numbers, list | tuple) or len(numbers) != 3
                    or not all(type(v) in (int, float) and 0 <= v <= 255 for v in numbers)
                    or (field == "std" and not all(v > 0 for v in numbers))):
                raise bad(field, "3 numbers (per channel, of pixel values / 255)")
        return cls(**{**values, "crop_fraction": float(fraction), "mean": tuple(map(float, values["mean"])),
                      "std": tuple(map(float, values["std"]))})

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def describe(self) -> str:
        what = "square" if self.resize == "square" else "shorter side"
        return f"{what} to {square_side(self.resolution, self.crop_fraction)}, centre crop {self.resolution}"


def square_side(resolution: int, crop_fraction: float = EVAL_CROP_FRACTION) -> int:
    """resize_then_crop's square (512 for 448: the published 94% recipe), also eval's shorter side."""
    return round(resolution / crop_fraction)


def train_transform(resolution: int, crop: str = "random_resized", crop_scale=(0.08, 1.0), crop_padding: int = 0,
                    augment: str = "none", interpolation: str = "bilinear", hflip: bool = True,
                    random_erasing: float = 0.0, mean=IMAGENET_MEAN) -> v2.Compose:
    """The random crop of train.crop, a horizontal flip (train.hflip), train.augment, then random erasing with
    probability train.random_erasing; uint8 CHW out.

    Erased boxes are filled with the mean pixel (`mean`, the model's), which normalization turns into 0: the
    fill of torchvision's reference recipe, which erases after normalizing."""
    mode = INTERPOLATIONS[interpolation]
    if crop == "resize_then_crop":
        side = square_side(resolution)
        cropping = [DecodeForResize(side), v2.Resize((side, side), interpolation=mode, antialias=True),
                    v2.RandomCrop(resolution, padding=crop_padding)]
    else:
        cropping = [DecodingRandomResizedCrop(resolution, scale=tuple(crop_scale), interpolation=mode, antialias=True)]
    # The policies' rotations and shears run torchvision's tensor affine kernels: nearest or bilinear only.
    geometric = v2.InterpolationMode.BILINEAR
    augmenting = {
        "none": [],
        "randaugment": [v2.RandAugment(interpolation=geometric)],  # 2 ops at magnitude 9, as torchvision's recipes
        "autoaugment": [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=geometric)],
        # torchvision's default (nearest) interpolation, as in the runs this recipe has made so far
        "trivial_augment": [v2.TrivialAugmentWide()],
        "color_jitter": [v2.ColorJitter(brightness=COLOR_JITTER, contrast=COLOR_JITTER, saturation=COLOR_JITTER)],
    }[augment]
    flipping = [v2.RandomHorizontalFlip()] if hflip else []
    erasing = [v2.RandomErasing(random_erasing, value=[round(m * 255) for m in mean])] if random_erasing else []
    return v2.Compose([*cropping, *flipping, *augmenting, *erasing])


def eval_transform(preprocessing: Preprocessing, crop_fraction: float | None = None) -> v2.Compose:
    """Resize (the shorter side, or to a square), then centre-crop; crop_fraction overrides the saved one (TTA).

    The longer side is capped at MAX_ASPECT_RATIO times the shorter one: images beyond that ratio are refused
    where they are read, and the cap keeps any that slip through from asking for gigabytes."""
    p = preprocessing
    side = square_side(p.resolution, crop_fraction or p.crop_fraction)
    mode = INTERPOLATIONS[p.interpolation]
    resize = (v2.Resize((side, side), interpolation=mode, antialias=True) if p.resize == "square"
              else v2.Resize(side, interpolation=mode, max_size=side * MAX_ASPECT_RATIO, antialias=True))
    return v2.Compose([DecodeForResize(side), resize, v2.CenterCrop(p.resolution)])


class DecodeForResize(torch.nn.Module):
    """Decodes an image that will be resized to at least side x side (eval's shorter side, resize_then_crop's
    square) at the largest DCT reduction that keeps it at least that big: a 1024x768 photo at 1/2 for a
    256-px shorter side, a 12-megapixel one at 1/8. uint8 CHW out; a tensor passes unchanged."""

    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward(self, image: bytes | Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, bytes):
            return decode_prepared(image, dct_reduction(jpeg_size(image), (self.side, self.side)))
        if isinstance(image, Image.Image):  # Pillow's draft applies the same rule (finetune/images.py)
            return F.pil_to_tensor(load_pixels(image, draft_size=(self.side, self.side)))
        return image


class DecodingRandomResizedCrop(v2.RandomResizedCrop):
    """RandomResizedCrop that also takes a prepared JPEG's bytes. The box is drawn from the size in the header
    (the same random draws as from the decoded image), then the JPEG is decoded at the largest DCT reduction
    that leaves the box at least the output size, and the box, scaled alike, is cropped and resized.
    TorchCodec decodes whole images, Pillow reduced ones: each the faster at what it does (BENCHMARKS.md)."""

    def plan(self, encoded: bytes) -> tuple[tuple[int, int], dict, int]:
        """The JPEG's (width, height) from its header, the box drawn for it (from torch's generator), and the DCT
        reduction that box allows."""
        width, height = jpeg_size(encoded)
        # make_params only asks its input's size: a zero-strided stand-in of the image's shape
        box = self.make_params([torch.empty((), dtype=torch.uint8).expand(3, height, width)])
        return (width, height), box, dct_reduction((box["width"], box["height"]), (self.size[1], self.size[0]))

    def forward(self, image: bytes | Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = F.pil_to_tensor(load_pixels(image))
        if not isinstance(image, bytes):
            return super().forward(image)
        (width, height), box, reduction = self.plan(image)
        decoded = decode_prepared(image, reduction)
        if reduction == 1:
            return self.transform(decoded, box)
        scale_y, scale_x = decoded.shape[-2] / height, decoded.shape[-1] / width
        top, left = round(box["top"] * scale_y), round(box["left"] * scale_x)
        return self.transform(decoded, dict(top=top, left=left,
                                            height=min(round(box["height"] * scale_y), decoded.shape[-2] - top),
                                            width=min(round(box["width"] * scale_x), decoded.shape[-1] - left)))


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 NCHW on the host -> normalized float on the device."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std
