"""Dataset statistics, computed in one streaming pass.

Memory is bounded by what the answer needs, not by the record count's text: token lengths are
kept as a count per distinct length (at most the model's context many), so percentiles are exact;
the duplicate rate keeps 8 bytes per record (the digest exact deduplication compares).
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from adaptery.data.chat import ROLES, conversations_of
from adaptery.data.dedup import text_digest, tokens

HISTOGRAM_BINS = 20


def compute_stats(
    records: Iterable[dict[str, Any]],
    *,
    count_tokens: Callable[[dict[str, Any]], int] | None = None,
    token_counts: Iterator[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """JSON-safe statistics of chat records. Token lengths come from `count_tokens(record)`, or,
    when they were already counted (during validation), from `token_counts`, one per record in order;
    without either there is no `tokens` entry."""
    count = turns = max_turns = characters = max_characters = 0
    roles: Counter = Counter()
    lengths: Counter = Counter()
    digests = array("Q")
    for record in records:
        messages = conversations_of(record)[0]  # a preference pair: its prompt and preferred answer
        count += 1
        turns += len(messages)
        max_turns = max(max_turns, len(messages))
        roles.update(m["role"] for m in messages)
        size = sum(len(m["content"]) for m in messages)
        characters += size
        max_characters = max(max_characters, size)
        digests.append(text_digest(tokens(record)))
        if token_counts is not None:
            lengths[next(token_counts)] += 1
        elif count_tokens is not None:
            lengths[count_tokens(record)] += 1
        if progress is not None and count % 1000 == 0:
            progress(count)
    unique = len(np.unique(np.frombuffer(digests, dtype=np.uint64))) if count else 0
    stats: dict[str, Any] = {
        "records": count,
        "turns": {"total": turns, "mean": turns / count if count else 0.0, "max": max_turns},
        "role_counts": {role: roles.get(role, 0) for role in ROLES},
        "characters": {"total": characters, "mean": characters / count if count else 0.0, "max": max_characters},
        "duplicate_rate": (count - unique) / count if count else 0.0,
    }
    if count_tokens is not None or token_counts is not None:
        stats["tokens"] = token_stats(lengths)
    return stats


def token_stats(lengths: Counter) -> dict[str, Any]:
    """Summary of a {length: records} count. Percentiles are nearest-rank (a length some record has:
    the least with at least p% of records at or below it). The histogram has up to HISTOGRAM_BINS
    log-spaced integer bins from min to max: `counts[i]` records have edges[i] ≤ length < edges[i + 1]
    (the last edge is max + 1)."""
    records = sum(lengths.values())
    if not records:
        return {
            "total": 0,
            "mean": 0.0,
            "min": 0,
            "max": 0,
            "p50": 0,
            "p95": 0,
            "histogram": {"edges": [], "counts": []},
        }
    values = sorted(lengths)
    cumulative = np.cumsum([lengths[v] for v in values])

    def percentile(p: float) -> int:
        return values[int(np.searchsorted(cumulative, math.ceil(p / 100 * records)))]

    low, high = values[0], values[-1]
    edges = sorted({low, high + 1} | {round(e) for e in np.geomspace(max(low, 1), high + 1, HISTOGRAM_BINS + 1)})
    edges = [e for e in edges if low <= e <= high + 1]
    counts = np.histogram(values, bins=edges, weights=[lengths[v] for v in values])[0]
    total = sum(length * n for length, n in lengths.items())
    return {
        "total": total,
        "mean": total / records,
        "min": low,
        "max": high,
        "p50": percentile(50),
        "p95": percentile(95),
        "histogram": {"edges": edges, "counts": [int(c) for c in counts]},
    }
