"""WiSE-FT (train.wise_ft): the weights mixed with the run's start, the mix chosen on validation."""

from __future__ import annotations

import pytest
import torch

from finetune.wise import choose_mix, mixed


def test_a_mix_is_linear_in_every_float_tensor_and_keeps_the_counts():
    start = {"w": torch.zeros(3), "num_batches_tracked": torch.tensor(0)}
    tuned = {"w": torch.tensor([4.0, -8.0, 2.0]), "num_batches_tracked": torch.tensor(120)}
    assert torch.equal(mixed(start, tuned, 0.0)["w"], start["w"])
    assert torch.equal(mixed(start, tuned, 1.0)["w"], tuned["w"])
    assert torch.allclose(mixed(start, tuned, 0.25)["w"], torch.tensor([1.0, -2.0, 0.5]))
    assert mixed(start, tuned, 0.25)["num_batches_tracked"].item() == 120


def test_the_mix_that_validates_best_is_kept_ties_to_the_lower_loss():
    model = torch.nn.Linear(1, 1, bias=False)
    start, tuned = {"weight": torch.zeros(1, 1)}, {"weight": torch.ones(1, 1)}
    # accuracy peaks at weight 0.5; the loss is lower at 0.75, whose accuracy ties with 0.25's
    scores = {0.0: (0.9, 0.40), 0.25: (0.95, 0.30), 0.5: (0.97, 0.35), 0.75: (0.95, 0.20), 1.0: (0.93, 0.25)}
    seen = []

    def validate():
        alpha = model.weight.item()
        seen.append(alpha)
        loss, accuracy = scores[alpha][1], scores[alpha][0]
        return loss, accuracy

    choice = choose_mix(model, start, tuned, [1.0, 0.5, 0.0, 0.25, 0.75, 0.5], validate)
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0]  # each α once, in order
    assert choice.alpha == 0.5 and torch.equal(choice.weights["weight"], torch.full((1, 1), 0.5))
    assert choice.summary() == {"alpha": 0.5, "validation_acc": {"0": 0.9, "0.25": 0.95, "0.5": 0.97, "0.75": 0.95,
                                                                 "1": 0.93}}
    assert "kept α 0.5" in choice.line() and "α 0 0.9000" in choice.line()
    del scores[0.5]
    tie = choose_mix(model, start, tuned, [0.25, 0.75], validate)
    assert tie.alpha == 0.75  # same accuracy, lower loss
    assert "unmixed" in choose_mix(model, start, tuned, [1.0], validate).line()


def test_params_refuse_a_mix_without_a_probe_head():
    from finetune.params import ParamsError, parse_params
    from tests.conftest import shipped_params

    raw = shipped_params()
    raw["train"]["wise_ft"] = [0.5, 1.0]
    with pytest.raises(ParamsError, match="train.wise_ft .* needs train.head_init: probe"):
        parse_params(raw, look_up_models=False)
    raw["train"].update(head_init="probe", wise_ft=[0.5, 1.5])
    with pytest.raises(ParamsError, match="wise_ft"):
        parse_params(raw, look_up_models=False)
    raw["train"]["wise_ft"] = [0.0, 0.5, 1.0]
    assert parse_params(raw, look_up_models=False).train.wise_ft == [0.0, 0.5, 1.0]
