"""The prepared dataset and its loaders: splits, the seeded sampler, worker processes.

The transforms are finetune/transforms.py's; this module only reads prepared images and batches them. The
transforms decode the images themselves: only they know at what scale.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import datasets
import torch

from finetune.errors import StageError
from finetune.paths import PREPARED_DIR


def open_split(split: str, root: Path = PREPARED_DIR) -> datasets.Dataset:
    """A split of a saved DatasetDict, memory-mapped, images left as encoded bytes.

    Nothing here calls .map()/.filter(): on a dataset opened from another stage's
    output those write cache files into it and DVC would see the output change.
    """
    splits = load_prepared(root)
    if split not in splits:
        raise StageError(f"{root} has no '{split}' split (it has {', '.join(splits)}): run `dvc repro prepare`")
    return splits[split].cast_column("image", datasets.Image(decode=False))


def load_prepared(root: Path = PREPARED_DIR) -> datasets.DatasetDict:
    if not (root / "dataset_dict.json").is_file():
        raise StageError(f"{root} is missing or incomplete: run `dvc repro prepare` (or `dvc pull`)")
    return datasets.load_from_disk(str(root))


def split_names(root: Path = PREPARED_DIR) -> list[str]:
    return list(load_prepared(root).keys())


def class_names(split: datasets.Dataset) -> list[str]:
    return split.features["label"].names


class ImageSplit(torch.utils.data.Dataset):
    """(uint8 CHW image, label) pairs from a prepared split.

    A key is a row index, or (row index, seed) from SeededEpochSampler: then the random
    augmentation of that image is drawn from that seed alone.
    """

    def __init__(self, split: datasets.Dataset, transform, decode=None):
        self.split = split
        self.transform = transform
        self.decode = decode  # only to compare other decoders with (benchmarks.speed)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        row = self.split[index]
        encoded = row["image"]["bytes"]
        image = encoded if self.decode is None else self.decode(encoded)
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
            raise StageError(f"the train split has {size} images, fewer than one global batch ({batch_size}) "
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
                sampler: torch.utils.data.Sampler | None = None,
                drop_last: bool = False) -> torch.utils.data.DataLoader:
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
