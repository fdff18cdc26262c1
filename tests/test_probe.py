"""The linear probe (finetune/probe.py), the statistics that compare runs (finetune/stats.py), and the report's
verdict on whether fine-tuning paid over the probe."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from finetune import run_report as report
from finetune.errors import StageError
from finetune.params import PROBE_C_GRID
from finetune.probe import fit_probe, held_out_rows, probe_logits
from finetune.probe_head import ProbeHead, initialize_head, load_probe, save_probe
from finetune.stats import (
    Paired,
    binomial_two_sided,
    bootstrap_mean_class_interval,
    images_for_significance,
    paired,
    points,
    wilson_interval,
)
from tests.conftest import run, tiny_params


def blobs(classes: int = 5, per_class: int = 40, dim: int = 12, seed: int = 0, spread: float = 1.0):
    """Gaussian clusters, one per class, far from the origin (raw features are not centred, as pooled ones are not)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dim)) + 10
    labels = np.repeat(np.arange(classes), per_class)
    features = centres[labels] + rng.normal(0, spread, (len(labels), dim)) * rng.uniform(0.1, 5, dim)
    return features.astype(np.float32), labels


def test_probe_fits_raw_features_through_standardization():
    """The regression runs on standardized features, and is folded back into one linear layer over the raw ones:
    its logits give the same predictions as scikit-learn's own."""
    every_x, every_y = blobs(per_class=50)
    test = np.arange(len(every_y)) % 5 == 0
    x, y, test_x, test_y = every_x[~test], every_y[~test], every_x[test], every_y[test]
    held = held_out_rows(y)
    fit = fit_probe(x[~held], y[~held], x[held], y[held], [f"c{i}" for i in range(5)])
    assert set(fit.held_out) == set(PROBE_C_GRID) and fit.head.regularization in fit.held_out
    assert max(fit.held_out.values()) >= 0.9 and fit.converged
    logits = probe_logits(fit.head, test_x)
    assert logits.shape == (50, 5) and (logits.argmax(1).numpy() == test_y).mean() >= 0.9
    # the same classifier scikit-learn would apply to the standardized features
    from sklearn.linear_model import LogisticRegression

    mean, std = x[~held].mean(0), x[~held].std(0) + 1e-6
    reference = LogisticRegression(C=fit.head.regularization, max_iter=1000).fit((x[~held] - mean) / std, y[~held])
    expected = reference.decision_function((test_x - mean) / std)
    assert np.allclose(logits.numpy() - logits.numpy().mean(1, keepdims=True),
                       expected - expected.mean(1, keepdims=True), atol=1e-3)


def test_held_out_slice_is_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    held = held_out_rows(labels)
    assert [int(held[labels == c].sum()) for c in range(4)] == [2, 1, 1, 0]  # a one-image class keeps its image
    assert (held_out_rows(labels) == held).all()


def test_a_class_without_train_images_is_never_predicted():
    x, y = blobs(classes=3)
    fit = fit_probe(x, y, x, y, ["a", "b", "c", "never seen"], regularization=1.0)
    assert fit.head.weight.shape == (4, 12)
    assert (probe_logits(fit.head, x).argmax(1) != 3).all()


def test_two_classes_use_scikit_learns_binary_form():
    x, y = blobs(classes=2)
    fit = fit_probe(x, y, x, y, ["a", "b"], regularization=1.0)
    assert (probe_logits(fit.head, x).argmax(1).numpy() == y).mean() >= 0.95


def test_probe_head_initializes_the_model_head_and_is_checked(tmp_path):
    head = ProbeHead(torch.randn(3, 8), torch.randn(3), ["a", "b", "c"], 0.3)
    save_probe(tmp_path / "probe.pt", head, {"arch": "x"})
    loaded = load_probe(tmp_path / "probe.pt", ["a", "b", "c"])
    model = nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 3))
    model.head_paths = ("1",)
    initialize_head(model, loaded)
    assert torch.equal(model[1].weight, head.weight) and torch.equal(model[1].bias, head.bias)
    with pytest.raises(Exception, match="fitted for other classes"):
        load_probe(tmp_path / "probe.pt", ["a", "b"])
    wrong = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    wrong.head_paths = ("1",)
    with pytest.raises(Exception, match="does not fit the model's"):
        initialize_head(wrong, loaded)
    save_probe(tmp_path / "none.pt", None, {"reason": "model.weights: none"})
    with pytest.raises(Exception, match="there is no linear probe .model.weights: none.: set train.head_init: random"):
        load_probe(tmp_path / "none.pt", ["a", "b", "c"])


def test_wilson_interval_stays_inside_and_matches_known_values():
    low, high = wilson_interval(188, 189)
    assert (round(low, 3), round(high, 3)) == (0.971, 0.999)  # 99.5% of 189: 97.1-99.9%
    assert wilson_interval(0, 10)[0] == 0 and wilson_interval(10, 10)[1] == pytest.approx(1)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_exact_mcnemar_matches_the_binomial_test():
    from scipy.stats import binomtest

    for k, n in [(0, 5), (3, 20), (40, 100), (500, 1100), (1, 2)]:
        assert binomial_two_sided(k, n) == pytest.approx(binomtest(k, n).pvalue, rel=1e-9)
    assert paired([True, True, False], [True, False, False]) == Paired(3, 1, 0)
    with pytest.raises(ValueError, match="not the same images"):
        paired([True], [True, False])


