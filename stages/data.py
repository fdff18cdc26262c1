"""The prepared dataset, the one definition of train/eval transforms, and the loaders.

Images travel as uint8 from decode to the device and are normalized there: a
uint8 batch is a quarter of the float32 one to collate and copy, and the
arithmetic is free on a GPU.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import datasets
import torch
from torchcodec.decoders import decode_jpeg
from torchvision.transforms import v2

RAW_DIR = Path("data/raw")
IGNORED_FILES = "ignored_files.json"  # in RAW_DIR: source files fetch left out (no image suffix)
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


def decode_prepared(encoded: bytes) -> torch.Tensor:
    """A prepared image (always a 3-channel JPEG, see prepare) as uint8 CHW.

    TorchCodec, not PIL: it decodes these JPEGs ~10% faster on one core, and its output goes straight to
    torchvision's uint8 tensor kernels, which crop and resize at twice PIL's speed (BENCHMARKS.md).
    """
    return decode_jpeg(encoded, mode="RGB")


COLOR_JITTER = 0.4  # brightness, contrast and saturation range of train.augment: color_jitter (torchvision's usual)


def square_side(resolution: int, crop_fraction: float = EVAL_CROP_FRACTION) -> int:
    """resize_then_crop's square (512 for 448: the published 94% recipe), also eval's shorter side."""
    return round(resolution / crop_fraction)


def train_transform(resolution: int, crop: str = "random_resized", crop_scale=(0.08, 1.0), crop_padding: int = 0,
                    augment: str = "none") -> v2.Compose:
    """The random crop of train.crop, a horizontal flip, then train.augment; uint8 CHW out.

    Both transforms take a uint8 tensor or a PIL image (predict's photos); a PIL image becomes a tensor first,
    so every image is cropped and resized by the same tensor kernels as in training.
    """
    if crop == "resize_then_crop":
        side = square_side(resolution)
        cropping = [v2.Resize((side, side), antialias=True), v2.RandomCrop(resolution, padding=crop_padding)]
    else:
        cropping = [v2.RandomResizedCrop(resolution, scale=tuple(crop_scale), antialias=True)]
    augmenting = {
        "none": [],
        "trivial_augment": [v2.TrivialAugmentWide()],
        "color_jitter": [v2.ColorJitter(brightness=COLOR_JITTER, contrast=COLOR_JITTER, saturation=COLOR_JITTER)],
    }[augment]
    return v2.Compose([v2.PILToTensor(), *cropping, v2.RandomHorizontalFlip(), *augmenting])


def eval_transform(resolution: int, crop: str = "random_resized", crop_fraction: float = EVAL_CROP_FRACTION
                   ) -> v2.Compose:
    """Resize (the shorter side, or to a square when training resized to a square), then centre-crop."""
    side = square_side(resolution, crop_fraction)
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize((side, side) if crop == "resize_then_crop" else side, antialias=True),
        v2.CenterCrop(resolution),
    ])


def model_eval_transform(meta: dict, crop_fraction: float = EVAL_CROP_FRACTION) -> v2.Compose:
    """The eval transform a saved model was trained for (its checkpoint's resolution and crop policy)."""
    return eval_transform(meta["resolution"], meta.get("crop", "random_resized"), crop_fraction)


class ImageSplit(torch.utils.data.Dataset):
    """(uint8 CHW image, label) pairs from a prepared split.

    A key is a row index, or (row index, seed) from SeededEpochSampler: then the random
    augmentation of that image is drawn from that seed alone.
    """

    def __init__(self, split: datasets.Dataset, transform, decode=decode_prepared):
        self.split = split
        self.transform = transform
        self.decode = decode  # another decoder only to compare with (benchmarks.speed)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        row = self.split[index]
        image = self.decode(row["image"]["bytes"])
        if seed is None:
            return self.transform(image), row["label"]
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone is what the transforms draw from. torch.manual_seed would also queue
            # lazy CUDA/XPU/MPS seeds, formatting a stack trace for each: 0.8 ms, a fifth of an image's cost.
            torch.default_generator.manual_seed(seed)
            return self.transform(image), row["label"]


class SeededEpochSampler(torch.utils.data.Sampler):
    """Yields (row, seed) pairs: the order of an epoch and every image's augmentation are a function of
    (seed, epoch) alone. So a run gives the same weights whatever the number of loader workers, and a run
    interrupted and resumed at an epoch boundary gives the same weights as one that was not.


    With several processes, each global batch of `batch_size` consecutive pairs is split into equal
    contiguous parts, part `rank` for this process: the processes together see exactly the batches one
    process would (the last partial batch is dropped, so every process takes the same number of steps).
    """

    def __init__(self, size: int, seed: int, batch_size: int = 1, rank: int = 0, world_size: int = 1):
        if world_size > 1 and size < batch_size:
            raise ValueError(f"the train split has {size} images, fewer than one global batch ({batch_size}) "
                             f"to split over {world_size} processes: lower train.batch_size")
        self.size = size
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.size
        return self.size // self.batch_size * (self.batch_size // self.world_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        seeds = torch.randint(2**62, (self.size,), generator=generator)
        pairs = list(zip(order.tolist(), seeds.tolist()))
        if self.world_size == 1:
            return iter(pairs)
        part = self.batch_size // self.world_size
        starts = range(self.rank * part, self.size // self.batch_size * self.batch_size, self.batch_size)
        return iter([pair for start in starts for pair in pairs[start:start + part]])


def resolve_workers(requested: int, processes: int = 1) -> int:
    """-1 picks one loader process per CPU core, leaving one for each training process, shared between
    the training processes."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min((cores - processes) // processes, 16))


def leave_interrupts_to_the_main_process(worker_id: int) -> None:
    """Ctrl-C reaches every process of the group: the main process stops the run and shuts workers down.

    SIGTERM is left to kill a worker: it is how multiprocessing ends daemonic workers still alive at
    interpreter exit (a worker ignoring it leaves the main process waiting for it forever).
    A worker still handing a batch's shared memory to a main process that has just stopped gets a broken
    pipe in multiprocessing's fd-sharing thread; that only means the receiver is gone, so it is not printed.
    Errors of the worker's own work reach the main process through the loader, not through this hook.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    default_hook = sys.excepthook

    def quiet_when_main_process_is_gone(kind, value, traceback):
        if not issubclass(kind, (BrokenPipeError, ConnectionResetError)):
            default_hook(kind, value, traceback)

    sys.excepthook = quiet_when_main_process_is_gone


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int,
                sampler: torch.utils.data.Sampler | None = None, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """In dataset order unless a sampler is given."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=leave_interrupts_to_the_main_process,
        drop_last=drop_last,
    )


def stop_workers(*loaders: torch.utils.data.DataLoader | None) -> None:
    """Shuts persistent loader workers down now rather than when the loader is garbage-collected, which a
    kept frame can put off until interpreter exit (DVCLive keeps one under `dvc exp run`), where the main
    process would wait for the still-idle workers. PyTorch does this itself at exit only with pinned memory."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW on the host -> normalized float on the device."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std
