"""The prepared dataset, the one definition of train/eval transforms, and the loaders.

Images travel as uint8 from decode to the device and are normalized there: a
uint8 batch is a quarter of the float32 one to collate and copy, and the
arithmetic is free on a GPU.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
MODEL_PATH = Path("models/model.pt")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # the usual ImageNet eval: resize the short side to res/0.875, centre-crop res
TTA_CROP_FRACTIONS = (1.0, EVAL_CROP_FRACTION, 0.75)  # 3 scales (x 2 flips) for test-time augmentation


def open_split(split: str, root: Path = PREPARED_DIR) -> datasets.Dataset:
    """A split of a saved DatasetDict, memory-mapped, images left as encoded bytes.

    Nothing here calls .map()/.filter(): on a dataset opened from another stage's
    output those write cache files into it and DVC would see the output change.
    """
    splits = datasets.load_from_disk(str(root))
    if split not in splits:
        raise KeyError(f"{root} has no '{split}' split (it has {', '.join(splits)})")
    return splits[split].cast_column("image", datasets.Image(decode=False))


def split_names(root: Path = PREPARED_DIR) -> list[str]:
    return list(datasets.load_from_disk(str(root)).keys())


def class_names(split: datasets.Dataset) -> list[str]:
    return split.features["label"].names


def decode_rgb(encoded: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(encoded))
    return image.convert("RGB") if image.mode != "RGB" else image


def train_transform(resolution: int) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(resolution, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])


def eval_transform(resolution: int, crop_fraction: float = EVAL_CROP_FRACTION) -> v2.Compose:
    return v2.Compose([
        v2.Resize(round(resolution / crop_fraction), antialias=True),
        v2.CenterCrop(resolution),
        v2.PILToTensor(),
    ])


class ImageSplit(torch.utils.data.Dataset):
    """(uint8 CHW image, label) pairs from a prepared split."""

    def __init__(self, split: datasets.Dataset, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        row = self.split[index]
        return self.transform(decode_rgb(row["image"]["bytes"])), row["label"]


def resolve_workers(requested: int) -> int:
    """-1 picks one loader process per CPU core, leaving one for the training process."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores - 1, 16))


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0,
                drop_last: bool = False) -> torch.utils.data.DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=seed_worker,
        generator=generator,
        drop_last=drop_last,
    )


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW on the host -> normalized float on the device."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std
