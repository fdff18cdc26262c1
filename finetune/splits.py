"""Stratified, seeded slices of a labelled split: prepare's carved validation/test splits and the linear probe's
held-out slice are drawn by the same rule."""

from __future__ import annotations

import numpy as np


def stratified_assignment(labels: list[int], fractions: dict[str, float], seed: int) -> np.ndarray:
    """The split name of each row: per class, round(n * fraction) rows (at least one) go to each split of
    `fractions`, chosen by `seed`; the rest, at least one, stay in train."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    assignment = np.full(len(labels), "train", dtype=object)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for split, fraction in fractions.items():
            count = min(max(1, round(len(rows) * fraction)), len(rows) - start - 1)
            assignment[rows[start:start + count]] = split
            start += max(count, 0)
    return assignment
