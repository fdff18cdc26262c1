"""The one schema of params.yaml: every stage loads its params through `load_params`.

Validation runs before any heavy work, so a typo or an impossible value costs a
second, not an epoch. Errors name the param, what was given and what is allowed.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from finetune.errors import StageError

PARAMS_FILE = Path("params.yaml")


class ParamsLoader(yaml.SafeLoader):
    """YAML 1.2 floats: `dvc exp run -S train.lr=1e-5` writes `lr: 1e-05`, which YAML 1.1 (PyYAML's default)
    reads as a string."""


ParamsLoader.yaml_implicit_resolvers = {key: [(tag, regexp) for tag, regexp in resolvers
                                              if tag != "tag:yaml.org,2002:float"]
                                        for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)
                  |[-+]?(?:[0-9][0-9_]*)\.[0-9_]*
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


MAX_SEED = 2**32 - 1  # numpy's seeds stop there
MAX_WORKERS = 256  # data-loading processes; more only exhausts memory and file handles
MAX_RESOLUTION = 4096  # far above any fine-tuning recipe; a typo such as 100000 would ask for terabytes
# probe.regularization: auto tries these C, weakest regularization last. Caltech-101 chose both ends of the
# narrower 0.01-3 (3 at 160 px, 0.01 at 224 px; 2026-12-05), so the grid reaches a step past each.
PROBE_C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


TIMM_PREFIX = "timm/"  # model.arch: timm/<model name>[.<pretrained tag>] (finetune/timm_models.py)
TIMM_PRETRAINED = ("pretrained", "DEFAULT")  # model.weights values meaning the timm model's own weights


class Section(BaseModel):
    # extra="forbid": an unknown key (a typo such as train.learning_rate) is an error, not silently ignored.
    # allow_inf_nan=False: `lr: .inf` or `.nan` is refused here, not discovered as a NaN loss an epoch later.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# What `data.preset` fills in for data.source / val_fraction / test_fraction left at null. Fractions are of
# the source's train split, per class (stratified, seeded by data.split_seed).
PRESETS = {
    # The seeds' setup: all 8,144 train images train, the 8,041 test images test, no validation split.
    "stanford_cars": {"source": "tanganke/stanford_cars", "val_fraction": 0.0, "test_fraction": 0.0},
    # One split on the hub; the seed's Caltech-101 study split it 7:2:1 into train/validation/test.
    "caltech101": {"source": "flwrlabs/caltech101", "val_fraction": 0.2, "test_fraction": 0.1},
    # The official train / validation / test splits (10 / 10 / ≥20 images per class).
    "flowers102": {"source": "dpdl-benchmark/oxford_flowers102", "val_fraction": 0.0, "test_fraction": 0.0},
    "none": {},
}


class DataParams(Section):
    preset: Literal[tuple(PRESETS)] = Field(description=(
        'stanford_cars, caltech101, flowers102 or none: fills in the nulls below. `stanford_cars`, `caltech101`, '
        '`flowers102` or `none`: fills in `data.source`, `data.val_fraction` and `data.test_fraction` where they are '
        '`null` (see [Datasets](recipes.md#datasets))'))
    source: str = Field(min_length=1, description=(
        "null: the preset's hub id; or a hub id, or a local folder. A hub dataset id, or a local folder: `split/class"
        ' name/image` (splits `train`, optional `test` and `validation`/`val`), or a folder written by '
        '`DatasetDict.save_to_disk`'))
    revision: str | None = Field(None, description=(
        'hub revision (commit, tag or branch) to pin; null: the default branch'))
    image_column: str = Field("image", description=(
        'the image column of a hub or saved source'))
    label_column: str = Field("label", description=(
        'the label column of a hub or saved source: a ClassLabel (its names are the class names)'))
    val_fraction: float = Field(ge=0.0, lt=1.0, description=(
        "share of each train class carved out as validation; null: the preset's. With a validation split, `train` "
        'keeps the epoch that scores best on it'))
    test_fraction: float = Field(ge=0.0, lt=1.0, description=(
        "share of each train class carved out as test, for sources without one; null: the preset's"))
    split_seed: int = Field(0, ge=0, le=MAX_SEED, description=(
        'seed of those two splits'))

    @model_validator(mode="before")
    @classmethod
    def fill_from_preset(cls, raw: dict) -> dict:
        """null source/fractions take the preset's values; anything set explicitly wins (e.g. a local copy)."""
        if not isinstance(raw, dict) or raw.get("preset") not in PRESETS:
            return raw
        preset = PRESETS[raw["preset"]]
        filled = dict(raw)
        for key in ("source", "val_fraction", "test_fraction"):
            if filled.get(key) is None:
                if key not in preset:
                    raise ValueError(f"data.{key} is null and data.preset is none: set data.{key} "
                                     f"(or a preset: {', '.join(p for p in PRESETS if p != 'none')})")
                filled[key] = preset[key]
        return filled

    @model_validator(mode="after")
    def leaves_images_to_train(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction:g} "
                             f"leaves too little to train on; keep the sum below 0.9")
        return self


