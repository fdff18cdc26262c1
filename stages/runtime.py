"""Device, precision, seeding and the inference loop shared by train, evaluate and gradcam."""

from __future__ import annotations

import random
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stages.data import to_model_input


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Precision:
    """Mixed precision on CUDA (bf16, or fp16 with a loss scaler); plain fp32 elsewhere."""

    def __init__(self, amp: str, device: torch.device):
        self.device = device
        self.dtype = None
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
                   flip: bool = False, desc: str = "predict") -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits (N, classes) and labels (N,) on the CPU, in loader order."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, leave=False, unit="batch"):
        inputs = to_model_input(images, device, channels_last)
        if flip:
            inputs = inputs.flip(3)
        with precision.autocast():
            logits = model(inputs)
        all_logits.append(logits.float().cpu())
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)
