"""The one model builder: a torchvision classifier with new heads, and the checks of what it can take."""

from __future__ import annotations

import contextlib
import socket
import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import nn

from finetune import timm_models
from finetune.errors import StageError
from finetune.files import TorchFileUnreadable, read_torch
from finetune.transforms import Preprocessing


class WeightsUnavailable(StageError):
    """model.weights cannot be had (no network, or a file that is not a state dict of this arch)."""


class RecipeError(StageError):
    """The params ask for something this model cannot do (a resolution, a module to unfreeze)."""


IMAGENET_CLASSES = 1000  # every torchvision classifier's head (and auxiliary heads) outputs these
AUX_LOSS_WEIGHT = 0.4  # torchvision's Inception/GoogLeNet recipe: loss = main + 0.4 * each auxiliary head


def build_model(arch: str, num_classes: int, weights: str = "none", head: str = "linear", head_hidden: int = 1024,
                head_dropout: float = 0.0, drop_path: float = 0.0, **constructor) -> nn.Module:
    """A torchvision or timm (`timm/<name>`) classifier whose original head(s) are replaced by fresh
    `num_classes` ones.

    weights: a torchvision weights name (downloaded by torchvision into the torch hub cache, or taken from
    it), `pretrained` for a timm model's hub weights, "none" for random init, or a path to a state dict
    (original-headed, or one of this pipeline's). drop_path: timm's stochastic depth rate.
    constructor: model kwargs such as aux_logits=False or img_size (see constructor_kwargs, fit_to_resolution).
    The names of the new head modules are kept in `model.head_paths` (they get head_lr_multiplier and
    stay trainable while the backbone is frozen).
    """
    def new_heads(model: nn.Module) -> nn.Module:
        return replace_heads(model, num_classes, head, head_hidden, head_dropout)

    def original(pretrained_weights: str | None) -> nn.Module:
        return original_model(arch, pretrained_weights, drop_path, **constructor)

    if weights == "none":
        return new_heads(original(None))
    if Path(weights).is_file():
        return load_local_weights(arch, Path(weights), original, new_heads)
    return new_heads(download_pretrained(arch, weights, original))


def original_model(arch: str, pretrained_weights: str | None, drop_path: float = 0.0, **constructor) -> nn.Module:
    """The model as its library defines it, original head(s) included; random init when pretrained_weights is None."""
    if timm_models.is_timm(arch):
        return timm_models.create(arch, pretrained_weights is not None, drop_path, **constructor)
    if drop_path:
        raise RecipeError(f"model.drop_path applies to timm models (model.arch: timm/...); {arch} is a "
                          f"torchvision model: set model.drop_path: 0")
    return torchvision.models.get_model(arch, weights=pretrained_weights, **constructor)


def fetch_pretrained(arch: str, weights: str) -> None:
    """Named (torchvision) or hub (timm) weights into the local cache, or WeightsUnavailable with the fixes: the
    same download train's build_model makes, done up front (an already cached file is only read)."""
    download_pretrained(arch, weights, lambda pretrained_weights: original_model(arch, pretrained_weights))


# torch.hub's download waits forever on a connection that never answers (a stalled proxy, a captive portal): every
# read of the weights download gives up after this many seconds without a byte. A slow but live download goes on.
DOWNLOAD_STALL_SECONDS = 60