class PrepareParams(Section):
    max_short_side: int = Field(ge=32, le=8192, description=(
        'images are stored with the shorter side at most this (enough for 448-px crops)'))
    jpeg_quality: int = Field(ge=50, le=100, description=(
        'quality of the images that have to be re-encoded'))
    num_workers: int = Field(ge=0, le=MAX_WORKERS, description=(
        'decode processes; 0: one per CPU core. Each holds a few images at a time: lower it only if a process is '
        'killed for memory'))


class ModelParams(Section):
    arch: str = Field(description=(
        'a torchvision classification model, or timm/<name>[.<pretrained tag>]. Any torchvision classification model '
        '(`torchvision.models.list_models`) with a linear head, or a timm model as `timm/<name>[.<pretrained tag>]`, '
        'its Hugging Face hub id (for example `timm/convnext_tiny.fb_in22k`): see [timm backbones](recipes.md#timm-'
        'backbones). A timm model brings its own preprocessing (mean/std, interpolation, eval crop fraction), saved '
        'with the model'))
    weights: str = Field(description=(
        "torchvision weights name (timm: pretrained), none (random init), or a state dict's path. A torchvision "
        'weights name of that arch (or `DEFAULT`); for a timm model `pretrained` (the hub weights of its name; '
        '`DEFAULT` means the same); `none` for random init; or the path of a state dict file (an ImageNet one, a '
        '`torch.compile`d one, or a `models/model.pt` of this pipeline)'))
    head: Literal["linear", "mlp"] = Field(description=(
        'the new classifier: linear, or mlp (hidden layer + ReLU + dropout). `mlp` = Linear(features, `head_hidden`) '
        '+ ReLU + Dropout(`head_dropout`) + Linear. Auxiliary heads (Inception, GoogLeNet) are replaced by linear '
        'ones'))
    head_hidden: int = Field(ge=1, le=65536, description=(
        'mlp only: width of the hidden layer'))
    head_dropout: float = Field(ge=0.0, lt=1.0, description=(
        'mlp only: dropout before its last layer'))
    drop_path: float = Field(ge=0.0, lt=1.0, description=(
        "timm models only: stochastic depth rate (0.1-0.2 is usual for ConvNeXt/ViT fine-tuning). timm's "
        '`drop_path_rate`'))

    @field_validator("weights")
    @classmethod
    def home_expanded(cls, weights: str) -> str:
        """`~/weights/x.pth` as train.state_dir takes it: the shell does not expand `~` inside params.yaml."""
        return str(Path(weights).expanduser()) if weights.startswith("~") else weights

    @field_validator("arch")
    @classmethod
    def known_arch(cls, arch: str, info: ValidationInfo) -> str:
        if arch.startswith(TIMM_PREFIX) or not looks_up_models(info):
            return arch  # timm archs: checked by `check` (known_timm_model); unlooked-up: see looks_up_models
        allowed = classification_archs()
        if arch not in allowed:
            close = difflib.get_close_matches(arch, allowed, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown torchvision classification model '{arch}'.{hint} Allowed: {', '.join(allowed)}")
        return arch

    @model_validator(mode="after")
    def known_weights(self, info: ValidationInfo) -> ModelParams:
        if self.arch.startswith(TIMM_PREFIX):
            return self.known_timm_model()
        if self.drop_path:
            raise ValueError(f"model.drop_path applies to timm models (model.arch: timm/...); {self.arch} is a "
                             f"torchvision model: set model.drop_path: 0")
        if self.weights == "none" or Path(self.weights).is_file() or not looks_up_models(info):
            return self
        allowed = weights_names(self.arch)
        if self.weights in allowed:
            return self
        raise ValueError(
            f"model.weights '{self.weights}' is neither a weights name of {self.arch} nor an existing file. "
            f"Allowed: {', '.join(allowed)}, none (random init), or a path to a local state dict"
        )

    def known_timm_model(self) -> ModelParams:
        """The weights value only: whether timm knows the model and its tag is checked by stage `check`
        (finetune/model.py), so that the schema never pays timm's import."""
        if self.weights in TIMM_PRETRAINED or self.weights == "none" or Path(self.weights).is_file():
            return self
        raise ValueError(f"model.weights '{self.weights}' is neither pretrained (the timm weights of {self.arch}), "
                         f"none (random init) nor an existing file")

    @model_validator(mode="after")
    def dropout_needs_mlp(self) -> ModelParams:
        if self.head == "linear" and self.head_dropout > 0:
            raise ValueError("model.head_dropout only applies to model.head: mlp (a linear head has no hidden layer)")
        return self


class TrainRecipe(Section):
    """What is trained and how: resolution, optimizer, schedule, head, freezing and augmentations."""

    resolution: int = Field(ge=32, le=MAX_RESOLUTION, description=(
        'training crop size and eval crop size. inception_v3 wants 299 (its auxiliary head is switched off below 299,'
        ' with a message); sizes a model cannot take are refused before training'))
    batch_size: int = Field(ge=1, le=65536, description=(
        'images per optimizer step'))
    epochs: int = Field(ge=1, le=10000, description=(
        'passes over the train split'))
    optimizer: Literal["sgd", "adamw"] = Field(description=(
        'sgd or adamw (AdamW with its default betas)'))
    lr: float = Field(gt=0, le=10, description=(
        "the backbone's learning rate (every layer's, with head_lr_multiplier 1). Scale it with the batch size (0.1 "
        'per 128 for SGD)'))
    head_lr_multiplier: float = Field(gt=0, le=1000, description=(
        'the new head\'s lr = lr x this (the seeds\' "differential lr"). Logged as `lr_head`'))
    momentum: float = Field(ge=0, lt=1, description=(
        'SGD only: the momentum factor'))
    nesterov: bool = Field(description=(
        'SGD only: Nesterov momentum'))
    weight_decay: float = Field(ge=0, le=10, description=(
        'decoupled for AdamW, L2 for SGD'))
    no_weight_decay_on_norm_and_bias: bool = Field(description=(
        'true: norm weights and biases (every 1-d param) get no weight decay'))
    lr_schedule: Literal["step", "cosine", "exponential", "constant"] = Field(description=(
        'step, cosine, exponential or constant, after warmup_epochs. `step`: × `lr_gamma` every `lr_step_epochs`; '
        '`exponential`: × `lr_gamma` every epoch; `cosine`: to ~0 at the last epoch'))
    lr_step_epochs: int = Field(ge=1, le=10000, description=(
        'step: lr x lr_gamma every lr_step_epochs epochs'))
    lr_gamma: float = Field(gt=0, le=1, description=(
        'step: the factor of each step; exponential: lr x lr_gamma every epoch'))
    warmup_epochs: int = Field(ge=0, le=10000, description=(
        'linear warmup epochs. Epoch k (0-based) of W runs at (k+1)/(W+1) of the lr'))
    lr_schedule_unit: Literal["epoch", "step"] = Field(description=(
        'epoch or step: the lr (warmup and schedule) changes once per epoch or after every step. The same curves; '
        '`step` makes them smooth (warmup step s of S runs at (s+1)/(S+1) of the lr)'))
    layer_decay: float = Field(gt=0, le=1, description=(
        'layer-wise lr decay: each block below the top gets this x the lr above; 1: off. The head and the layers '
        "after the trunk get `lr` (blocks: timm's own grouping; torchvision ResNets: `layer1`–`layer4`; others: the "
        "children of `features` or a ViT's encoder layers). Logged `lr` is the top layer's"))
    accumulate_steps: int = Field(ge=1, le=1024, description=(
        'batch_size images per optimizer step, in this many forward/backward passes. `batch_size` stays the images '
        'per optimizer step (the batch the lr rule refers to), run in passes of `batch_size`/(`devices` × '
        '`accumulate_steps`) images each, to fit memory. Identical to one big batch for models without BatchNorm '
        '(BatchNorm sees the smaller batches)'))
    grad_clip_norm: float = Field(ge=0, le=1e6, description=(
        "clip the gradients' global L2 norm to this before each step; 0: off. With fp16, after unscaling"))
    ema_decay: float = Field(ge=0, lt=1, description=(
        'an EMA of the weights is validated and saved instead of them (0.9998 is usual); 0: off. The exponential '
        'moving average of the weights (and BatchNorm statistics) is updated after every optimizer step, and resumed '
        'with the run. ~0.9998 suits runs of tens of thousands of steps'))
    label_smoothing: float = Field(ge=0, lt=1, description=(
        'label smoothing of the training loss. Validation loss is plain cross-entropy; applies to mixed targets too'))
    mixup_alpha: float = Field(ge=0, le=100, description=(
        "MixUp of each batch with Beta(alpha, alpha) weights (0.2 is usual); 0: off. torchvision's MixUp. Train "
        'accuracy of a mixed image counts the share of its target held by the predicted class'))
    cutmix_alpha: float = Field(ge=0, le=100, description=(
        "CutMix (1.0 is usual); with mixup_alpha, one of the two per batch; 0: off. torchvision's CutMix"))
    head_init: Literal["random", "probe"] = Field(description=(
        "random, or probe: the new head starts as the fitted linear probe (LP-FT). `random` is PyTorch's init. With "
        '`probe` the backbone starts under a head that already classifies, so its first updates do not distort the '
        'pretrained features (LP-FT: Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained Features and '
        'Underperform Out-of-Distribution"). `probe` needs pretrained weights and `model.head: linear`'))
    norm_statistics: Literal["update", "pretrained"] = Field(description=(
        'update, or pretrained: every BatchNorm layer keeps the pretrained running statistics (eval mode) while its '
        'weights still train. `update` (PyTorch\'s train mode) normalizes each batch by its own statistics and moves '
        'the running ones towards the new data. `pretrained` keeps the features the linear probe was fitted on (so '
        'a probe head stays valid as the backbone starts to move) and no longer depends on the batch size. Needs '
        'pretrained weights; models without BatchNorm are unaffected. Needs about a tenth of the usual lr: nothing '
        'renormalizes a layer after a step (Caltech-101, EfficientNet-Lite0, probe head: SGD lr 0.01 diverged in two '
        'steps, 0.001 and 0.002 trained to 94.2% and 94.1%, the best mean per-class accuracy; docs/recipes.md, "When '
        'fine-tuning loses to the linear probe")'))
    wise_ft: list[Annotated[float, Field(ge=0, le=1)]] = Field(max_length=21, description=(
        "mix the kept weights with the run's start at these α and keep the mix that validates best; []: off. "
        'WiSE-FT (Wortsman et al., CVPR 2022, "Robust fine-tuning of zero-shot models"): after the last epoch every '
        'weight becomes (1 - α) × its value at the start (the pretrained backbone under the probe head) + α × its '
        'fine-tuned value, each α is scored on the validation split, and the best mix (ties: the lower validation '
        'loss) is calibrated and saved; `α` 0 is the start itself (the linear probe), 1 the fine-tuned weights. '
        'Costs one validation pass per α. The choice and every α\'s validation accuracy are in '
        'metrics/train/metrics.json (`wise_ft`). Needs `train.head_init: probe` (a random head mixed is noise) and a '
        'validation split (`data.val_fraction`) to choose on: both are checked before training. E.g. '
        '`[0.25, 0.5, 0.75, 1.0]`'))
    freeze_epochs: int = Field(ge=0, le=10000, description=(
        'the first epochs train only the new head (the backbone frozen, its BatchNorm statistics too). Frozen params '
        'get no gradient (so no update, no weight decay, no momentum) and frozen BatchNorm layers stay in eval mode '
        '(their ImageNet statistics are kept)'))
    unfreeze_from: str | None = Field(description=(
        'then train only from this module on (layer4, Mixed_7a...); null: every layer. After `freeze_epochs` (from '
        'the start if 0), the modules from this one on, in definition order, train. An unknown name is refused with '
        "the model's module list"))
    crop: Literal["random_resized", "resize_then_crop"] = Field(description=(
        'random_resized (RandomResizedCrop) or resize_then_crop (square resize, random crop). `random_resized`: '
        'RandomResizedCrop(`resolution`, scale=`crop_scale`); `resize_then_crop`: resize to a square of '
        '`resolution`/0.875 (512 for 448), then a random `resolution` crop with `crop_padding`. Eval follows: shorter'
        ' side (or square) to `resolution`/0.875, centre crop'))
    crop_scale: list[float] = Field(description=(
        "random_resized only: the crop's area range [min, max]"))
    crop_padding: int = Field(ge=0, le=MAX_RESOLUTION, description=(
        'resize_then_crop only: zero padding around the random crop'))
    hflip: bool = Field(description=(
        'random horizontal flip (false for text, digits, anything whose left and right differ)'))
    augment: Literal["none", "randaugment", "autoaugment", "trivial_augment", "color_jitter"] = Field(description=(
        'none, randaugment, autoaugment, trivial_augment or color_jitter, after crop and flip. `randaugment`: 2 ops '
        'at magnitude 9; `autoaugment`: the ImageNet policy; `trivial_augment`: TrivialAugmentWide; `color_jitter`: '
        'brightness, contrast and saturation 0.4'))
    random_erasing: float = Field(ge=0, le=1, description=(
        'probability of erasing a random box of each image (0.25 is usual); 0: off. The box is filled with the mean '
        "pixel (0 after normalization), as torchvision's recipes do"))

    @field_validator("crop_scale")
    @classmethod
    def area_range(cls, scale: list[float]) -> list[float]:
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"train.crop_scale must be [min, max] with 0 < min <= max <= 1 (got {scale})")
        return scale


