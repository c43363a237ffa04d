"""Seeded train/validation splits."""

from __future__ import annotations

import random


def split_indices(n: int, *, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Record indices of the train and validation parts, both non-empty, the same for the same seed."""
    if not 0 < validation_fraction <= 0.5:
        raise ValueError(f"validation_fraction must be in (0, 0.5], got {validation_fraction}")
    if n < 2:
        raise ValueError(f"a split needs at least 2 records, got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    size = min(n - 1, max(1, round(n * validation_fraction)))
    return sorted(order[size:]), sorted(order[:size])
