"""How far an accuracy can be trusted: a 95% interval around one, and an exact paired test between two sets of
predictions of the same test images. Accuracies are counts of a finite test split: 1 image of 189 moves top-1 by
0.53 points, and two runs that differ by a couple of images cannot be ranked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959964  # the standard normal's 97.5% quantile
SIGNIFICANCE = 0.05


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default): unlike the normal one it stays inside [0, 1]
    and is not degenerate at 0 or 100%. (0, 1) for an empty split."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (min(1, 2 x the smaller tail))."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    # In log space (lgamma): exact integers would have thousands of digits for a large test split.
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, 2 * math.exp(top) * sum(math.exp(v - top) for v in logs))


@dataclass(frozen=True)
class Paired:
    """Two classifiers on the same test images: only the images they disagree on can tell them apart."""

    images: int
    only_first_right: int  # b: the first classifier right, the second wrong
    only_second_right: int  # c

    @property
    def difference(self) -> float:
        """First minus second accuracy, as a share of the images."""
        return (self.only_first_right - self.only_second_right) / max(self.images, 1)

    @property
    def p_value(self) -> float:
        """Exact McNemar test: under "equally accurate", each disagreement goes either way with probability 1/2."""
        return binomial_two_sided(self.only_first_right, self.only_first_right + self.only_second_right)

    @property
    def beyond_noise(self) -> bool:
        return self.p_value < SIGNIFICANCE


def correct_by_id(predictions: list[dict]) -> dict[str, bool]:
    """Per test image id, whether it was classified right: rows of plots/predictions.csv (id, actual, predicted)."""
    return {row["id"]: row["actual"] == row["predicted"] for row in predictions}


def paired(first_correct: list[bool], second_correct: list[bool]) -> Paired:
    if len(first_correct) != len(second_correct):
        raise ValueError(f"paired test on {len(first_correct)} and {len(second_correct)} images: not the same images")
    b = sum(1 for x, y in zip(first_correct, second_correct) if x and not y)
    c = sum(1 for x, y in zip(first_correct, second_correct) if y and not x)
    return Paired(len(first_correct), b, c)


def images_for_significance(pair: Paired, limit: int = 10**7) -> int | None:
    """How many test images a difference like this one (the same disagreement rates) would need for the exact
    McNemar test to call it beyond noise at 5%; None when the two never differ (no size can tell them apart)."""
    b, c, n = pair.only_first_right, pair.only_second_right, pair.images
    if b == c or n == 0:
        return None
    scale = 1.0
    while n * scale <= limit:
        bb, cc = round(b * scale), round(c * scale)
        if bb != cc and binomial_two_sided(min(bb, cc), bb + cc) < SIGNIFICANCE:
            return math.ceil(n * scale)
        scale *= 1.25
    return None


def points(share: float) -> str:
    """A difference of accuracies as signed percentage points: +1.6 points; one too small to show is 0.0 points
    (not -0.0)."""
    shown = round(share * 100, 1)
    return f"{shown:+.1f} points" if shown else "0.0 points"


def bootstrap_mean_class_interval(actual: list, predicted: list, resamples: int = 1000,
                                  seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean per-class accuracy, resampling each class's test images with replacement
    (stratified: every class keeps its count, as the test split's design does)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    actual, predicted = np.asarray(actual), np.asarray(predicted)
    per_class = [(predicted[actual == label] == label).astype(float) for label in np.unique(actual)]
    if not per_class:
        return 0.0, 1.0
    means = np.zeros(resamples)
    for hits in per_class:
        means += rng.choice(hits, size=(resamples, len(hits)), replace=True).mean(axis=1)
    means /= len(per_class)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)