class TrainParams(TrainRecipe):
    """The recipe, and where and how it runs: seed, device, precision, processes, resume state."""

    seed: int = Field(ge=0, le=MAX_SEED, description=(
        "seeds torch, numpy, random, the loader's shuffle and every image's augmentation"))
    device: Literal["auto", "cuda", "cpu"] = Field(description=(
        'auto, cuda or cpu; auto: CUDA when usable, else a run projected over 2 h stops. With `auto` and no usable '
        "GPU, `train` prints why (torch's reason, the CUDA version of the installed torch, the NVIDIA driver's "
        'version when one is loaded), trains on the CPU, prints the projected run time after the first steps, and '
        '**stops when that projection is over 2 hours** (so a broken driver never turns `make repro` into days of CPU'
        ' training). `cuda`: refused by `check` without a usable GPU. `cpu`: train on the CPU whatever the length'))
    amp: Literal["auto", "bf16", "fp16", "none"] = Field(description=(
        'auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16 or none; explicit values apply on the CPU too. `auto` uses '
        'fp16 with a loss scaler where bf16 is missing; `fp16` always has a loss scaler'))
    channels_last: Literal["auto"] | bool = Field(description=(
        "auto (on, on every device), true or false. NHWC convolutions: on this project's 2-core CPU, EfficientNet-"
        'Lite0 trained 1.5× and ResNet-50 1.24× faster (BENCHMARKS.md); `false`: NCHW'))
    compile: Literal["auto"] | bool = Field(description=(
        'torch.compile (inductor): auto (on CUDA only), true or false. `true` compiles on the CPU too (needs a C++ '
        'compiler, which `check` looks for). Freezing and unfreezing recompile once'))
    num_threads: Literal["auto"] | Annotated[int, Field(ge=1, le=MAX_WORKERS)] = Field(description=(
        'PyTorch CPU threads per training process: auto, or a number. `auto`: the cores left once each loader worker '
        'has one (at least 1), printed at start-up (measured: BENCHMARKS.md). A resume is bit-exact only with the '
        'same thread count (it changes the order of float sums)'))
    num_workers: int = Field(ge=-1, le=MAX_WORKERS, description=(
        'data-loading processes per training process; -1: chosen from the CPUs present. `-1`: one per core minus one '
        'per training process, shared between them, at most 16. Does not change the result (with `train.num_threads` '
        'fixed: `auto` threads follow the workers), so a resumed run may use another value'))
    eval_every: int = Field(ge=0, le=10000, description=(
        'validation every N epochs (with a validation split); 0: after the last epoch only'))
    state_dir: str = Field(min_length=1, description=(
        "where an unfinished run's resume state lives; a shared path resumes on another machine. The state "
        '(`train_state-<fingerprint>.pt`, one per params and data) is written after every epoch and deleted when that'
        ' run finishes. A mounted bucket or NFS path lets a replacement machine (a new spot instance, another clone '
        'of the project) resume the run: same params and data, same weights as an uninterrupted run. Runs of other '
        'params may share it (each touches only its own file); changing it does not restart a run'))
    devices: int = Field(ge=1, le=1024, description=(
        'training processes, one per GPU (DDP under torchrun); batch_size and lr stay global. `train` starts '
        '`torchrun` itself: see "More than one GPU" in docs/operations.md'))
    sync_batchnorm: bool = Field(description=(
        "devices > 1 on GPUs: BatchNorm statistics over the global batch, not each GPU's share"))

    @model_validator(mode="after")
    def phases_fit(self) -> TrainParams:
        for name in ("warmup_epochs", "freeze_epochs"):
            if getattr(self, name) > self.epochs:
                raise ValueError(f"train.{name}={getattr(self, name)} is more than train.epochs={self.epochs}")
        parts = self.devices * self.accumulate_steps
        if self.batch_size % parts:
            raise ValueError(f"train.batch_size={self.batch_size} does not split evenly into train.devices="
                             f"{self.devices} x train.accumulate_steps={self.accumulate_steps} passes: the batch "
                             f"size is the global one, per optimizer step; pick a multiple of {parts}")
        return self


