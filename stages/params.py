"""The one schema of params.yaml: every stage loads its params through `load_params`.

Validation runs before any heavy work, so a typo or an impossible value costs a
second, not an epoch. Errors name the param, what was given and what is allowed.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    # extra="forbid": an unknown key (a typo such as train.learning_rate) is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(Section):
    source: str = Field(min_length=1)
    revision: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    val_fraction: float = Field(ge=0.0, lt=1.0)
    split_seed: int = 0


class PrepareParams(Section):
    max_short_side: int = Field(ge=32)
    jpeg_quality: int = Field(ge=50, le=100)
    num_workers: int = Field(ge=0)  # 0: one per CPU core


class ModelParams(Section):
    arch: str
    weights: str

    @field_validator("arch")
    @classmethod
    def known_arch(cls, arch: str) -> str:
        allowed = classification_archs()
        if arch not in allowed:
            close = difflib.get_close_matches(arch, allowed, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown torchvision classification model '{arch}'.{hint} Allowed: {', '.join(allowed)}")
        return arch

    @model_validator(mode="after")
    def known_weights(self) -> ModelParams:
        allowed = weights_names(self.arch)
        if self.weights in allowed or self.weights == "none" or Path(self.weights).is_file():
            return self
        raise ValueError(
            f"model.weights '{self.weights}' is neither a weights name of {self.arch} nor an existing file. "
            f"Allowed: {', '.join(allowed)}, none (random init), or a path to a local state dict"
        )


class TrainParams(Section):
    resolution: int = Field(ge=32)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    lr_step_epochs: int = Field(ge=1)
    lr_gamma: float = Field(gt=0, le=1)
    seed: int
    amp: Literal["bf16", "fp16", "none"]
    channels_last: bool
    compile: bool
    num_workers: int = Field(ge=-1)  # -1: chosen from the CPUs present
    eval_every: int = Field(ge=0)  # held-out evaluation every N epochs; 0: only after the last


class EvaluateParams(Section):
    tta: bool
    batch_size: int = Field(ge=1)


class GradcamParams(Section):
    num_samples: int = Field(ge=1)
    num_misclassified: int = Field(ge=0)
    target_layer: str
    seed: int


class Params(Section):
    data: DataParams
    prepare: PrepareParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    gradcam: GradcamParams


class ParamsError(ValueError):
    """params.yaml is malformed; the message lists every problem found."""


def classification_archs() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def weights_names(arch: str) -> list[str]:
    from torchvision.models import get_model_weights

    return [w.name for w in get_model_weights(arch)] + ["DEFAULT"]


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the repository root, where params.yaml lives")
    raw = yaml.safe_load(path.read_text()) or {}
    return parse_params(raw, source=str(path))


def parse_params(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = "\n".join(f"  - {describe(e, raw)}" for e in error.errors())
        raise ParamsError(f"{source} has {error.error_count()} problem(s):\n{problems}") from None


def describe(error: dict, raw: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    given = error.get("input")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key{did_you_mean(error['loc'], raw)}"
    if error["type"] == "missing":
        return f"{key}: missing (see README 'Params' for its meaning and default)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":  # our own validators name the param and the allowed values
        return message if message.startswith(f"{key}.") else f"{key}: {message}"
    return f"{key}: {message} (got {given!r})"


def did_you_mean(loc: tuple, raw: dict) -> str:
    section, name = (loc[0], loc[-1]) if len(loc) > 1 else (None, loc[0])
    schema = Params.model_fields[section].annotation if section in Params.model_fields else Params
    known = list(schema.model_fields)
    initials = "".join(word[0] for word in str(name).split("_") if word)  # learning_rate -> lr
    close = [initials] if initials in known else difflib.get_close_matches(str(name), known, n=1, cutoff=0.4)
    prefix = f"{section}." if section and len(loc) > 1 else ""
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def load_params_or_exit(path: Path | str = PARAMS_FILE) -> Params:
    """For stage entry points: a params problem ends the stage with the message, not a traceback."""
    try:
        return load_params(path)
    except ParamsError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":  # `python -m stages.params` checks params.yaml without running anything
    load_params_or_exit()
    print("params.yaml is valid")
