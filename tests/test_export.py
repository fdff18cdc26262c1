"""Both export formats load back in their own runtime, take any batch size and match the PyTorch model;
the check that fails the stage catches a model that disagrees."""

from __future__ import annotations

import pytest
import torch

from finetune.exporting import EXPORT_FILES, compare, export_model, load_exported
from finetune.model import build_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    # mlp head with dropout: an export traced in training mode would differ from run to run
    return build_model("resnet18", 5, "none", head="mlp", head_hidden=16, head_dropout=0.5).eval()


@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_export_round_trip_matches_at_any_batch_size(model, export_format, tmp_path):
    path = tmp_path / EXPORT_FILES[export_format]
    export_model(model, torch.randn(2, 3, 48, 48), export_format, path)
    run = load_exported(path, export_format)
    for batch_size in (1, 7):
        images = torch.randn(batch_size, 3, 48, 48)
        with torch.inference_mode():
            check = compare(model(images), run(images))
        assert check["images"] == batch_size and check["top1_agreement"] == 1
        assert check["relative_logit_difference"] < 1e-5
    if export_format == "onnx":  # issue 31: each node carried the stack that made it, this machine's paths included
        assert b"site-packages" not in path.read_bytes() and b"finetune/" not in path.read_bytes()


def test_compare_reports_a_disagreeing_export():
    expected = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    check = compare(expected, torch.tensor([[1.0, 3.0], [0.0, 2.0]]))
    assert check["top1_agreement"] == 0.5 and check["max_abs_logit_difference"] == 2
    assert check["relative_logit_difference"] == pytest.approx(2 / 3)
    huge = torch.tensor([[4e11, 0.0]])  # untrained networks reach such logits: judged relative to them
    assert compare(huge, huge + 1e5)["relative_logit_difference"] == pytest.approx(2.5e-7)


@pytest.mark.parametrize("weights,says", [
    ("none", "random initialisation, so it inherits the biases of its fine-tuning data alone"),
    ("IMAGENET1K_V2", "pretraining data (ImageNet)"),
    ("/data/my_weights.pth", "weights in `…/my_weights.pth` were trained on"),
])
def test_the_model_card_says_where_the_biases_come_from_and_shows_paths_without_this_machine(weights, says):
    """Before: the card of a random-init model said it inherits ImageNet's biases, and a source such as
    `.../my_images` was shown as `.../my\\_images` (a backslash escape inside a code span shows literally). Now
    a path outside the project is shown by its name: the rest is this machine's."""
    from finetune.checkpoint import Checkpoint
    from finetune.exporting import model_card
    from finetune.transforms import Preprocessing

    checkpoint = Checkpoint("resnet18", ["a_b", "c"], Preprocessing(64), {"head": "linear"}, epoch=3,
                            params={"model": {"weights": weights}, "data": {"source": "/home/me/my_images"},
                                    "train": {"epochs": 3}})
    card = model_card(checkpoint, "onnx", {"top1": 0.5, "top5": 1.0, "mean_class_accuracy": 0.5},
                      {"splits": {"train": {"images": 10}}}, {"images": 8, "top1_agreement": 1.0,
                                                                "relative_logit_difference": 1e-7})
    assert says in card and "Source: `…/my_images`." in card and "/home/me" not in card
    assert ("ImageNet" in card) == (weights == "IMAGENET1K_V2")