class EvaluateParams(Section):
    tta: bool = Field(description=(
        'also report 3 scales x 2 flips test-time augmentation (under tta.* in metrics/eval.json)'))
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=65536)] = Field(description=(
        'images per inference batch; auto: 256 on CUDA, 32 on the CPU. No effect on the results; on the CPU larger '
        'batches were slower (EfficientNet-Lite0 at 256 ran at 0.45× of 32)'))
    amp: Literal["auto", "bf16", "fp16", "none"] = Field(description=(
        'auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16 or none (fp32)'))
    num_workers: int = Field(ge=-1, le=MAX_WORKERS, description=(
        'data-loading processes; -1: chosen from the CPUs present. One per core minus one, at most 16'))


class GradcamParams(Section):
    num_samples: int = Field(ge=1, le=256, description=(
        'random test images in plots/gradcam/samples.png (rows of 3)'))
    num_misclassified: int = Field(ge=0, le=256, description=(
        'misclassified images in plots/gradcam/worst.png, one from each of the worst classes'))
    target_layer: str = Field(description=(
        "auto: the last spatial block of the model's family; or a module path (layer3[-1]). `auto`: `layer4[-1]` "
        '(ResNet, ResNeXt, Wide ResNet), `Mixed_7c` (Inception v3), `inception5b` (GoogLeNet), `trunk_output` '
        "(RegNet), `conv5` (ShuffleNet), `layers[-1]` (MNASNet), the last encoder block's `ln_1` (ViT) or last stage "
        '(Swin) with their tokens reshaped to a map, `features[-1]` (VGG, DenseNet, MobileNet, EfficientNet, '
        'ConvNeXt), else the last conv'))
    seed: int = Field(ge=0, le=MAX_SEED, description=(
        'which test images are drawn'))