def test_a_difference_of_two_images_is_noise_and_says_how_many_images_would_tell():
    """The user's three runs (189 test images) differed by one or two: p = 1.0 and 0.5."""
    assert Paired(189, 2, 1).p_value == 1.0 and not Paired(189, 2, 1).beyond_noise
    assert Paired(189, 2, 0).p_value == 0.5
    needed = images_for_significance(Paired(189, 2, 1))
    assert needed > 2000
    bigger = Paired(needed, round(2 * needed / 189), round(needed / 189))
    assert bigger.beyond_noise
    assert images_for_significance(Paired(189, 3, 3)) is None


def test_a_difference_reads_as_signed_points_and_none_too_small_to_show_as_minus_zero():
    assert points(0.245) == "+24.5 points" and points(-0.0175) == "-1.8 points"
    assert points(-0.0004) == points(0.0004) == points(0.0) == "0.0 points"  # the report once said "-0.0 points"


def test_mean_per_class_interval_covers_the_estimate():
    rng = np.random.default_rng(1)
    actual = rng.integers(0, 10, 500)
    predicted = np.where(rng.random(500) < 0.9, actual, (actual + 1) % 10)
    low, high = bootstrap_mean_class_interval(actual.tolist(), predicted.tolist())
    estimate = np.mean([(predicted[actual == k] == k).mean() for k in range(10)])
    assert low < estimate < high and high - low < 0.1


def comparison(fine_tune_right: int, probe_right: int, both: int, images: int = 1000) -> report.ProbeComparison:
    correct = [True] * both + [True] * fine_tune_right + [False] * probe_right
    correct += [False] * (images - len(correct))
    probe = [True] * both + [False] * fine_tune_right + [True] * probe_right
    probe += [False] * (images - len(probe))
    return report.ProbeComparison(top1=sum(probe) / images, mean_class_accuracy=0.5, regularization=0.3,
                                  pair=paired(correct, probe))


def test_the_verdict_says_whether_fine_tuning_paid():
    won = comparison(120, 20, 800)
    text = report.probe_verdict(won, 0.92)
    assert text.startswith("**Fine-tuning paid: +10.0 points top-1 over a linear probe of the same frozen weights**")
    assert "120" in text and "McNemar" in text
    lost = comparison(10, 60, 850)
    text = report.probe_verdict(lost, 0.86)
    assert "**Fine-tuning lost to a linear probe of the same frozen weights: -5.0 points top-1**" in text
    assert "train.head_init: probe" in text and "models/probe.pt" in text and "train.crop: resize_then_crop" in text
    tied = comparison(3, 2, 900)
    text = report.probe_verdict(tied, 0.903)
    assert "did not measurably beat" in text and "within the noise" in text and "test images to be told apart" in text
    none = report.ProbeComparison(reason="model.weights: none (random init): there are no pretrained features")
    assert report.probe_verdict(none, 0.5).startswith("**No linear-probe baseline:** model.weights: none")
    assert "`train.wise_ft`" in report.probe_verdict(lost, 0.86)
    # train.wise_ft kept the start: the model is the probe, and the verdict says so instead of a tie
    same = comparison(0, 0, 900)
    start_won = {"alpha": 0.0, "validation_acc": {"0": 0.95, "0.5": 0.94, "1": 0.93}}
    text = report.probe_verdict(same, 0.9, start_won)
    assert text.startswith("**The saved model is the linear probe itself** (90.00% test top-1)")
    assert "validation top-1 α 0 95.00%, α 0.5 94.00%, α 1 93.00%" in text
    assert report.probe_verdict(won, 0.92, {**start_won, "alpha": 0.5}) == report.probe_verdict(won, 0.92)


def test_the_trainer_starts_its_head_from_the_probe_and_params_refuse_what_cannot():
    from finetune.params import ParamsError, parse_params
    from finetune.trainer import Trainer
    from tests.conftest import shipped_params

    raw = shipped_params()
    raw["model"].update(arch="resnet18", weights="none")
    raw["train"].update(resolution=32, num_workers=0)
    head = ProbeHead(torch.randn(4, 512), torch.randn(4), list("abcd"), 0.1)
    trainer = Trainer(parse_params(raw), 4, torch.device("cpu"), head=head)
    assert torch.equal(trainer.model.fc.weight, head.weight) and torch.equal(trainer.kept_model.fc.bias, head.bias)
    raw["train"]["head_init"] = "probe"
    with pytest.raises(ParamsError, match="train.head_init: probe needs pretrained weights"):
        parse_params(raw)
    raw["model"].update(weights="IMAGENET1K_V1", head="mlp")
    with pytest.raises(ParamsError, match="train.head_init: probe needs model.head: linear"):
        parse_params(raw, look_up_models=False)


def test_a_run_without_pretrained_weights_writes_its_no_probe_record_without_torchvision(tmp_path):
    """model.weights: none runs probe too (every tiny run of the tests does): its record needs torch alone, not the
    seconds of torchvision, timm and datasets."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(tmp_path)))
    result = run([sys.executable, "-X", "importtime", "-m", "stages.probe"], tmp_path)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()}
    assert "torch" in imported and not imported & {"torchvision", "timm", "datasets", "sklearn"}
    assert "no linear probe: model.weights: none" in result.stdout
    assert json.loads((tmp_path / "metrics/probe_report.json").read_text())["probe"] is False
    with pytest.raises(StageError, match="there is no linear probe"):
        load_probe(tmp_path / "models/probe.pt", ["a", "b"])
