"""Stage `probe`: the linear-probe baseline of a pretrained run, and the head `train.head_init: probe` starts from.

The frozen backbone's pooled features of the train and test images (one forward pass each, at the evaluation
preprocessing of train.resolution and train.crop), then a multinomial logistic regression on them
(finetune/probe.py). It depends on the data, model.arch, model.weights, train.resolution and train.crop (which
sets eval's resize: shorter side or square) only: a variant that changes any other
train.* param reuses it from DVC's cache. With model.weights: none there is nothing to probe; the outputs say so.

models/probe.pt              the fitted probe as a linear head over the pooled features (or why there is none)
metrics/probe.json           probe_top1 and probe_mean_class_accuracy on the test split, beside metrics/eval.json
metrics/probe_report.json    image counts, the C chosen and every C's held-out accuracy, timings
plots/probe_predictions.csv  per test image, as plots/predictions.csv: the report compares them image by image
"""

from __future__ import annotations

import time

from finetune.errors import run_stage
from finetune.files import write_csv, write_json
from finetune.params import Params, load_params
from finetune.paths import PROBE_HEAD, PROBE_METRICS, PROBE_PREDICTIONS, PROBE_REPORT
from finetune.probe_head import save_probe

PREDICTION_COLUMNS = ["id", "actual", "predicted", "confidence"]


def no_probe(reason: str) -> None:
    save_probe(PROBE_HEAD, None, {"reason": reason})
    write_json(PROBE_METRICS, {})
    write_json(PROBE_REPORT, {"probe": False, "reason": reason})
    write_csv(PROBE_PREDICTIONS, [], PREDICTION_COLUMNS)
    print(f"probe: no linear probe: {reason}")


def main() -> None:
    if load_params(look_up_models=False).model.weights == "none":
        return no_probe("model.weights: none (random init): there are no pretrained features to probe")
    measure_probe(load_params())  # model.arch and model.weights looked up now: a model is built


def measure_probe(params: Params) -> None:
    # Imported here, not above: a run without pretrained weights writes its no-probe record without paying the
    # seconds of importing torchvision, timm and datasets.
    import torch

    from finetune.data import class_names, open_split, resolve_workers, split_names
    from finetune.metrics import summarize
    from finetune.probe import feature_extractor, fitted_probe, pooled_features, probe_logits
    from finetune.runtime import Precision, keep_freed_memory, pick_device, resolve_eval_batch

    m, p = params.model, params.probe
    keep_freed_memory()
    device = pick_device()
    model, preprocessing = feature_extractor(m.arch, m.weights, params.train.resolution, params.train.crop)
    model = model.to(device, memory_format=torch.channels_last)
    batch_size, workers = resolve_eval_batch(p.batch_size, device), resolve_workers(p.num_workers)
    precision = Precision("auto", device)
    splits = {name: open_split(name) for name in split_names()}
    names = class_names(splits["train"])

    start = time.perf_counter()
    features = {name: pooled_features(model, split, preprocessing, batch_size, workers, device, precision,
                                      f"probe features ({name})") for name, split in splits.items()}
    feature_seconds = time.perf_counter() - start
    chosen, fit, held_out, held_y = fitted_probe(features, names, p.regularization)
    test_x, test_y = features["test"]
    probs = probe_logits(fit.head, test_x).softmax(1)
    scores = summarize(probs, torch.from_numpy(test_y))
    save_probe(PROBE_HEAD, fit.head, {"arch": m.arch, "weights": m.weights, "resolution": params.train.resolution,
                                      "crop": params.train.crop})
    write_json(PROBE_METRICS, {"probe_top1": scores["top1"],
                               "probe_mean_class_accuracy": scores["mean_class_accuracy"]})
    images = sum(len(split) for split in splits.values())
    write_json(PROBE_REPORT, {
        "probe": True, **{f"{name}_images": len(split) for name, split in splits.items()},
        "top1": scores["top1"], "top5": scores["top5"], "mean_class_accuracy": scores["mean_class_accuracy"],
        "feature_dim": int(test_x.shape[1]), "regularization": fit.head.regularization,
        "regularization_chosen_on": held_out if p.regularization == "auto" else "given (probe.regularization)",
        "held_out_images": int(len(held_y)),
        "held_out_accuracy": {f"{c:g}": round(a, 5) for c, a in chosen.held_out.items()},
        "converged": fit.converged, "feature_seconds": round(feature_seconds, 1),
        "feature_images_per_s": round(images / feature_seconds, 1),
        "fit_seconds": round(chosen.seconds + (fit.seconds if fit is not chosen else 0), 1),
    })
    write_predictions(splits["test"]["id"], names, test_y, probs)
    print(f"probe: {m.arch} ({m.weights}) frozen at {params.train.resolution} px: test top-1 {scores['top1']:.2%}, "
          f"mean per-class {scores['mean_class_accuracy']:.2%} ({len(test_y)} images); C={fit.head.regularization:g} "
          f"({'chosen on ' + held_out if p.regularization == 'auto' else 'given'}); features of {images} images in "
          f"{feature_seconds:.0f} s" + ("" if fit.converged else "; L-BFGS did not fully converge"))


def write_predictions(ids: list[str], names: list[str], labels, probs) -> None:
    """Per test image, as evaluate's plots/predictions.csv: the report compares the two image by image."""
    predicted = probs.argmax(1)
    write_csv(PROBE_PREDICTIONS, [{"id": ids[i], "actual": names[labels[i]], "predicted": names[predicted[i]],
                                   "confidence": round(probs[i, predicted[i]].item(), 4)} for i in range(len(ids))],
              PREDICTION_COLUMNS)


if __name__ == "__main__":
    run_stage(main)
