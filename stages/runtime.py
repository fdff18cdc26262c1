"""Device, processes, precision, seeding and the inference loop shared by train, evaluate and gradcam."""

from __future__ import annotations

import os
import random
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stages.errors import StageError
from stages.transforms import Preprocessing, to_model_input


def pick_device(local_rank: int = 0) -> torch.device:
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


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


class Precision:
    """Mixed precision on CUDA (bf16, or fp16 with a loss scaler; auto: bf16); plain fp32 elsewhere."""

    def __init__(self, amp: str, device: torch.device):
        self.device = device
        self.dtype = None
        amp = "bf16" if amp == "auto" else amp
        if device.type == "cuda" and amp != "none":
            if amp == "bf16" and not torch.cuda.is_bf16_supported():
                print("bf16 is not supported on this GPU: using fp16 with a loss scaler")
                amp = "fp16"
            self.dtype = torch.bfloat16 if amp == "bf16" else torch.float16
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