class ExportParams(Section):
    # onnx: served by onnxruntime, TensorRT, OpenVINO... without PyTorch. torchscript: for LibTorch (C++);
    # PyTorch 2.14 deprecates TorchScript, so it is kept only for those who already serve it.
    format: Literal["onnx", "torchscript"] = Field(description=(
        'onnx (onnxruntime, TensorRT, OpenVINO...) or torchscript (LibTorch; deprecated in PyTorch 2.14). `onnx` '
        'writes `models/export/model.onnx`, served without PyTorch; `torchscript` writes '
        '`models/export/model.torchscript.pt` for LibTorch (C++), kept for those who already serve it'))


class ProbeParams(Section):
    regularization: Literal["auto"] | Annotated[float, Field(gt=0, le=1e6)] = Field(description=(
        "the probe's C (inverse L2 strength): auto, or a number. `auto` chooses it from "
        f"{', '.join(f'{c:g}' for c in PROBE_C_GRID[:-1])} and {PROBE_C_GRID[-1]:g}"
        ' by accuracy on the validation split, or without one on a stratified 20% of train, then refits on all of '
        "train; a number fixes it (scikit-learn's `LogisticRegression(C=...)`)"))
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=65536)] = Field(description=(
        'images per forward pass of its feature extraction; auto: 256 on CUDA, 32 on the CPU. No effect on the result'))
    num_workers: int = Field(ge=-1, le=MAX_WORKERS, description=(
        'loader processes of its feature extraction; -1: chosen from the CPUs present. One per core minus one, at '
        'most 16'))


