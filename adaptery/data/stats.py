"""Dataset statistics, computed in one streaming pass."""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from adaptery.data.dedup import _digest, normalise_for_dedup

# Token-length histogram bins: 0, 16, 32, 64, … 65536 and above.
TOKEN_EDGES = [0] + [2**k for k in range(4, 17)]


def compute_stats(
    records: Iterable[dict[str, Any]],
    *,
    count_tokens: Callable[[list[dict]], int] | None = None,
    token_counts: Iterator[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """One pass over the records. Token lengths come from `count_tokens`, or, when they were already
    counted (during validation), from `token_counts`, one per record in order."""
    if token_counts is not None:
        count_tokens = lambda _messages: next(token_counts)  # noqa: E731
    count = turns = max_turns = chars_total = max_chars = duplicates = 0
    roles: Counter = Counter()
    tokens = array("I")
    seen: set[bytes] = set()
    for record in records:
        messages = record["messages"]
        count += 1
        turns += len(messages)
        max_turns = max(max_turns, len(messages))
        roles.update(m["role"] for m in messages)
        chars = sum(len(m["content"]) for m in messages)
        chars_total += chars
        max_chars = max(max_chars, chars)
        digest = _digest(normalise_for_dedup(record))
        if digest in seen:
            duplicates += 1
        else:
            seen.add(digest)
        if count_tokens is not None:
            tokens.append(count_tokens(messages))
        if progress is not None and count % 1000 == 0:
            progress(count)
    out: dict[str, Any] = {
        "records": count,
        "turns": {"total": turns, "mean": turns / count if count else 0.0, "max": max_turns},
        "role_counts": {role: roles.get(role, 0) for role in ("system", "user", "assistant")},
        "characters": {"mean": chars_total / count if count else 0.0, "max": max_chars},
        "duplicate_rate": duplicates / count if count else 0.0,
    }
    if count_tokens is not None and count:
        values = np.frombuffer(tokens, dtype=np.uint32)
        histogram, _ = np.histogram(values, bins=[*TOKEN_EDGES, max(int(values.max()) + 1, TOKEN_EDGES[-1] + 1)])
        out["tokens"] = {
            "total": int(values.sum()),
            "mean": float(values.mean()),
            "min": int(values.min()),
            "max": int(values.max()),
            "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95)),
            "histogram": {"edges": TOKEN_EDGES, "counts": [int(c) for c in histogram]},
        }
    return out