@contextlib.contextmanager
def stalled_reads_time_out(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def damaged_cache(cached: Path | None, error: Exception) -> WeightsUnavailable | Exception:
    """A cached weights file that cannot be read (truncated, an HTML login page saved in its place, random
    bytes) named with the fix; any other error as it is."""
    if cached is None or not cached.is_file():
        return error
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return WeightsUnavailable(f"the cached weights file {cached} is damaged ({type(error).__name__}: "
                              f"{first[:200]}): delete it, and run again to download it afresh")


def torchvision_cache_file(arch: str, weights: str) -> Path | None:
    try:
        url = torchvision.models.get_model_weights(arch)[weights].url
    except (KeyError, ValueError):
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def download_pretrained(arch: str, weights: str, original) -> nn.Module:
    if timm_models.is_timm(arch):
        try:
            return original(weights)
        except timm_models.download_error_types() as error:
            if not isinstance(error, (ConnectionError, TimeoutError)) and (
                    damaged := damaged_cache(timm_models.cached_weights(arch), error)) is not error:
                raise damaged from None
            raise WeightsUnavailable(timm_models.unavailable_message(arch, error)) from None
        except Exception as error:  # safetensors' or torch's reader on a damaged cached file
            raise damaged_cache(timm_models.cached_weights(arch), error) from None
    try:
        with stalled_reads_time_out(DOWNLOAD_STALL_SECONDS):
            return original(weights)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsUnavailable(
            f"could not download torchvision weights {arch}/{weights} ({error}). Either run once where "
            f"download.pytorch.org is reachable (the file is cached in {cache}), copy the weights file into "
            f"{cache}, set model.weights to the path of a local state dict, or set model.weights: none "
            f"to train from random init."
        ) from None
    except Exception as error:  # torch's reader on a damaged cached file (truncated, HTML, random bytes)
        raise damaged_cache(torchvision_cache_file(arch, weights), error) from None


def constructor_kwargs(model: nn.Module, fitted: dict | None = None) -> dict:
    """The kwargs a checkpoint must be rebuilt with: those fit_to_resolution chose (aux_logits, a timm ViT's
    img_size), and pretrained Inception/GoogLeNet weights switch on transform_input."""
    kept = {key: getattr(model, key) for key in ("aux_logits", "transform_input") if hasattr(model, key)}
    return {**(fitted or {}), **kept}


def classifier_paths(model: nn.Module) -> tuple[str, list[str]]:
    """(main head, auxiliary heads): the last nn.Linear in definition order (fc, classifier[-1], heads.head...)
    and any other Linear that outputs the ImageNet classes (Inception's AuxLogits.fc, GoogLeNet's aux*.fc2);
    for timm models, the heads their pretrained_cfg names."""
    if timm_models.is_timm_model(model):
        return timm_models.classifier_paths(model)
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
        loaded = read_torch(path)
    except TorchFileUnreadable as error:  # truncated zip, pickle refused by weights_only, not a torch file at all
        raise WeightsUnavailable(f"{path} is not a readable PyTorch weights file ({error})") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailable(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    return strip_wrapper_prefixes(state)


def load_local_weights(arch: str, path: Path, original, new_heads) -> nn.Module:
    """A state dict with the original head(s) (replaced after loading), with this run's heads (kept), or one of
    this pipeline's models trained on another class count or head (its backbone loaded, the heads fresh: a
    model.pt fine-tuned on one dataset as the start of another). original(None): the model with its original
    heads and random weights."""
    state = read_state_dict(path)
    original_headed = original(None)
    try:
        original_headed.load_state_dict(state)
        return new_heads(original_headed)
    except RuntimeError:
        pass  # not original-headed: one of this pipeline's models
    model = new_heads(original(None))
    try:
        model.load_state_dict(state)
        return model
    except RuntimeError as error:
        mismatch = str(error).splitlines()[0]
    heads = tuple(f"{head}." for head in model.head_paths)
    try:
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if not k.startswith(heads)},
                                                    strict=False)
    except RuntimeError as error:  # a backbone tensor of another shape: another arch
        mismatch = str(error).splitlines()[0]
        missing, unexpected = ["?"], []
    if unexpected or any(not key.startswith(heads) for key in missing):
        raise WeightsUnavailable(f"{path} does not fit {arch} (with the ImageNet head, this run's head or another "
                                 f"head of this pipeline): {mismatch.rstrip(':')}. {what_it_fits(state, arch)}")
    return model


def what_it_fits(state: dict, arch: str = "") -> str:
    """Which torchvision classification models a state dict's keys and shapes fit, said as the fix; else what the
    file holds. Each candidate is built on the meta device (no memory); the family of `arch` first (resnet18's
    file for resnet50: about a second), every other model only when none of those fits (5-10 s)."""
    import warnings

    def family(name: str) -> str:
        return torchvision.models.get_model_builder(name).__module__

    names = torchvision.models.list_models(module=torchvision.models)
    own = family(arch) if arch in names else None
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    fits = []
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for group in ([n for n in names if family(n) == own], [n for n in names if family(n) != own]):
            for name in group:
                try:
                    expected = {k: tuple(v.shape) for k, v in torchvision.models.get_model(name).state_dict().items()}
                except Exception:  # a model that cannot be built on the meta device
                    continue
                if expected == shapes:
                    fits.append(name)
            if fits:
                break
    if fits:
        return f"It fits {', '.join(fits)}: set model.arch to {'that' if len(fits) == 1 else 'one of them'}"
    first = ", ".join(list(shapes)[:3])
    return (f"It fits no torchvision model with its ImageNet head ({len(shapes)} tensors, the first {first}): a timm "
            f"model's weights go with model.arch: timm/<name>")


def input_size_problem(arch: str, resolution: int, training: bool, **constructor) -> str | None:
    """Why `arch` cannot take resolution x resolution inputs (None if it can), found by a forward pass on the
    meta device: shapes only, no memory, no compute. Inception's auxiliary head, for one, needs 299 px."""
    with torch.device("meta"):
        try:
            model = original_model(arch, None, **constructor)
            model.train(training)
            model(torch.empty(2, 3, resolution, resolution))
        except (RuntimeError, ValueError, AssertionError) as error:
            return str(error).splitlines()[0]
    return None