class Params(Section):
    data: DataParams
    prepare: PrepareParams
    model: ModelParams
    probe: ProbeParams
    train: TrainParams

    @model_validator(mode="after")
    def probe_head_possible(self) -> Params:
        if self.train.head_init == "probe":
            if self.model.weights == "none":
                raise ValueError("train.head_init: probe needs pretrained weights (model.weights: none has no "
                                 "features to probe): set train.head_init: random")
            if self.model.head != "linear":
                raise ValueError("train.head_init: probe needs model.head: linear (the probe is one linear layer): "
                                 "set train.head_init: random")
        if self.train.wise_ft and self.train.head_init != "probe":
            raise ValueError("train.wise_ft mixes the fine-tuned weights with the run's start, which needs "
                             "train.head_init: probe (a random head at the start mixes noise into the result): set "
                             "train.head_init: probe, or train.wise_ft: []")
        if self.train.norm_statistics == "pretrained" and self.model.weights == "none":
            raise ValueError("train.norm_statistics: pretrained needs pretrained weights (model.weights: none has no "
                             "statistics to keep): set train.norm_statistics: update")
        return self
    evaluate: EvaluateParams
    gradcam: GradcamParams
    export: ExportParams


def yaml_value(value) -> str:
    if value is None:
        return "null"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def params_table(defaults: dict) -> str:
    """The Markdown table of every param in schema order: name(s), default(s) from params.yaml, meaning."""
    rows: list[tuple[list[str], list[str], str]] = []
    for section, field in Params.model_fields.items():
        for name in field.annotation.model_fields:
            key = f"{section}.{name}"
            default, text = f"`{yaml_value(defaults[section][name])}`", field.annotation.model_fields[name].description
            if rows and rows[-1][2] == text:  # params that share a text share a row
                rows[-1][0].append(f"`{key}`")
                rows[-1][1].append(default)
            else:
                rows.append(([f"`{key}`"], [default], text))
    lines = ["| Param | Default | Meaning |", "|---|---|---|"]
    lines += [f"| {', '.join(keys)} | {', '.join(defaults_)} | {text} |" for keys, defaults_, text in rows]
    return "\n".join(lines)


