"""timm backbones: `model.arch: timm/<model name>[.<pretrained tag>]`, the Hugging Face hub id of timm's weights
(e.g. timm/convnext_tiny.fb_in22k). finetune/model.py builds them through these functions, so a timm model gets
the same heads, checks and checkpoint as a torchvision one.

timm is imported only when a timm arch is used: importing it costs about 2 s, which every stage would pay.
Each timm model carries its own preprocessing (mean/std, interpolation, crop fraction: its `pretrained_cfg`,
part of the timm package, so it is known offline), which is what the pipeline trains and evaluates with.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from finetune.params import TIMM_PREFIX as PREFIX
from finetune.params import TIMM_PRETRAINED


def is_timm(arch: str) -> bool:
    return arch.startswith(PREFIX)


def model_name(arch: str) -> str:
    """timm/convnext_tiny.fb_in22k -> convnext_tiny.fb_in22k (what timm.create_model takes)."""
    return arch.removeprefix(PREFIX)


def arch_problem(arch: str, pretrained: bool) -> str | None:
    """Why `arch` is not a timm model (with weights, if `pretrained`), or None."""
    import difflib

    import timm

    name = model_name(arch)
    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        return (f"unknown timm model '{base}'.{hint} List them with "
                f"`python -c \"import timm; print(timm.list_models())\"`")
    tags = timm.list_pretrained(f"{base}.*")
    if tag and name not in tags:
        return (f"timm model {base} has no pretrained tag '{tag}'. Its tags: "
                f"{', '.join(t.partition('.')[2] for t in tags) or 'none (random init only)'}")
    if pretrained and not tags:
        return f"timm model {base} has no pretrained weights: set model.weights: none (random init) or a file"
    return None


def create(arch: str, pretrained: bool, drop_path: float = 0.0, **constructor) -> nn.Module:
    """The model with its original head(s); `pretrained` loads its hub weights (through the Hugging Face cache).
    constructor: timm kwargs such as img_size (see fit_to_resolution)."""
    import timm

    return timm.create_model(model_name(arch), pretrained=pretrained, drop_path_rate=drop_path, **constructor)


def download_error_types() -> tuple[type[Exception], ...]:
    """What timm raises when the hub cannot be reached and the weights are not in the local cache."""
    import huggingface_hub.errors as hub_errors

    return (OSError, ConnectionError, TimeoutError, hub_errors.LocalEntryNotFoundError, hub_errors.HfHubHTTPError)


def cached_weights(arch: str) -> Path | None:
    """The hub cache's weights file of `arch`, if one is there (what timm loads offline)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    hub_id = timm.models.get_pretrained_cfg(model_name(arch)).hf_hub_id
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename) if hub_id else None
        if isinstance(found, str):
            return Path(found)
    return None


def unavailable_message(arch: str, error: Exception) -> str:
    """model.arch is the weights' hub id (timm/<name>.<tag>), which `hf download` takes as it is."""
    from huggingface_hub.constants import HF_HUB_CACHE

    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (f"could not get the timm weights of {arch} from the Hugging Face hub ({first_line}). Either run once "
            f"where huggingface.co is reachable (or `hf download {arch}` there and copy {HF_HUB_CACHE} here; "
            f"HF_HOME sets the cache), set model.weights to the path of a local state dict, or set "
            f"model.weights: none to train from random init.")


def classifier_paths(model: nn.Module) -> tuple[str, list[str]]:
    """(main head, other heads) as the model's pretrained_cfg names them (DeiT-distilled: head, head_dist)."""
    names = model.pretrained_cfg["classifier"]
    names = [names] if isinstance(names, str) else list(names)
    return names[0], names[1:]


def model_preprocessing(model: nn.Module) -> dict:
    """mean, std, interpolation, crop_pct, crop_mode of the model's weights (timm's resolve_model_data_config)."""
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(model)


def native_size(arch: str) -> tuple[int, bool]:
    """(input side of the weights, whether the model is built for that size only: ViTs' position embeddings)."""
    import timm

    config = timm.models.get_pretrained_cfg(model_name(arch)) or {}
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return int(config.get("input_size", (3, 224, 224))[-1]), bool(config.get("fixed_input_size", False))


def is_timm_model(model: nn.Module) -> bool:
    """A model timm built (it carries its pretrained_cfg: heads, preprocessing, feature stages)."""
    return hasattr(model, "pretrained_cfg")


def is_pretrained(weights: str) -> bool:
    return weights in TIMM_PRETRAINED