def fit_to_resolution(arch: str, resolution: int, weights: str = "none") -> dict:
    """Constructor kwargs for `arch` at `resolution`, checked before anything heavy: an input the model cannot
    take is an error; Inception's auxiliary classifier (which needs 299 px) is switched off below its size; a
    timm model built for one input size (ViT, EVA: position embeddings) is built for this one (timm resamples
    the pretrained position embeddings when it loads them)."""
    fitted = {}
    if timm_models.is_timm(arch):
        problem = timm_models.arch_problem(arch, timm_models.is_pretrained(weights))
        if problem:
            raise RecipeError(f"model.arch: {problem}")
        native, fixed = timm_models.native_size(arch)
        if fixed and resolution != native:
            fitted = {"img_size": resolution}
    problem = input_size_problem(arch, resolution, training=False, **fitted)
    if problem:
        raise RecipeError(f"model.arch {arch} cannot take train.resolution={resolution}: {problem}. "
                          f"Pick a resolution the model accepts (inception_v3: >= 75, its auxiliary head: 299; "
                          f"ViT/Swin: the size their weights were trained at; ViTs: a multiple of the patch size)")
    training_problem = input_size_problem(arch, resolution, training=True, **fitted)
    if training_problem is None:
        return fitted
    try:
        if input_size_problem(arch, resolution, training=True, aux_logits=False) is None:
            return {"aux_logits": False}
    except TypeError:  # no aux_logits switch: the failure is elsewhere
        pass
    raise RecipeError(f"model.arch {arch} cannot train at train.resolution={resolution}: {training_problem}")


def model_preprocessing(model: nn.Module, resolution: int, crop: str) -> Preprocessing:
    """How this model's inputs are made: a timm model's own (its weights' mean/std, interpolation and eval crop
    fraction, from timm's data config: ImageNet's constants are wrong for CLIP/SigLIP/Inception-style weights);
    torchvision's classifiers all use ImageNet's. train.crop resize_then_crop makes eval resize to a square."""
    preprocessing = Preprocessing.for_training(resolution, crop)
    if not timm_models.is_timm_model(model):
        return preprocessing
    config = timm_models.model_preprocessing(model)
    squash = config.get("crop_mode") == "squash" or crop == "resize_then_crop"
    interpolation = config.get("interpolation", "bilinear")
    return Preprocessing(resolution, resize="square" if squash else "shorter_side",
                         crop_fraction=float(config.get("crop_pct", preprocessing.crop_fraction)),
                         mean=tuple(float(v) for v in config["mean"]), std=tuple(float(v) for v in config["std"]),
                         interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear")


def given_module(model: nn.Module, spec: str, what: str = "gradcam.target_layer") -> nn.Module:
    """The module at a dotted path such as layer4[-1] (a param's value: `what` names the param)."""
    module = model
    try:
        for part in spec.replace("[", ".").replace("]", "").split("."):
            if part.startswith("_"):  # __class__, _modules...: Python's attributes, never a layer
                raise AttributeError(f"'{part}' is not a layer name")
            module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    except (AttributeError, IndexError, TypeError, KeyError) as error:
        raise StageError(f"{what} '{spec}' is not a module of {type(model).__name__} ({error}); "
                         f"use a dotted path such as layer4[-1], or auto") from None
    if not isinstance(module, nn.Module):
        raise StageError(f"{what} '{spec}' is a {type(module).__name__} of {type(model).__name__}, "
                         f"not a module: name a layer (a path without .weight or .bias), or use auto")
    return module


def output_shapes(model: nn.Module, resolution: int) -> dict[str, tuple]:
    """Every named module's output shape for one blank image (on the model's device: meta costs nothing)."""
    shapes, hooks = {}, []
    for name, module in model.named_modules():
        def record(_module, _inputs, output, name=name):
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape)
        hooks.append(module.register_forward_hook(record))
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, resolution, resolution, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return shapes


def refuse_unless_spatial(model: nn.Module, spec: str, module: nn.Module, resolution: int,
                          what: str = "gradcam.target_layer") -> None:
    """GradCAM needs a module whose output is a map of the image (N, C, H, W), at `resolution`."""
    names = {id(m): name for name, m in model.named_modules()}
    try:
        shapes = output_shapes(model, resolution)
    except Exception:  # a model that cannot run this check's forward pass: the stage itself will say more
        return
    shape = shapes.get(names.get(id(module), ""))
    if shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1:
        return
    spatial = [name for name, s in shapes.items() if name and len(s) == 4 and s[2] * s[3] > 1]  # in run order
    raise StageError(f"{what} '{spec}' is not a module with a spatial output (its output at "
                     f"{resolution} px: {shape or 'none'}): GradCAM needs a map of the image. Modules that have "
                     f"one, last first: {', '.join(reversed(spatial[-6:]))}; or use auto")