class ParamsError(StageError):
    """params.yaml is malformed; the message lists every problem found."""


def looks_up_models(info: ValidationInfo) -> bool:
    """Whether model.arch and a weights name are looked up in torchvision's lists: importing torchvision costs
    ~3.5 s, which stages that never build a model (fetch, prepare, report, predict's start) skip; `check`, which
    runs before them, and every stage that builds a model look them up."""
    return not info.context or info.context.get("look_up_models", True)


def classification_archs() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def weights_names(arch: str) -> list[str]:
    from torchvision.models import get_model_weights

    return [w.name for w in get_model_weights(arch)] + ["DEFAULT"]


def load_params(path: Path | str = PARAMS_FILE, look_up_models: bool = True) -> Params:
    """look_up_models=False: model.arch and model.weights are not looked up in torchvision (see looks_up_models)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the repository root, where params.yaml lives")
    try:
        raw = yaml.load(path.read_text(), Loader=ParamsLoader) or {}
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ParamsError(f"{path} is not valid YAML{at}: {getattr(error, 'problem', None) or error}. Fix the "
                          f"file (or `git checkout {path}` to go back to the committed params)") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} holds a {type(raw).__name__}, not sections of params (data:, train:, ...)")
    return parse_params(raw, source=str(path), look_up_models=look_up_models)


def parse_params(raw: dict, source: str = "params", look_up_models: bool = True) -> Params:
    try:
        return Params.model_validate(raw, context={"look_up_models": look_up_models})
    except ValidationError as error:
        problems = list(dict.fromkeys(describe(e, raw) for e in error.errors()))  # a union's branches: one line
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise ParamsError(f"{source} has {len(problems)} problem(s):\n{listed}") from None


def field_of(loc: tuple):
    """The schema field at (section, name), or None."""
    if len(loc) < 2 or loc[0] not in Params.model_fields:
        return None
    return Params.model_fields[loc[0]].annotation.model_fields.get(loc[1])


def bounds(metadata: list) -> str:
    """" from 1 to 65536", " above 0 and at most 1000000": a numeric field's limits in words."""
    limits = {name: getattr(m, name) for m in metadata for name in ("ge", "gt", "le", "lt")
              if getattr(m, name, None) is not None}
    shown = {name: f"{value:,.0f}".replace(",", "") if float(value).is_integer() else f"{value:g}"
             for name, value in limits.items()}
    if "ge" in shown and "le" in shown:
        return f" from {shown['ge']} to {shown['le']}"
    words = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}
    parts = [f"{words[name]} {shown[name]}" for name in ("ge", "gt", "le", "lt") if name in shown]
    return f" {' and '.join(parts)}" if parts else ""


