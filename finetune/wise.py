"""WiSE-FT (Wortsman et al., CVPR 2022, "Robust fine-tuning of zero-shot models"): the fine-tuned weights mixed
with the run's start (the pretrained backbone under the linear-probe head), the mix chosen on the validation split.

Why: on data close to ImageNet's the frozen features are already strong (Caltech-101: the probe scored above every
fine-tune, BENCHMARKS.md); a mix between the two keeps what each gets right, and since α = 0 is the probe itself a
run with it in its list never validates below its own probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def mixed(start: dict, tuned: dict, alpha: float) -> dict:
    """(1 - α) × start + α × tuned for every float tensor; the others (BatchNorm's batch count) are the tuned."""
    return {name: torch.lerp(start[name], value, alpha) if value.is_floating_point() else value
            for name, value in tuned.items()}


@dataclass
class MixChoice:
    alpha: float
    weights: dict
    validation: dict[float, tuple[float, float]]  # α -> (accuracy, loss)

    def summary(self) -> dict:
        """What metrics/train/metrics.json records under `wise_ft`."""
        return {"alpha": self.alpha, "validation_acc": {f"{a:g}": acc for a, (acc, _) in self.validation.items()}}

    def line(self) -> str:
        scores = ", ".join(f"α {a:g} {acc:.4f}" for a, (acc, _) in self.validation.items())
        what = {0.0: " (the start: the linear probe)", 1.0: " (the fine-tuned weights unmixed)"}.get(self.alpha, "")
        return (f"train: WiSE-FT, validation accuracy of the weights mixed with the start: {scores}; kept "
                f"α {self.alpha:g}{what}")


def choose_mix(model: torch.nn.Module, start: dict, tuned: dict, alphas: list[float], validate) -> MixChoice:
    """Scores each α's mix, loaded into `model`, with `validate()` -> (loss, accuracy); the best accuracy wins, ties
    go to the lower loss. Every process of a distributed run calls it with the same weights (validate is a
    collective)."""
    validation = {}
    for alpha in sorted(set(alphas)):
        model.load_state_dict(mixed(start, tuned, alpha))
        loss, accuracy = validate()
        validation[alpha] = (accuracy, loss)
    best = max(validation, key=lambda a: (validation[a][0], -validation[a][1]))
    return MixChoice(best, mixed(start, tuned, best), validation)
