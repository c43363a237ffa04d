"""Benchmark: near-duplicate removal on synthetic chat records with known duplicates.

    python bench/dedup.py --records 1000000

Generates records (a question and a 20–80-word answer from a seeded vocabulary) of which a given
fraction are near-duplicates of earlier records (1–2 words substituted, inserted or deleted), so
the truth is known. Runs, in the same process and on the same stream:

- the baseline: exact-hash dedup only (what a plain `sort -u` on normalised text finds);
- Adaptery's dedup (exact + MinHash LSH at `--threshold`).

Reports records/s, wall time, peak RSS and precision/recall of duplicate detection against the
generated truth, as JSON and a markdown table. `recall` counts every generated duplicate;
`recall_at_threshold` only those whose true shingle Jaccard with their source reaches the
threshold (an edit in a short answer can push a generated copy below it: by the definition
asked for, those are not near-duplicates).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adaptery.data.dedup import deduplicate, normalise_for_dedup, shingles  # noqa: E402

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "del", "mor", "fin", "gar", "tos"]


def vocabulary(rng: random.Random, size: int = 8000) -> list[str]:
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def edit(words: list[str], rng: random.Random, vocab: list[str]) -> list[str]:
    words = list(words)
    for _ in range(rng.randint(1, 2)):
        action = rng.random()
        at = rng.randrange(len(words))
        if action < 0.5:
            words[at] = rng.choice(vocab)
        elif action < 0.8:
            words.insert(at, rng.choice(vocab))
        elif len(words) > 10:
            del words[at]
    return words


def chat(question: list[str], answer: list[str]) -> dict:
    return {
        "messages": [
            {"role": "user", "content": " ".join(question)},
            {"role": "assistant", "content": " ".join(answer)},
        ]
    }


def jaccard(a: dict, b: dict) -> float:
    """True Jaccard similarity of the shingle sets the dedup compares (what MinHash estimates)."""
    x, y = set(shingles(normalise_for_dedup(a))), set(shingles(normalise_for_dedup(b)))
    return len(x & y) / len(x | y)


def records(
    n: int, duplicate_fraction: float, seed: int, truth: set[int], similar: set[int], threshold: float
) -> Iterator[tuple[int, dict]]:
    """Yields the stream; fills `truth` (generated duplicates) and `similar` (those at or above threshold)."""
    rng = random.Random(seed)
    vocab = vocabulary(rng)
    recent: list[tuple[list[str], list[str]]] = []
    for index in range(n):
        if recent and rng.random() < duplicate_fraction:
            question, source = rng.choice(recent)
            answer = edit(source, rng, vocab)
            truth.add(index)
            if jaccard(chat(question, source), chat(question, answer)) >= threshold:
                similar.add(index)
        else:
            question = [rng.choice(vocab) for _ in range(rng.randint(5, 12))]
            answer = [rng.choice(vocab) for _ in range(rng.randint(20, 80))]
            recent.append((question, answer))
            if len(recent) > 5000:
                recent.pop(rng.randrange(len(recent)))
        yield (
            index,
            {
                "messages": [
                    {"role": "user", "content": " ".join(question)},
                    {"role": "assistant", "content": " ".join(answer)},
                ]
            },
        )


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, n: int, fraction: float, seed: int, truth_threshold: float, **options: object) -> dict:
    truth: set[int] = set()
    similar: set[int] = set()
    gc.collect()
    started = time.perf_counter()
    result = deduplicate(records(n, fraction, seed, truth, similar, truth_threshold), **options)
    seconds = time.perf_counter() - started
    removed = set(range(n)) - set(result.keep)
    true_positives = len(removed & truth)
    return {
        "method": name,
        "records": n,
        "known_duplicates": len(truth),
        "removed": len(removed),
        "exact": result.report.exact_duplicates,
        "near": result.report.near_duplicates,
        "precision": true_positives / len(removed) if removed else 1.0,
        "recall": true_positives / len(truth) if truth else 1.0,
        "known_at_threshold": len(similar),
        "recall_at_threshold": len(removed & similar) / len(similar) if similar else 1.0,
        "seconds": round(seconds, 1),
        "records_per_second": round(n / seconds),
        "peak_rss_mib": round(peak_rss_mib()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--duplicates", type=float, default=0.10, help="fraction of near-duplicates")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    common = (args.records, args.duplicates, args.seed, args.threshold)
    rows = [
        measure("baseline: exact hash only", *common, near=False),
        measure(
            f"adaptery: exact + MinHash LSH (threshold {args.threshold}, {args.num_perm} perms)",
            *common,
            threshold=args.threshold,
            num_perm=args.num_perm,
        ),
    ]
    print(json.dumps(rows, indent=2))
    columns = [
        "method",
        "records",
        "known_duplicates",
        "known_at_threshold",
        "removed",
        "precision",
        "recall",
        "recall_at_threshold",
        "records_per_second",
        "seconds",
        "peak_rss_mib",
    ]
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    print("\n(peak RSS is the process high-water mark: the second row includes the first's.)")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