def alternatives(annotation) -> str | None:
    """`auto` or a whole number from 1 to 65536: what a union-typed param takes, in words (None: not a union)."""
    if get_origin(annotation) not in (Union, UnionType):
        return None
    words = []
    for member in get_args(annotation):
        metadata = []
        if get_origin(member) is Annotated:
            member, *extra = get_args(member)
            metadata = [m for info in extra for m in getattr(info, "metadata", [info])]
        if get_origin(member) is Literal:
            words += [f"`{yaml_value(value)}`" for value in get_args(member)]
        elif member is type(None):
            words.append("`null`")
        else:
            name = {int: "a whole number", float: "a number", bool: "`true` or `false`", str: "a text"}.get(
                member, getattr(member, "__name__", str(member)))
            words.append(name + bounds(metadata))
    return " or ".join(words)


def describe(error: dict, raw: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    given = error.get("input")
    field = field_of(error["loc"])
    if field is not None and len(error["loc"]) > 2 and isinstance(error["loc"][2], str):
        if (allowed := alternatives(field.annotation)) is not None:  # not pydantic's branch names
            return f"{error['loc'][0]}.{error['loc'][1]}: {allowed} (got {GIVEN.repr(given)})"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key{did_you_mean(error['loc'], raw)}"
    if error["type"] == "missing":
        return f"{key}: missing (see README 'Params' for its meaning and default)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":  # our own validators name the param and the allowed values
        return message if not key or message.startswith(f"{key}.") else f"{key}: {message}"
    return f"{key}: {message} (got {GIVEN.repr(given)})"


# What a refused value is shown as: bounded, since YAML aliases can make a 6 KB file a value whose full repr
# is gigabytes (a "billion laughs" as train.lr printed 1.26 GB of error text).
GIVEN = reprlib.Repr()
GIVEN.maxlevel, GIVEN.maxlist, GIVEN.maxtuple, GIVEN.maxdict, GIVEN.maxset = 2, 4, 4, 4, 4
GIVEN.maxstring, GIVEN.maxother, GIVEN.maxlong = 120, 120, 40


def did_you_mean(loc: tuple, raw: dict) -> str:
    section, name = (loc[0], loc[-1]) if len(loc) > 1 else (None, loc[0])
    schema = Params.model_fields[section].annotation if section in Params.model_fields else Params
    known = list(schema.model_fields)
    initials = "".join(word[0] for word in str(name).split("_") if word)  # learning_rate -> lr
    close = [initials] if initials in known else difflib.get_close_matches(str(name), known, n=1, cutoff=0.4)
    prefix = f"{section}." if section and len(loc) > 1 else ""
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def summary(description: str) -> str:
    """A field description's first sentence, plain text: the param's comment in params.yaml."""
    first = description.split(". ", 1)[0]
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", first).replace("`", "")


def field_description(key: str) -> str:
    section, name = key.split(".")
    return Params.model_fields[section].annotation.model_fields[name].description


COMMENT_COLUMN = 35  # where params.yaml's comments start, past the longest `  key: value`


def commented_params_yaml(text: str) -> str:
    """params.yaml with every param's trailing comment replaced by its field's summary (lines that are not a
    param, the file's own comments, stay as they are)."""
    lines, section = [], None
    for line in text.splitlines():
        if match := re.match(r"^(\w+):\s*(#.*)?$", line):
            section = match.group(1)
        elif section and (match := re.match(r"^(  (\w+):[^#]*?)\s*(#.*)?$", line)):
            setting, name = match.group(1), match.group(2)
            line = f"{setting.ljust(COMMENT_COLUMN - 1)} # {summary(field_description(f'{section}.{name}'))}"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # `python -m finetune.params` checks params.yaml against the schema; --table: the docs
    import sys  # table; --comments: rewrites params.yaml's comments from the fields

    from finetune.errors import run_stage

    def check_schema() -> None:
        load_params()
        if "--table" in sys.argv:
            print(params_table(yaml.load(PARAMS_FILE.read_text(), Loader=ParamsLoader)))
        elif "--comments" in sys.argv:
            PARAMS_FILE.write_text(commented_params_yaml(PARAMS_FILE.read_text()))
            print(f"{PARAMS_FILE}: comments rewritten from finetune/params.py")
        else:
            print("params.yaml is valid")

    run_stage(check_schema)
