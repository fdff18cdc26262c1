"""The linear probe: a multinomial logistic regression on the frozen pretrained backbone's pooled features.

It is the floor a fine-tune must beat (on data close to ImageNet's it is a strong one: 94.5% on Caltech-101 with
EfficientNet-Lite0 at 160 px), and, fitted, the head a fine-tune can start from (`train.head_init: probe`: LP-FT,
Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution").

Features are what the new head sees (the model with its head replaced by the identity, in eval mode), at the
evaluation preprocessing of `train.resolution`: one forward pass over the train and test images. The regression is
scikit-learn's (L-BFGS), on standardized features with its inverse regularization strength C chosen on a held-out
slice (the validation split when there is one, else a stratified 20% of train), then refitted on all of train and
folded back into a weight and bias over the raw features, so it loads into the model's own linear head.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from finetune.data import ImageSplit, make_loader
from finetune.model import build_model, model_preprocessing
from finetune.params import PROBE_C_GRID
from finetune.probe_head import ProbeHead
from finetune.runtime import Precision, predict_logits
from finetune.splits import stratified_assignment
from finetune.transforms import Preprocessing, eval_transform

HELD_OUT_FRACTION = 0.2  # of each train class, to choose C when there is no validation split
HELD_OUT_SEED = 0
MAX_ITERATIONS = 1000  # L-BFGS iterations per fit; standardized features converge well before on real data


@dataclass
class Fit:
    head: ProbeHead
    held_out: dict[float, float]  # C -> held-out accuracy
    seconds: float
    converged: bool


def feature_extractor(arch: str, weights: str, resolution: int, crop: str) -> tuple[nn.Module, Preprocessing]:
    """The pretrained model with its new head replaced by the identity (its output: what the head sees), and the
    run's own evaluation preprocessing at `resolution` (`crop`: train.crop, whose resize_then_crop makes eval resize
    to a square): the probe is scored on the very pixels evaluate scores the fine-tune on."""
    model = build_model(arch, 2, weights)  # any class count: the head is dropped
    preprocessing = model_preprocessing(model, resolution, crop)
    model.set_submodule(model.head_paths[0], nn.Identity())
    return model.eval(), preprocessing


def pooled_features(model: nn.Module, split, preprocessing: Preprocessing, batch_size: int, workers: int,
                    device: torch.device, precision: Precision, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels (N,)) of a prepared split, in its row order."""
    loader = make_loader(ImageSplit(split, eval_transform(preprocessing)), batch_size, workers)
    features, labels = predict_logits(model, loader, device, precision, True, preprocessing, desc=desc)
    return features.numpy().astype(np.float32), labels.numpy()


def held_out_rows(labels: np.ndarray) -> np.ndarray:
    """A stratified, seeded 20% of train (at least one image of each class with two or more)."""
    return stratified_assignment(labels.tolist(), {"held_out": HELD_OUT_FRACTION}, HELD_OUT_SEED) == "held_out"


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, held_x: np.ndarray, held_y: np.ndarray,
              class_names: list[str], regularization: float | None = None) -> Fit:
    """C chosen on (held_x, held_y) from PROBE_C_GRID (or `regularization` as given), then refitted on all of train."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    standardized = (train_x - mean) / std
    classifier = LogisticRegression(max_iter=MAX_ITERATIONS, warm_start=True)
    held_out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if regularization is None:
            for c in PROBE_C_GRID:  # weakest regularization last; each fit starts from the last one's solution
                classifier.set_params(C=c).fit(standardized, train_y)
                held_out[c] = float(classifier.score((held_x - mean) / std, held_y))
            regularization = max(held_out, key=lambda c: (held_out[c], -c))  # ties: the stronger regularization
        before_final = len(caught)
        classifier.set_params(C=regularization).fit(standardized, train_y)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught[before_final:])
    weight, bias = expand_to_all_classes(classifier, len(class_names))
    raw_weight = weight / std  # logits = ((x - mean) / std) @ W.T + b  =  x @ (W / std).T + (b - (W / std) @ mean)
    raw_bias = bias - raw_weight @ mean
    head = ProbeHead(torch.from_numpy(raw_weight.astype(np.float32)), torch.from_numpy(raw_bias.astype(np.float32)),
                     list(class_names), float(regularization))
    return Fit(head, held_out, time.perf_counter() - start, converged)


def fitted_probe(features: dict, names: list[str], regularization):
    """(the fit that chose C, the fit on all of train, what C was chosen on, the held-out labels). C is chosen on
    the validation split when there is one, else on a stratified 20% of train, then the probe is refitted on all
    of train (what the fine-tune trains on too)."""
    train_x, train_y = features["train"]
    if "validation" in features:
        held_x, held_y, held_out = *features["validation"], "the validation split"
        fit_x, fit_y = train_x, train_y
    else:
        held = held_out_rows(train_y)
        held_x, held_y, held_out = train_x[held], train_y[held], "a stratified 20% of train"
        fit_x, fit_y = train_x[~held], train_y[~held]
    if regularization != "auto":
        chosen = fit_probe(train_x, train_y, held_x, held_y, names, regularization)
        return chosen, chosen, held_out, held_y
    chosen = fit_probe(fit_x, fit_y, held_x, held_y, names)
    fit = chosen if fit_x is train_x else fit_probe(train_x, train_y, held_x, held_y, names,
                                                     chosen.head.regularization)
    return chosen, fit, held_out, held_y


def expand_to_all_classes(classifier, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's coefficients cover the classes present in train; a class without a train image gets a
    zero weight and a bias far below the others, so the probe never predicts it (as no fine-tune learns it)."""
    weight = np.zeros((num_classes, classifier.coef_.shape[1]))
    bias = np.full(num_classes, classifier.intercept_.min() - 30.0)
    if len(classifier.classes_) == 2 and classifier.coef_.shape[0] == 1:  # scikit-learn's binary form: one row
        weight[classifier.classes_[1]], bias[classifier.classes_[1]] = classifier.coef_[0], classifier.intercept_[0]
        weight[classifier.classes_[0]], bias[classifier.classes_[0]] = 0.0, 0.0
        return weight, bias
    weight[classifier.classes_] = classifier.coef_
    bias[classifier.classes_] = classifier.intercept_
    return weight, bias


def probe_logits(head: ProbeHead, features: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(features) @ head.weight.T + head.bias
