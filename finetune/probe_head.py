"""The fitted linear probe as a file: the head `train.head_init: probe` starts from (finetune/probe.py fits it).

Apart from the fit so that reading or writing it needs torch alone: `train` loads it, and a run without pretrained
weights writes its no-probe record without importing torchvision and timm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune.errors import StageError
from finetune.files import TorchFileUnreadable, read_torch, save_torch

FORMAT = "transfer-learning-probe/1"


@dataclass(frozen=True)
class ProbeHead:
    """A fitted probe as a linear layer over the raw pooled features: logits = features @ weight.T + bias."""

    weight: torch.Tensor  # (classes, features)
    bias: torch.Tensor  # (classes,)
    class_names: list[str]
    regularization: float  # the C chosen


def save_probe(path: Path, head: ProbeHead | None, record: dict) -> None:
    """head None: no probe (record["reason"] says why); train refuses train.head_init: probe from it."""
    payload = {"format": FORMAT, "record": record, "class_names": [], "weight": None, "bias": None}
    if head is not None:
        payload |= {"class_names": head.class_names, "weight": head.weight, "bias": head.bias,
                    "regularization": head.regularization}
    save_torch(path, payload)


def load_probe(path: Path, class_names: list[str]) -> ProbeHead:
    """The fitted head for `train.head_init: probe`, checked against the classes it will predict."""
    try:
        payload = read_torch(path)
    except (FileNotFoundError, TorchFileUnreadable) as error:
        raise StageError(f"{path} cannot be read ({error}): run `dvc repro probe`") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise StageError(f"{path} is not a probe of this pipeline: run `dvc repro probe`")
    if payload["weight"] is None:
        raise StageError(f"train.head_init: probe, but there is no linear probe ({payload['record'].get('reason')}): "
                         f"set train.head_init: random")
    if payload["class_names"] != class_names:
        raise StageError(f"{path} was fitted for other classes ({len(payload['class_names'])}, the prepared data has "
                         f"{len(class_names)}): run `dvc repro probe`")
    return ProbeHead(payload["weight"], payload["bias"], class_names, float(payload["regularization"]))


def initialize_head(model: nn.Module, head: ProbeHead) -> None:
    """Loads the probe into the model's main linear head (model.head_paths[0])."""
    layer = model.get_submodule(model.head_paths[0])
    if not isinstance(layer, nn.Linear):
        raise StageError("train.head_init: probe needs model.head: linear (a probe is one linear layer)")
    if head.weight.shape != layer.weight.shape or head.bias.shape != layer.bias.shape:
        raise StageError(f"the probe's head ({tuple(head.weight.shape)}) does not fit the model's "
                         f"({tuple(layer.weight.shape)}): it was fitted for another model; run `dvc repro probe`")
    with torch.no_grad():
        layer.weight.copy_(head.weight.to(layer.weight.dtype))
        layer.bias.copy_(head.bias.to(layer.bias.dtype))
