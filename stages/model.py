"""The one model builder: a torchvision classifier with new heads, and the checks of what it can take."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import nn

from stages.errors import StageError


class WeightsUnavailable(StageError):
    """model.weights cannot be had (no network, or a file that is not a state dict of this arch)."""


class RecipeError(StageError):
    """The params ask for something this model cannot do (a resolution, a module to unfreeze)."""


IMAGENET_CLASSES = 1000  # every torchvision classifier's head (and auxiliary heads) outputs these
AUX_LOSS_WEIGHT = 0.4  # torchvision's Inception/GoogLeNet recipe: loss = main + 0.4 * each auxiliary head


def build_model(arch: str, num_classes: int, weights: str = "none", head: str = "linear", head_hidden: int = 1024,
                head_dropout: float = 0.0, **constructor) -> nn.Module:
    """A torchvision classifier whose ImageNet head(s) are replaced by fresh `num_classes` ones.

    weights: a torchvision weights name (downloaded by torchvision into the torch hub cache, or taken from
    it), "none" for random init, or a path to a state dict (ImageNet-headed, or one of this pipeline's).
    constructor: torchvision model kwargs such as aux_logits=False (see constructor_kwargs).
    The names of the new head modules are kept in `model.head_paths` (they get head_lr_multiplier and
    stay trainable while the backbone is frozen).
    """
    def new_heads(model: nn.Module) -> nn.Module:
        return replace_heads(model, num_classes, head, head_hidden, head_dropout)

    if weights == "none":
        model = new_heads(torchvision.models.get_model(arch, weights=None, **constructor))
    elif Path(weights).is_file():
        model = load_local_weights(arch, Path(weights), new_heads, constructor)
    else:
        model = new_heads(download_pretrained(arch, weights, constructor))
    return model


def download_pretrained(arch: str, weights: str, constructor: dict) -> nn.Module:
    try:
        return torchvision.models.get_model(arch, weights=weights, **constructor)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsUnavailable(
            f"could not download torchvision weights {arch}/{weights} ({error}). Either run once where "
            f"download.pytorch.org is reachable (the file is cached in {cache}), copy the weights file into "
            f"{cache}, set model.weights to the path of a local state dict, or set model.weights: none "
            f"to train from random init."
        ) from None


def constructor_kwargs(model: nn.Module) -> dict:
    """The torchvision kwargs a checkpoint must be rebuilt with: pretrained Inception/GoogLeNet weights switch
    on transform_input, and train may switch off aux_logits."""
    return {key: getattr(model, key) for key in ("aux_logits", "transform_input") if hasattr(model, key)}


def classifier_paths(model: nn.Module) -> tuple[str, list[str]]:
    """(main head, auxiliary heads): the last nn.Linear in definition order (fc, classifier[-1], heads.head...)
    and any other Linear that outputs the ImageNet classes (Inception's AuxLogits.fc, GoogLeNet's aux*.fc2)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head to replace; pick another model.arch")
    main = linears[-1][0]
    aux = [name for name, m in linears[:-1] if m.out_features == IMAGENET_CLASSES]
    return main, aux


def replace_heads(model: nn.Module, num_classes: int, head: str = "linear", hidden: int = 1024,
                  dropout: float = 0.0) -> nn.Module:
    main, aux = classifier_paths(model)
    in_features = model.get_submodule(main).in_features
    if head == "mlp":
        new_head = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(hidden, num_classes))
    else:
        new_head = nn.Linear(in_features, num_classes)
    model.set_submodule(main, new_head)
    for path in aux:  # auxiliary heads only shape the training loss; a plain linear layer each
        model.set_submodule(path, nn.Linear(model.get_submodule(path).in_features, num_classes))
    model.head_paths = (main, *aux)
    return model


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """torch.compile saves keys as `_orig_mod.x`, DataParallel/DDP as `module.x`."""
    clean = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            key = key.removeprefix(prefix)
        clean[key] = value
    return clean


def read_state_dict(path: Path) -> dict:
    """A state dict from `path` (bare, or under "state_dict" as this pipeline saves it), read without running any
    code (weights_only); anything else is a WeightsUnavailable naming the file."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle refused by weights_only, not a torch file at all
        raise WeightsUnavailable(f"{path} is not a readable PyTorch weights file ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailable(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    return strip_wrapper_prefixes(state)


def load_local_weights(arch: str, path: Path, new_heads, constructor: dict) -> nn.Module:
    """A state dict with the ImageNet head(s) (replaced after loading), or with this run's heads (kept)."""
    state = read_state_dict(path)
    imagenet_headed = torchvision.models.get_model(arch, weights=None, **constructor)
    try:
        imagenet_headed.load_state_dict(state)
        return new_heads(imagenet_headed)
    except RuntimeError:
        pass  # not ImageNet-headed: one of this pipeline's models
    model = new_heads(torchvision.models.get_model(arch, weights=None, **constructor))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise WeightsUnavailable(f"{path} does not fit {arch} (with either the ImageNet head or this run's "
                                 f"head): {str(error).splitlines()[0]}") from None
    return model


def input_size_problem(arch: str, resolution: int, training: bool, **constructor) -> str | None:
    """Why `arch` cannot take resolution x resolution inputs (None if it can), found by a forward pass on the
    meta device: shapes only, no memory, no compute. Inception's auxiliary head, for one, needs 299 px."""
    with torch.device("meta"):
        model = torchvision.models.get_model(arch, weights=None, **constructor)
        model.train(training)
        try:
            model(torch.empty(2, 3, resolution, resolution))
        except (RuntimeError, ValueError, AssertionError) as error:
            return str(error).splitlines()[0]
    return None


def fit_to_resolution(arch: str, resolution: int) -> dict:
    """Constructor kwargs for `arch` at `resolution`, checked before anything heavy: an input the model cannot
    take is an error; Inception's auxiliary classifier (which needs 299 px) is switched off below its size."""
    problem = input_size_problem(arch, resolution, training=False)
    if problem:
        raise RecipeError(f"model.arch {arch} cannot take train.resolution={resolution}: {problem}. "
                          f"Pick a resolution the model accepts (inception_v3: >= 75, its auxiliary head: 299; "
                          f"ViT/Swin: the size their weights were trained at)")
    training_problem = input_size_problem(arch, resolution, training=True)
    if training_problem is None:
        return {}
    try:
        if input_size_problem(arch, resolution, training=True, aux_logits=False) is None:
            return {"aux_logits": False}
    except TypeError:  # no aux_logits switch: the failure is elsewhere
        pass
    raise RecipeError(f"model.arch {arch} cannot train at train.resolution={resolution}: {training_problem}")
