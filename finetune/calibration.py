"""Confidence that means what it says: temperature scaling fitted on the validation split, and the expected
calibration error (ECE) with the reliability bins it is made of.

Reference: Guo et al. 2017, "On Calibration of Modern Neural Networks" (ICML): one scalar T divides the logits;
fitted by minimising the negative log-likelihood on held-out images, it leaves every prediction (the argmax)
unchanged and makes the top probability track accuracy. Label smoothing, which the recommended recipe uses,
leaves a model under-confident (T < 1 sharpens it back). The test split is never used to fit T.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

BINS = 15  # equal-width confidence bins, as in Guo et al.
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)  # the coverage table's rows
TEMPERATURE_RANGE = (0.05, 20.0)  # a fit outside it means the validation split cannot tell (too few images)


@dataclass(frozen=True)
class Calibration:
    """The temperature a model's logits are divided by, and where it came from (not fitted: 1, and why)."""

    temperature: float = 1.0
    fitted_on: str = ""  # "validation" when fitted; "" when not
    images: int = 0  # validation images it was fitted on
    reason: str = "the model was saved before calibration existed: re-run `dvc repro train`"  # why not fitted

    @property
    def fitted(self) -> bool:
        return bool(self.fitted_on)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict | None) -> Calibration:
        """Raises ValueError or TypeError on a damaged record (a temperature that is not a positive number)."""
        if not record:
            return cls()
        calibration = cls(**record)
        if not (isinstance(calibration.temperature, float) and 0 < calibration.temperature < float("inf")):
            raise ValueError(f"calibration temperature {calibration.temperature!r} is not a positive number")
        return calibration

    def describe(self) -> str:
        if not self.fitted:
            return f"not calibrated (temperature 1): {self.reason}"
        return f"temperature {self.temperature:.3g}, fitted on {self.images:,} {self.fitted_on} images"


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the mean cross-entropy of logits / T, by L-BFGS on log T (one parameter, a convex
    problem in practice); clamped to TEMPERATURE_RANGE."""
    # imported here: the report stage reads calibrations and draws their bins without PyTorch (~1.5 s a run)
    import torch
    # clones: logits predicted under torch.inference_mode cannot take part in autograd
    logits, labels = logits.float().clone(), labels.clone()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_RANGE
    return float(min(max(log_t.exp().item(), low), high))


def calibrate(logits: torch.Tensor, labels: torch.Tensor, split: str = "validation") -> Calibration:
    if len(labels) == 0:
        return Calibration(reason=f"the {split} split is empty")
    return Calibration(temperature=round(fit_temperature(logits, labels), 4), fitted_on=split, images=len(labels),
                       reason="")


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per equal-width confidence bin with images: its range, image count, mean confidence and accuracy."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    # bin i holds (i/bins, (i+1)/bins]; a confidence of exactly 0 (impossible after a softmax) would go to bin 0
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        if members.any():
            rows.append({"low": b / bins, "high": (b + 1) / bins, "images": int(members.sum()),
                         "confidence": float(confidence[members].mean()), "accuracy": float(correct[members].mean())})
    return rows


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """Sum over bins of (bin share of images) x |accuracy - mean confidence|: 0 is perfectly calibrated."""
    total = len(confidence)
    if total == 0:
        return 0.0
    return float(sum(r["images"] / total * abs(r["accuracy"] - r["confidence"])
                     for r in reliability_bins(confidence, correct, bins)))


def coverage_table(confidence: np.ndarray, correct: np.ndarray, thresholds=THRESHOLDS) -> list[dict]:
    """What a minimum confidence costs: per threshold, the share of images answered (the rest "unknown"), the
    accuracy on those, and the errors still answered."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=bool)
    rows = []
    for threshold in thresholds:
        kept = confidence >= threshold
        answered = int(kept.sum())
        rows.append({"min_confidence": threshold, "answered": answered, "share": answered / max(len(correct), 1),
                     "accuracy": float(correct[kept].mean()) if answered else float("nan"),
                     "errors": int((~correct[kept]).sum())})
    return rows

