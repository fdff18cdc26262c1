"""What `check` verifies before any stage works: the recipe against the model (built on the meta device, or
from a local weights file), the machine (GPU, compiler, a writable train.state_dir), and named weights in the cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from finetune.errors import StageError
from finetune.model import build_model, fetch_pretrained, fit_to_resolution, given_module, refuse_unless_spatial
from finetune.params import Params
from finetune.recipe import Freezer
from finetune.resume import refuse_unusable_state_dir
from finetune.runtime import cuda_unavailable_reason

PASSED = ("params.yaml passed `python -m stages.check` (schema, model and resolution, unfreeze_from, weights file, "
          "device and compiler, weights in the cache)\n")
CHECK_CLASSES = 2  # any class count builds the same backbone


def check_recipe(params: Params) -> None:
    """What the schema cannot know: the model's own modules and input sizes. Built on the meta device (shapes
    only, no memory, no weights read) unless model.weights is a local file, which is loaded and fitted."""
    m, p = params.model, params.train
    constructor = fit_to_resolution(m.arch, p.resolution, m.weights)
    if Path(m.weights).is_file():
        model = build_model(m.arch, CHECK_CLASSES, m.weights, m.head, m.head_hidden, m.head_dropout, m.drop_path,
                            **constructor)
    else:
        with torch.device("meta"):
            model = build_model(m.arch, CHECK_CLASSES, "none", m.head, m.head_hidden, m.head_dropout, m.drop_path,
                                **constructor)
    Freezer(model, p)
    if params.gradcam.target_layer != "auto":  # refused now, not after train and evaluate have run
        layer = params.gradcam.target_layer
        refuse_unless_spatial(model, layer, given_module(model, layer), p.resolution)


def check_weights(params: Params) -> None:
    """Named or hub weights (model.weights IMAGENET1K_V2, timm's pretrained) in the local cache, downloaded into
    it now if they are not and the network allows: a run offline stops here, before fetch, prepare and train
    have worked for nothing, with the ways to get them (WeightsUnavailable)."""
    m = params.model
    if m.weights == "none" or Path(m.weights).is_file():
        return
    fetch_pretrained(m.arch, m.weights)
    print(f"check: {m.arch} weights {m.weights} are in the local cache")


def check_machine(params: Params) -> None:
    p = params.train
    if p.device == "cuda" and not torch.cuda.is_available():
        raise StageError(f"train.device: cuda, but no GPU is usable ({cuda_unavailable_reason()}). See README "
                         f"'GPU drivers', or set train.device: auto or cpu")
    refuse_unusable_state_dir(p.state_dir)
    compiles_on_cpu = p.compile is True and (p.device == "cpu" or not torch.cuda.is_available())
    if compiles_on_cpu and not any(shutil.which(compiler) for compiler in ("g++", "c++", "clang++")):
        raise StageError("train.compile: true on the CPU needs a C++ compiler (inductor builds C++ kernels): "
                         "install one (Debian/Ubuntu: apt-get install g++), or set train.compile: auto")


WEIGHTS_DIR = Path("weights")  # a DVC dependency of check, probe and train (dvc.yaml)


def note_untracked_weights(weights: str) -> None:
    """A local weights file outside weights/ is recorded by its path only: replacing it would re-run nothing."""
    path = Path(weights)
    if not path.is_file():
        return
    try:
        path.resolve().relative_to(WEIGHTS_DIR.resolve())
    except ValueError:
        print(f"check: model.weights {weights} is outside {WEIGHTS_DIR}/: DVC records it by its path only, so "
              f"replacing the file would not re-run train; move it into {WEIGHTS_DIR}/ (model.weights: "
              f"{WEIGHTS_DIR}/{path.name}) to have DVC track it")


def check(params: Params) -> None:
    """Everything `check` verifies, cheapest first; raises a StageError naming the problem and the fix."""
    check_recipe(params)
    check_machine(params)
    check_weights(params)
    note_untracked_weights(params.model.weights)
