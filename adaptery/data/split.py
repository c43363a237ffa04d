"""Seeded train/validation splits."""

from __future__ import annotations

import random

import numpy as np


def split_indices(n: int, *, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Record indices of the train and validation parts (each sorted, both non-empty), the same for
    the same `n`, fraction and seed on any Python or numpy version: each index draws one
    `random.Random(seed).random()` value (the one sequence Python promises never to change) and the
    `round(n * validation_fraction)` lowest draws go to validation (at least 1, at most half)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"a split needs at least 2 records (one for each part), got {n!r}")
    if isinstance(validation_fraction, bool) or not 0 < validation_fraction <= 0.5:
        raise ValueError(f"validation_fraction must be in (0, 0.5], got {validation_fraction!r}")
    size = min(n // 2, max(1, round(n * validation_fraction)))
    rng = random.Random(seed)
    draws = np.fromiter((rng.random() for _ in range(n)), dtype=np.float64, count=n)
    validation = np.zeros(n, dtype=bool)
    validation[np.argsort(draws, kind="stable")[:size]] = True
    return np.flatnonzero(~validation).tolist(), np.flatnonzero(validation).tolist()
