"""Device, processes, precision, CPU threads, seeding and the inference loop shared by the stages that run models.

`auto` settings mean what suits the device: bf16 autocast, channels_last and torch.compile on CUDA, plain fp32
on the CPU. An explicit setting applies on any device (bf16 or fp16 autocast, channels_last and inductor's
torch.compile all run on the CPU), which is how the CUDA code paths are exercised by tests without a GPU.
"""

from __future__ import annotations

import ctypes
import os
import random
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from finetune.errors import StageError
from finetune.transforms import Preprocessing, to_model_input

# glibc's mallopt parameters (malloc.h) and the environment that sets them, which then wins
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
MALLOC_ENVIRONMENT = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
CPU_RUN_LIMIT_HOURS = 2.0  # train.device: auto refuses a CPU run projected longer than this
NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")


def keep_freed_memory() -> bool:
    """Keeps the host memory a step frees for the next step instead of giving it back to the OS: on glibc, no
    mmap'd blocks and no trimming of the heap. By default every block over malloc's mmap threshold (128 KB, rising
    to at most 32 MB: a batch's activations are over it) is mmap'd, freed to the OS at the end of the step and
    page-faulted back, zeroed, in the next one: 100-240 thousand page faults per step of EfficientNet-Lite0 at
    160 px, batch 32, and 15-20% of the step's time on the 2-core CPU (BENCHMARKS.md). The process keeps its peak memory
    instead, as PyTorch's caching allocator does on a GPU. Not on other C libraries, and not when the environment
    already sets malloc's behaviour (MALLOC_*_ or GLIBC_TUNABLES: theirs wins). True when applied."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in MALLOC_ENVIRONMENT):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl (Alpine) or another C library
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def pick_device(local_rank: int = 0) -> torch.device:
    """CUDA when usable, else the CPU: for inference, where the CPU is slow but never wrong."""
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def cuda_unavailable_reason() -> str:
    """Why torch sees no usable GPU: torch's own reason, the CUDA version the wheel was built for, and the
    driver's version when an NVIDIA driver is loaded (an older driver than the wheel needs is the usual cause)."""
    try:
        torch.cuda.init()
        reason = "torch.cuda.is_available() is false"
    except Exception as error:  # torch raises RuntimeError or AssertionError with its explanation
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    build = f"this torch {torch.__version__} is built for CUDA {torch.version.cuda}" if torch.version.cuda else (
        f"this torch {torch.__version__} is a CPU-only build")
    driver = "no NVIDIA driver is loaded"
    if NVIDIA_DRIVER_FILE.is_file():
        driver = "NVIDIA driver: " + NVIDIA_DRIVER_FILE.read_text().splitlines()[0].strip()
    return f"{reason}; {build}; {driver}"


