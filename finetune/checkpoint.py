"""models/model.pt: the trained weights with everything needed to use them, as one typed record.

evaluate, gradcam, predict and export rebuild the model and its input transform from the checkpoint alone
(arch, heads, constructor switches, class names, preprocessing), never from today's params.yaml: a model
trained at 448 px is evaluated at 448 px whatever the params say now. The file holds only tensors and plain
Python values, so it is read with torch.load(weights_only=True): loading it runs no code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from finetune.calibration import Calibration
from finetune.errors import StageError
from finetune.files import TorchFileUnreadable, read_torch, save_torch
from finetune.model import build_model, strip_wrapper_prefixes
from finetune.transforms import Preprocessing

FORMAT = "transfer-learning-checkpoint/2"


@dataclass(frozen=True)
class Checkpoint:
    arch: str
    class_names: list[str]
    preprocessing: Preprocessing
    head: dict  # model.head, model.head_hidden, model.head_dropout
    constructor: dict = field(default_factory=dict)  # torchvision kwargs such as aux_logits=False
    epoch: int = 0  # the kept epoch
    params: dict = field(default_factory=dict)  # every param of the run that made it, for the record
    calibration: Calibration = field(default_factory=Calibration)  # the temperature predict and export apply
    weights_sha256: str = ""  # of a local model.weights file the run started from ("" for named weights or none)

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
        """The model with random weights (load_state_dict follows)."""
        model = build_model(self.arch, len(self.class_names), "none", self.head["head"], self.head["head_hidden"],
                            self.head["head_dropout"], **self.constructor)
        return model.to(device)


def save_checkpoint(path: Path | str, model: nn.Module, checkpoint: Checkpoint) -> None:
    save_torch(path, {
        "format": FORMAT,
        "state_dict": strip_wrapper_prefixes(model.state_dict()),
        "arch": checkpoint.arch,
        "class_names": list(checkpoint.class_names),
        "preprocessing": checkpoint.preprocessing.to_dict(),
        "head": dict(checkpoint.head),
        "constructor": dict(checkpoint.constructor),
        "epoch": checkpoint.epoch,
        "params": checkpoint.params,
        "calibration": checkpoint.calibration.to_dict(),
        "weights_sha256": checkpoint.weights_sha256,
    })


def missing_reason(path: Path) -> str:
    """Why there is no model file at `path`, in words a user can act on."""
    if path.is_dir():
        return "is a folder, not a model file: give the model.pt inside it"
    if path.is_symlink():
        try:
            path.stat()
        except OSError as error:
            return f"is a symbolic link that leads to no file ({error.strerror}): fix or remove the link"
    if path.exists():
        return "is not a regular file (a pipe, a socket or a device): give a model.pt file"
    return "not found: run `dvc repro train` first (or `dvc pull` to fetch a trained model)"


def read_payload(path: Path) -> dict:
    if not path.is_file():
        raise StageError(f"{path} {missing_reason(path)}")
    try:
        payload = read_torch(path)
    except TorchFileUnreadable as error:  # truncated, not a torch file, or a pickle that would run code
        raise StageError(f"{path} is not a readable model file ({error}); re-run `dvc repro train`, or give a "
                         f"models/model.pt this pipeline wrote") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format", "no format tag") if isinstance(payload, dict) else type(payload).__name__
        raise StageError(f"{path} is not a model checkpoint of this pipeline ({found}; expected {FORMAT}): "
                         f"re-run `dvc repro train` to write one")
    return payload


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, Checkpoint]:
    """The model in eval mode on `device`, and its checkpoint record."""
    path = Path(path)
    payload = read_payload(path)
    try:
        checkpoint = Checkpoint(arch=payload["arch"], class_names=list(payload["class_names"]),
                                preprocessing=Preprocessing.from_dict(payload["preprocessing"]),
                                head=payload["head"], constructor=payload["constructor"], epoch=payload["epoch"],
                                params=payload["params"],
                                calibration=Calibration.from_dict(payload.get("calibration")),
                                weights_sha256=str(payload.get("weights_sha256", "")))
        model = checkpoint.build()
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise StageError(f"{path} is damaged or was written by another version ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]}): re-run `dvc repro train`") from None
    return model.to(device).eval(), checkpoint
