"""Benchmark: duplicate removal on synthetic chat records whose duplicates are known.

    .venv/bin/python bench/dedup.py --records 1000000 --json-out dedup.json

Generates `--records` chat records from a seeded generator (optional system prompt from a small
pool, a question, a 20–80-word answer; Zipf-distributed words) into a temporary JSONL file. Of them,
`--near-fraction` (10%) are near-duplicates of an earlier record: 1–3 words substituted, inserted
or deleted, so the true Jaccard similarity of their shingle sets is around or above the threshold
(computed exactly and recorded); `--exact-fraction` (2%) are copies differing only in case,
punctuation and spacing. Each method then streams the file (JSON parsing included) in a fresh
process, so its peak RSS is its own:

- read + parse only: the floor any method pays;
- baseline: exact-hash dedup only (what `sort -u` on normalised text finds);
- adaptery: `adaptery.data.dedup.deduplicate` (exact + MinHash LSH);
- stock datasketch (at `--stock-records`): the library's documented recipe, `MinHash` per record
  (SHA-1 shingle hashes) and a `MinHashLSH` index at the same threshold, confirmed with
  `MinHash.jaccard`.

Precision and recall count a near-duplicate as positive only when its true Jaccard similarity
with its source reaches the threshold (an edit in a short answer can push it below: by definition
that copy is not a near-duplicate, and removing it is a false positive).

A second, smaller run (`--truth-records`, 20k) takes its truth from brute force instead: exact
Jaccard similarity of every pair (sparse product of the shingle incidence matrix), then the same
greedy rule as the dedup (a record is a duplicate when it reaches the threshold with an earlier kept
record). That measures the LSH's misses and false hits without trusting the generator's labels.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from datasketch import LeanMinHash, MinHash, MinHashLSH
from scipy import sparse  # installed with datasketch, which needs it

from adaptery.data.dedup import SHINGLE_WORDS, deduplicate, text_digest, tokens

COMMON_WORDS = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "not word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two has "
    "look more day could go come did number sound no most people my over know water than call first who may "
    "down side been now find any new work part take get place made live where after back little only round man "
    "year came show every good me give our under name very through just form sentence great think say help low "
    "line differ turn cause much mean before move right boy old too same tell does set three want air well also "
    "play small end put home read hand port large spell add even land here must big high such follow act why "
    "ask men change went light kind off need house picture try us again animal point mother world near build "
    "self earth father model data train loss batch layer token adapter dataset learning rate epoch gradient"
)
SYLLABLES = "ka lo mi ne ru sa ti vo ze pa qu del mor fin gar tos ben cal dor eth fal gon hul iv jas kel"
SYSTEM_PROMPTS = 20


def vocabulary(rng: random.Random, size: int = 30_000) -> list[str]:
    words, syllables = dict.fromkeys(COMMON_WORDS.split()), SYLLABLES.split()
    while len(words) < size:
        words.setdefault("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return list(words)


class Generator:
    """Seeded chat records; record i's text depends only on (seed, i), so a source can be rebuilt."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        rng = random.Random(seed)
        self.vocab = vocabulary(rng)
        self.cumulative = list(accumulate(1 / rank**1.07 for rank in range(1, len(self.vocab) + 1)))
        self.system_prompts = [prose(rng, self.words(rng, rng.randint(10, 25))) for _ in range(SYSTEM_PROMPTS)]

    def words(self, rng: random.Random, n: int) -> list[str]:
        return rng.choices(self.vocab, cum_weights=self.cumulative, k=n)

    def original(self, index: int) -> tuple[str | None, str, list[str]]:
        """(system prompt or None, question, answer words)."""
        rng = random.Random(self.seed * 1_000_003 + index)
        system = rng.choice(self.system_prompts) if rng.random() < 0.3 else None
        question = " ".join(self.words(rng, rng.randint(5, 15))).capitalize() + "?"
        return system, question, self.words(rng, rng.randint(20, 80))

    def render(self, rng: random.Random, system: str | None, question: str, answer: list[str]) -> dict:
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": prose(rng, answer)}]
        return {"messages": messages}

    def edit(self, rng: random.Random, answer: list[str]) -> list[str]:
        answer = list(answer)
        for _ in range(rng.choices((1, 2, 3), weights=(5, 3, 2))[0]):
            at, action = rng.randrange(len(answer)), rng.random()
            if action < 0.5:
                answer[at] = self.words(rng, 1)[0]
            elif action < 0.8:
                answer.insert(at, self.words(rng, 1)[0])
            else:
                del answer[at]
        return answer