def training_device(requested: str, local_rank: int = 0) -> torch.device:
    """train.device: cuda (refused without a usable GPU), cpu, or auto (CUDA if usable, else the CPU with the
    reason printed; train then stops a CPU run projected over CPU_RUN_LIMIT_HOURS)."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    if requested == "cuda":
        raise StageError(f"train.device: cuda, but no GPU is usable ({cuda_unavailable_reason()}). "
                         f"See README 'GPU drivers' for the torch build that matches your driver, or set "
                         f"train.device: cpu")
    print(f"train: no usable GPU ({cuda_unavailable_reason()}): training on the CPU", flush=True)
    return torch.device("cpu")


def resolve_switch(value: str | bool, device: torch.device) -> bool:
    """train.compile: auto means on CUDA only; true/false mean so on any device."""
    return device.type == "cuda" if value == "auto" else bool(value)


def resolve_channels_last(value: str | bool) -> bool:
    """train.channels_last: auto means on, on every device. NHWC convolutions were faster on the CPU as well as
    on CUDA in every model measured (2 cores, BENCHMARKS.md): EfficientNet-Lite0 training 1.5x (its depthwise
    convolutions most of all), ResNet-50 1.24x, ResNet-18 at 64 px 1.06x."""
    return True if value == "auto" else bool(value)


CPU_EVAL_BATCH, CUDA_EVAL_BATCH = 32, 256


def resolve_eval_batch(value: str | int, device: torch.device) -> int:
    """evaluate.batch_size: auto is 256 on CUDA and 32 on the CPU, where larger batches ran slower
    (EfficientNet-Lite0 at 160 px on 2 cores: 84 images/s at 32, 63 at 128; 33 at 256 in NCHW)."""
    if value != "auto":
        return int(value)
    return CUDA_EVAL_BATCH if device.type == "cuda" else CPU_EVAL_BATCH


def resolve_threads(requested: str | int, loader_workers: int, processes_on_machine: int = 1) -> int:
    """PyTorch's intra-op threads per training process. auto: the cores left once every loader worker has one,
    shared by the training processes, at least 1. Measured on 2 cores with one loader worker (ResNet-18,
    BENCHMARKS.md): with another process busy on the machine, 2 threads trained 2.0x (64 px) and 1.6x (224 px)
    slower than 1, their OpenMP threads spinning against the loader and the other load; idle, 2 threads were
    1.3x and 1.75x faster. The rule takes the safe side; set train.num_threads on a machine you have to yourself.
    """
    if requested != "auto":
        return int(requested)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, (cores - loader_workers * processes_on_machine) // processes_on_machine)


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes torchrun started (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, logs and writes files."""
        return self.rank == 0

    def sum(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Each value summed over every process (one collective); unchanged on one process."""
        if not self.distributed:
            return list(values)
        device = f"cuda:{self.local_rank}" if torch.distributed.get_backend() == "nccl" else "cpu"
        packed = torch.stack([v.detach().to(device, torch.float64) for v in values])
        torch.distributed.all_reduce(packed)
        return list(packed.unbind())


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(module: str, devices: int) -> None:
    """Replaces this process by torchrun running `module` in `devices` processes on this machine."""
    if torch.cuda.is_available() and torch.cuda.device_count() < devices:
        raise StageError(f"train.devices={devices} but this machine has {torch.cuda.device_count()} GPU(s): set "
                 f"train.devices to at most that (CUDA_VISIBLE_DEVICES limits which are used)")
    if not torch.cuda.is_available():
        print(f"train: no GPU: {devices} CPU processes (gloo) share this machine's cores; this checks the "
              f"distributed path, it is not faster than one process", flush=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
               "-m", module]
    os.execv(sys.executable, command)


def start_processes(timeout_minutes: int = 30) -> Processes:
    """Joins the process group torchrun set up (NCCL on GPUs, gloo on the CPU), or one plain process."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Processes()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                         timeout=timedelta(minutes=timeout_minutes))
    return Processes(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank)


def stop_processes(processes: Processes) -> None:
    if processes.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, device: torch.device) -> None:
    """Seeds the generators that the training steps draw from (MixUp/CutMix, dropout, drop path) from (seed,
    epoch) alone, so a run resumed at an epoch boundary draws what an uninterrupted one does: the saved RNG
    state alone would not do, since creating the loader's iterator (once per run) draws from it too."""
    epoch_seed = seed * 100_003 + epoch + 50_021  # apart from SeededEpochSampler's seed * 100_003 + epoch
    torch.default_generator.manual_seed(epoch_seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(epoch_seed)


class Precision:
    """Autocast to bf16, or to fp16 with a loss scaler, on CUDA or the CPU; auto: bf16 on CUDA, fp32 on the CPU."""

    def __init__(self, amp: str, device: torch.device):
        self.device = device
        if amp == "auto":
            amp = "bf16" if device.type == "cuda" else "none"
        if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            print("bf16 is not supported on this GPU: using fp16 with a loss scaler")
            amp = "fp16"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)


@torch.inference_mode()
def predict_logits(model: nn.Module, loader, device: torch.device, precision: Precision, channels_last: bool,
                   preprocessing: Preprocessing, flip: bool = False, desc: str = "predict"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits (N, classes) and labels (N,) on the CPU, in loader order."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, leave=False, unit="batch"):
        inputs = to_model_input(images, device, channels_last, preprocessing.mean, preprocessing.std)
        if flip:
            inputs = inputs.flip(3)
        with precision.autocast():
            logits = model(inputs)
        all_logits.append(logits.float().cpu())
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)
