"""The one model builder, used by train, evaluate and gradcam, and the checkpoint format."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import nn

from stages.files import atomic_path


class WeightsUnavailable(RuntimeError):
    pass


def build_model(arch: str, num_classes: int, weights: str = "none") -> nn.Module:
    """A torchvision classifier with its ImageNet head replaced by a fresh `num_classes` one.

    weights: a torchvision weights name (downloaded by torchvision into the torch hub
    cache, or taken from it), "none" for random init, or a path to a state dict.
    """
    if weights == "none":
        model = torchvision.models.get_model(arch, weights=None)
        replace_head(model, num_classes)
    elif Path(weights).is_file():
        model = torchvision.models.get_model(arch, weights=None)
        load_local_weights(model, Path(weights), num_classes)
    else:
        model = download_pretrained(arch, weights)
        replace_head(model, num_classes)
    return model


def download_pretrained(arch: str, weights: str) -> nn.Module:
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsUnavailable(
            f"could not download torchvision weights {arch}/{weights} ({error}). Either run once where "
            f"download.pytorch.org is reachable (the file is cached in {cache}), copy the weights file into "
            f"{cache}, set model.weights to the path of a local state dict, or set model.weights: none "
            f"to train from random init."
        ) from None


def head_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """The final classification layer: the last nn.Linear in definition order (fc, classifier[-1], heads.head...)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name, module
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head to replace; pick another model.arch")
    name, linear = last
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr, linear


def replace_head(model: nn.Module, num_classes: int) -> None:
    parent, attr, old = head_linear(model)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """torch.compile saves keys as `_orig_mod.x`, DataParallel/DDP as `module.x`."""
    clean = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            key = key.removeprefix(prefix)
        clean[key] = value
    return clean


def load_local_weights(model: nn.Module, path: Path, num_classes: int) -> None:
    """A state dict for either the ImageNet head (replaced after loading) or a `num_classes` head (kept)."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = strip_wrapper_prefixes(loaded.get("state_dict", loaded))
    _, attr, old = head_linear(model)
    head_key = next((k for k in state if k.endswith(f"{attr}.weight") and state[k].shape[1] == old.in_features), None)
    if head_key is not None and state[head_key].shape[0] == num_classes:
        replace_head(model, num_classes)
        model.load_state_dict(state)
    else:
        model.load_state_dict(state)
        replace_head(model, num_classes)


def save_checkpoint(path: Path | str, model: nn.Module, **meta) -> None:
    """The model with everything needed to use it: arch, class names, params, preprocessing."""
    payload = {"state_dict": strip_wrapper_prefixes(model.state_dict()), **meta}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: run `dvc repro train` first")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = torchvision.models.get_model(payload["arch"], weights=None)
    replace_head(model, len(payload["class_names"]))
    model.load_state_dict(payload.pop("state_dict"))
    return model.to(device).eval(), payload


def gradcam_target_layer(model: nn.Module, spec: str) -> nn.Module:
    """`auto`: the last residual block for ResNets (as the seeds' eval.py), else the last feature block or conv."""
    if spec != "auto":
        module = model
        for part in spec.replace("[", ".").replace("]", "").split("."):
            module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
        return module
    if hasattr(model, "layer4"):
        return model.layer4[-1]
    if isinstance(getattr(model, "features", None), nn.Sequential):
        return model.features[-1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"no convolution in {type(model).__name__}; set gradcam.target_layer to a module path")
    return convs[-1]