def prose(rng: random.Random, words: list[str]) -> str:
    """Sentences of 5–14 words with the odd comma (punctuation and case vary between renderings)."""
    sentences = []
    while words:
        take = rng.randint(5, 14)
        sentence, words = list(words[:take]), words[take:]
        if len(sentence) > 6 and rng.random() < 0.3:
            sentence[rng.randrange(2, len(sentence) - 2)] += ","
        sentences.append(" ".join(sentence).capitalize() + ".")
    return " ".join(sentences)


def messy_copy(rng: random.Random, record: dict) -> dict:
    """The same words with different case, punctuation and spacing: an exact duplicate once normalised."""
    messages = []
    for message in record["messages"]:
        content = message["content"].replace(" ", rng.choice(["  ", " ", "\t"]), rng.randint(0, 3))
        content = content.upper() if rng.random() < 0.3 else content.lower()
        messages.append({**message, "content": content.rstrip(".?") + rng.choice(["!", "", " ...", "?!"])})
    return {"messages": messages}


def shingle_set(record: dict) -> set[tuple[bytes, ...]]:
    """The exact shingle set the dedup's MinHash estimates (word 3-grams of the normalised text)."""
    words = tokens(record)
    if len(words) < SHINGLE_WORDS:
        return {tuple(words)}
    return {tuple(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


ORIGINAL, NEAR, EXACT = 0, 1, 2


def generate(n: int, seed: int, near_fraction: float, exact_fraction: float) -> Iterator[tuple[dict, int, int, float]]:
    """(record, kind, source index or -1, true Jaccard with the source) for each index."""
    gen = Generator(seed)
    originals: list[int] = []
    for index in range(n):
        rng = random.Random(seed * 7_000_009 + index)
        roll = rng.random()
        if originals and roll < near_fraction + exact_fraction:
            source = originals[rng.randrange(len(originals))]
            system, question, answer = gen.original(source)
            before = gen.render(rng, system, question, answer)
            if roll < near_fraction:
                record = gen.render(rng, system, question, gen.edit(rng, answer))
                similarity = jaccard(shingle_set(before), shingle_set(record))
                kind = EXACT if tokens(before) == tokens(record) else NEAR  # an edit can undo itself
                yield record, kind, source, similarity
            else:
                yield messy_copy(rng, before), EXACT, source, 1.0
        else:
            originals.append(index)
            yield gen.render(rng, *gen.original(index)), ORIGINAL, -1, 0.0


def write_dataset(path: Path, n: int, args: argparse.Namespace) -> dict[str, np.ndarray]:
    kinds = np.zeros(n, dtype=np.uint8)
    similarity = np.zeros(n, dtype=np.float32)
    with path.open("w") as out:
        for index, (record, kind, _, sim) in enumerate(generate(n, args.seed, args.near_fraction, args.exact_fraction)):
            out.write(json.dumps(record) + "\n")
            kinds[index], similarity[index] = kind, sim
    return {"kind": kinds, "similarity": similarity}


def read_records(path: Path, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    with path.open() as lines:
        for index, line in enumerate(lines):
            if limit is not None and index >= limit:
                return
            yield index, json.loads(line)


# --- the methods, each run in a fresh process -------------------------------------------------


def run_parse_only(records: Iterator[tuple[int, dict]], threshold: float, num_perm: int) -> list[int]:
    return [index for index, _ in records]


def run_exact_only(records: Iterator[tuple[int, dict]], threshold: float, num_perm: int) -> list[int]:
    return deduplicate(records, near=False).keep


def run_adaptery(records: Iterator[tuple[int, dict]], threshold: float, num_perm: int) -> list[int]:
    return deduplicate(records, threshold=threshold, num_perm=num_perm).keep


def run_stock_datasketch(records: Iterator[tuple[int, dict]], threshold: float, num_perm: int) -> list[int]:
    """datasketch's documented recipe: a MinHash per record, MinHashLSH query, then insert if new."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept_hashes: dict[int, LeanMinHash] = {}
    seen: set[int] = set()
    keep = []
    for index, record in records:
        words = tokens(record)
        digest = text_digest(words)
        if digest in seen:
            continue
        shingles = [b" ".join(s) for s in shingle_set(record)]
        minhash = MinHash(num_perm=num_perm, seed=1)
        minhash.update_batch(shingles)
        if any(minhash.jaccard(kept_hashes[key]) >= threshold for key in lsh.query(minhash)):
            continue
        seen.add(digest)
        kept_hashes[index] = LeanMinHash(minhash)
        lsh.insert(index, kept_hashes[index], check_duplication=False)
        keep.append(index)
    return keep


METHODS: dict[str, Callable[..., list[int]]] = {
    "read + parse only": run_parse_only,
    "baseline: exact hash only": run_exact_only,
    "adaptery: exact + MinHash LSH": run_adaptery,
    "stock datasketch MinHash + MinHashLSH": run_stock_datasketch,
}


def _child(method: str, path: str, limit: int | None, threshold: float, num_perm: int, queue: Any) -> None:
    gc.collect()
    started_rss = psutil.Process().memory_info().rss
    started = time.perf_counter()
    keep = METHODS[method](read_records(Path(path), limit), threshold, num_perm)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((np.array(keep, dtype=np.int64), seconds, peak, started_rss))


def measure(method: str, path: Path, n: int, args: argparse.Namespace) -> tuple[dict[str, Any], np.ndarray]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(method, str(path), n, args.threshold, args.num_perm, queue))
    process.start()
    keep, seconds, peak, started_rss = queue.get()
    process.join()
    row = {
        "method": method,
        "records": n,
        "kept": len(keep),
        "seconds": round(seconds, 2),
        "records_per_second": round(n / seconds),
        "peak_rss_mib": round(peak / 2**20),
        "rss_at_start_mib": round(started_rss / 2**20),
    }
    print(f"  {method}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return row, keep


def score(row: dict[str, Any], keep: np.ndarray, truth: dict[str, np.ndarray], threshold: float) -> None:
    """Precision and recall of the removed records against the generated labels."""
    n = row["records"]
    removed = np.ones(n, dtype=bool)
    removed[keep] = False
    kind, similarity = truth["kind"][:n], truth["similarity"][:n]
    exact = kind == EXACT
    near = (kind == NEAR) & (similarity >= threshold)
    positive = exact | near
    row["removed"] = int(removed.sum())
    row["precision"] = round(float((removed & positive).sum() / max(removed.sum(), 1)), 4)
    row["recall"] = round(float((removed & positive).sum() / max(positive.sum(), 1)), 4)
    row["recall_near"] = round(float((removed & near).sum() / max(near.sum(), 1)), 4)
    row["recall_exact"] = round(float((removed & exact).sum() / max(exact.sum(), 1)), 4)


def brute_force_truth(path: Path, n: int, threshold: float) -> np.ndarray:
    """Which records the greedy rule removes when similarities are exact (all pairs compared)."""
    columns: dict[tuple[bytes, ...], int] = {}
    indptr, indices = [0], []
    for _, record in read_records(path, n):
        indices.extend(columns.setdefault(s, len(columns)) for s in shingle_set(record))
        indptr.append(len(indices))
    incidence = sparse.csr_matrix((np.ones(len(indices), dtype=np.int32), indices, indptr), shape=(n, len(columns)))
    sizes = np.diff(indptr)
    shared = sparse.triu(incidence @ incidence.T, k=1).tocoo()  # row < col: every pair sharing a shingle
    similarity = shared.data / (sizes[shared.row] + sizes[shared.col] - shared.data)
    close = similarity >= threshold - 1e-12
    earlier: dict[int, list[int]] = {}
    for first, later in zip(shared.row[close].tolist(), shared.col[close].tolist(), strict=True):
        earlier.setdefault(later, []).append(first)
    removed = np.zeros(n, dtype=bool)
    for index in range(n):
        removed[index] = any(not removed[j] for j in earlier.get(index, ()))
    return removed


def score_against(row: dict[str, Any], keep: np.ndarray, truth_removed: np.ndarray) -> None:
    removed = np.ones(len(truth_removed), dtype=bool)
    removed[keep] = False
    hits = int((removed & truth_removed).sum())
    row["removed"] = int(removed.sum())
    row["truth_removed"] = int(truth_removed.sum())
    row["precision"] = round(hits / max(int(removed.sum()), 1), 4)
    row["recall"] = round(hits / max(int(truth_removed.sum()), 1), 4)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--near-fraction", type=float, default=0.10)
    parser.add_argument("--exact-fraction", type=float, default=0.02)
    parser.add_argument("--stock-records", type=int, default=200_000, help="size for the stock datasketch run")
    parser.add_argument("--truth-records", type=int, default=20_000, help="size for the brute-force comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="adaptery-bench-") as tmp:
        path = Path(tmp) / "records.jsonl"
        started = time.perf_counter()
        truth = write_dataset(path, args.records, args)
        generated = time.perf_counter() - started
        print(f"generated {args.records} records in {generated:.0f} s", file=sys.stderr, flush=True)
        near = (truth["kind"] == NEAR) & (truth["similarity"] >= args.threshold)
        dataset = {
            "records": args.records,
            "exact_copies": int((truth["kind"] == EXACT).sum()),
            "near_copies": int((truth["kind"] == NEAR).sum()),
            "near_copies_at_threshold": int(near.sum()),
            "near_copy_similarity_quartiles": np.percentile(truth["similarity"][truth["kind"] == NEAR], [25, 50, 75])
            .round(3)
            .tolist(),
            "generation_seconds": round(generated, 1),
        }

        main_rows = []
        for method, n in [
            ("read + parse only", args.records),
            ("baseline: exact hash only", args.records),
            ("adaptery: exact + MinHash LSH", args.records),
            ("stock datasketch MinHash + MinHashLSH", min(args.stock_records, args.records)),
        ]:
            row, keep = measure(method, path, n, args)
            if method != "read + parse only":
                score(row, keep, truth, args.threshold)
            main_rows.append(row)

        truth_n = min(args.truth_records, args.records)
        started = time.perf_counter()
        truth_removed = brute_force_truth(path, truth_n, args.threshold)
        brute_seconds = time.perf_counter() - started
        truth_rows = []
        for method in list(METHODS)[1:]:
            row, keep = measure(method, path, truth_n, args)
            score_against(row, keep, truth_removed)
            truth_rows.append(row)

    result = {
        "threshold": args.threshold,
        "num_perm": args.num_perm,
        "dataset": dataset,
        "generated_labels": main_rows,
        "brute_force": {"records": truth_n, "seconds": round(brute_seconds, 1), "rows": truth_rows},
        "machine": {"cpus": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30)},
    }
    print(json.dumps(result, indent=2))
    print(f"\n### Against generated labels ({json.dumps(dataset)})\n")
    print(
        table(
            main_rows,
            [
                "method",
                "records",
                "records_per_second",
                "seconds",
                "peak_rss_mib",
                "rss_at_start_mib",
                "removed",
                "precision",
                "recall",
                "recall_near",
                "recall_exact",
            ],
        )
    )
    print(f"\n### Against brute-force exact Jaccard ({truth_n} records, all pairs, {brute_seconds:.1f} s)\n")
    print(table(truth_rows, ["method", "records", "removed", "truth_removed", "precision", "recall", "seconds"]))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
