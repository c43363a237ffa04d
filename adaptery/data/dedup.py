"""Duplicate removal: exact (hash of the normalised text) and near (MinHash LSH over word 3-grams).

Streaming and order-preserving: records are taken in batches, and each record is compared with the
records kept before it (in earlier batches and earlier in its own batch), so the first of a group
of duplicates is the one kept. `deduplicated` yields the kept records as it goes (one batch behind
the input); `deduplicate` collects only their indices.

Near duplicates. A record's shingles are its overlapping word 3-grams (see `shingle_hashes` for why
words and not characters). Signatures are datasketch MinHash signatures ("affine32" scheme, the
library's permutations for `SEED`), computed for a whole batch at once: bit-identical to
`MinHash(num_perm, seed=SEED).update_batch(...)` on the same shingle hashes, and 6× faster than
`MinHash.bulk` over shingle strings (10 µs a record against 64, words hashed included).
Signatures are cut into `bands` bands of `rows` rows; a kept record sharing a band with the new one
is a candidate, and a candidate whose estimated Jaccard similarity (the fraction of equal signature
values, as `LeanMinHash.jaccard`) reaches the threshold makes the new record its duplicate.

Memory, per kept record: its signature (4 × num_perm bytes), 12 bytes per band and 12 for its text
digest in sorted numpy runs (`SortedRuns`), 8 for its index: 724 bytes at the defaults. datasketch's
`MinHashLSH` holds a Python set and a bytes key per band and record, about 5 KB a record at these
bands (measured): bench/dedup.py peaks at 870 MiB for a million records this way, and the stock
datasketch recipe at 887 MiB for 200 thousand.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
from datasketch import MinHash

from adaptery.data.chat import PREFERENCE_PARTS, is_preference

SEED = 1
SHINGLE_WORDS = 3
BATCH_RECORDS = 1024
BATCH_WORDS = 1 << 20  # a batch also ends at this many words, so a few huge records cannot fill memory
MAX_LISTED_CLUSTERS = 1000
MAX_LISTED_REMOVED = 100
CANDIDATE_RECALL = 0.9  # chance that a pair exactly at the threshold shares a band (see `lsh_bands`)

# Scripts written without spaces between words: each character is a token of its own there.
_UNSPACED = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_UNSPACED}]|[^\W{_UNSPACED}]+")
_ASCII_SYMBOLS = bytes(c for c in range(128) if not (chr(c).isalnum() or chr(c) == "_" or chr(c).isspace()))
_ASCII_SYMBOLS_TO_SPACE = bytes.maketrans(_ASCII_SYMBOLS, b" " * len(_ASCII_SYMBOLS))
_MAX_HASH = np.uint32(0xFFFFFFFF)


def tokens(record: dict[str, Any]) -> list[bytes]:
    """Role-tagged words of the record: NFKC, casefolded, split on anything but letters, digits and `_`."""
    if is_preference(record):  # the prompt and both outputs: two pairs differ if either output does
        messages = [*record["input"]["messages"], *(m for part in PREFERENCE_PARTS for m in record[part])]
    else:
        messages = record.get("messages", ())
    text = "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)
    if text.isascii():  # the common case, about 3× faster than the regular expression
        return text.encode().lower().translate(_ASCII_SYMBOLS_TO_SPACE).split()
    text = unicodedata.normalize("NFKC", text).casefold()
    return [token.encode() for token in _TOKEN.findall(text)]


def normalise_for_dedup(record: dict[str, Any]) -> str:
    """The text exact deduplication compares: `tokens` joined by single spaces."""
    return b" ".join(tokens(record)).decode()


def text_digest(words: list[bytes]) -> int:
    """8-byte hash of the normalised text, as an unsigned integer."""
    return int.from_bytes(hashlib.blake2b(b" ".join(words), digest_size=8).digest(), "little")


def check_parameters(threshold: float, num_perm: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a Jaccard similarity in (0, 1], got {threshold!r}")
    if isinstance(num_perm, bool) or not isinstance(num_perm, int) or not 16 <= num_perm <= 1024:
        raise ValueError(f"num_perm must be an integer from 16 to 1024, got {num_perm!r}")


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest candidates, least memory) for which a pair at
    exactly `threshold` still shares a band with probability ≥ CANDIDATE_RECALL. Recall comes first
    because every candidate is confirmed by its estimated similarity; a spare candidate costs one
    vector comparison. At 0.8 and 128 permutations: 16 bands of 8 rows (0.95 at 0.8, 0.99 at 0.85)."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= CANDIDATE_RECALL:
            return bands, rows
    return num_perm, 1


@dataclass
class DedupReport:
    threshold: float
    num_perm: int
    near: bool
    bands: int = 0
    rows: int = 0
    records_in: int = 0
    records_out: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    clusters: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    unlisted: set[tuple[int, str]] = field(default_factory=set)  # clusters beyond the listed ones

    @property
    def clusters_total(self) -> int:
        return len(self.clusters) + len(self.unlisted)

    def add(self, kept: int, removed: int, kind: str, similarity: float) -> None:
        if kind == "exact":
            self.exact_duplicates += 1
        else:
            self.near_duplicates += 1
        key = (kept, kind)
        cluster = self.clusters.get(key)
        if cluster is None:
            if len(self.clusters) >= MAX_LISTED_CLUSTERS:
                self.unlisted.add(key)
                return
            cluster = {"kept": kept, "removed": [], "removed_total": 0, "kind": kind, "similarity": similarity}
            self.clusters[key] = cluster
        cluster["removed_total"] += 1
        if len(cluster["removed"]) < MAX_LISTED_REMOVED:
            cluster["removed"].append(removed)
        cluster["similarity"] = min(cluster["similarity"], similarity)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe. A cluster's `similarity` is the lowest estimated Jaccard similarity between its
        kept record and one it removed (1.0 for exact duplicates)."""
        return {
            "threshold": self.threshold,
            "num_perm": self.num_perm,
            "near": self.near,
            "lsh": {"bands": self.bands, "rows": self.rows} if self.near else None,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "duplicate_rate": (self.records_in - self.records_out) / self.records_in if self.records_in else 0.0,
            "clusters": list(self.clusters.values()),
            "clusters_total": self.clusters_total,
            "clusters_truncated": self.clusters_total > len(self.clusters),
        }


@dataclass
class DedupResult:
    keep: list[int]
    report: DedupReport


class MinHasher:
    """MinHash signatures of a batch of records in a few numpy operations."""

    # Random odd multipliers mixing a 3-gram's word hashes into one 32-bit shingle hash.
    _MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9], dtype=np.uint64)
    _CHUNK_VALUES = 1 << 22  # permuted values computed at once (16 MiB)

    def __init__(self, num_perm: int) -> None:
        self.num_perm = num_perm
        a, b = MinHash(num_perm=num_perm, seed=SEED).permutations  # datasketch's affine32 permutations
        self.a, self.b = a[:, None], b[:, None]
        self.chunk = max(1, self._CHUNK_VALUES // num_perm)

    def shingle_hashes(self, words: list[list[bytes]]) -> tuple[np.ndarray, np.ndarray]:
        """One uint32 hash per word 3-gram of each record, and the record each belongs to.

        Word 3-grams rather than character n-grams: a one-word edit changes 3 of ~n shingles either
        way, but a record has ~5× fewer words than characters, so 5× less hashing. Scripts without
        spaces get a token per character (`tokens`), so 3-grams of characters there. A record of
        fewer than 3 words is one shingle (so it only matches itself)."""
        counts = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
        flat = np.fromiter(map(zlib.crc32, chain.from_iterable(words)), dtype=np.uint64, count=int(counts.sum()))
        flat = np.concatenate([flat, np.zeros(SHINGLE_WORDS - 1, dtype=np.uint64)])
        ends = np.cumsum(counts)
        per_record = np.maximum(counts - (SHINGLE_WORDS - 1), 1)
        owner = np.repeat(np.arange(len(words)), per_record)
        firsts = np.cumsum(per_record) - per_record
        start = (ends - counts)[owner] + np.arange(len(owner)) - firsts[owner]
        mixed = np.zeros(len(owner), dtype=np.uint64)
        for offset, multiplier in enumerate(self._MIX):
            word = np.where(start + offset < ends[owner], flat[start + offset], np.uint64(0))
            mixed += word * multiplier
        return (mixed >> np.uint64(32)).astype(np.uint32), owner

    def signatures(self, words: list[list[bytes]]) -> np.ndarray:
        """(records, num_perm) uint32: per permutation, the least permuted shingle hash."""
        hashes, owner = self.shingle_hashes(words)
        hashes = _fmix32(hashes)
        out = np.full((self.num_perm, len(words)), _MAX_HASH, dtype=np.uint32)
        buffer = np.empty((self.num_perm, min(self.chunk, len(hashes))), dtype=np.uint32)
        for lo in range(0, len(hashes), self.chunk):
            part, part_owner = hashes[lo : lo + self.chunk], owner[lo : lo + self.chunk]
            permuted = buffer[:, : len(part)]
            np.multiply(self.a, part, out=permuted)
            np.add(permuted, self.b, out=permuted)  # wraps modulo 2^32, as datasketch's affine32
            starts = np.flatnonzero(np.r_[True, part_owner[1:] != part_owner[:-1]])
            records = part_owner[starts]
            out[:, records] = np.minimum(out[:, records], np.minimum.reduceat(permuted, starts, axis=1))
        return np.ascontiguousarray(out.T)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finalizer, which datasketch's affine32 scheme applies to each input hash."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class SortedRuns:
    """A multimap from uint64 keys to uint32 values in sorted numpy runs: 12 bytes an entry, where a
    Python dict entry costs ~100. Each `add` appends a run and merges it with runs no bigger (a binary
    counter), so a lookup searches O(log n) runs and an entry is copied O(log n) times."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
        while self.runs and len(self.runs[-1][0]) <= len(keys):
            keys, values = _merge(*self.runs.pop(), keys, values)
        self.runs.append((keys, values))

    def lookup(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (position in `queries`, value) whose key equals that query."""
        found_at, found = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.uint32)]
        order = np.argsort(queries)  # sorted queries walk each run front to back: cache-friendly
        ordered = queries[order]
        for keys, values in self.runs:
            at = np.arange(len(ordered))
            position = np.searchsorted(keys, ordered)
            while len(at):  # once per entry of the fullest bucket hit (almost always once or twice)
                inside = position < len(keys)
                at, position = at[inside], position[inside]
                equal = keys[position] == ordered[at]
                at, position = at[equal], position[equal]
                found_at.append(order[at])
                found.append(values[position])
                position = position + 1
        return np.concatenate(found_at), np.concatenate(found)


def _merge(
    old_keys: np.ndarray, old_values: np.ndarray, new_keys: np.ndarray, new_values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted runs as one, the older run's entries first among equal keys (no full re-sort)."""
    size = len(old_keys) + len(new_keys)
    at = np.searchsorted(old_keys, new_keys, side="right") + np.arange(len(new_keys))
    from_old = np.ones(size, dtype=bool)
    from_old[at] = False
    keys, values = np.empty(size, dtype=old_keys.dtype), np.empty(size, dtype=old_values.dtype)
    keys[at], values[at] = new_keys, new_values
    keys[from_old], values[from_old] = old_keys, old_values
    return keys, values


class _KeptSignatures:
    """Signatures of kept records by slot, in fixed blocks (growing never copies what is stored)."""

    BLOCK = 1 << 16

    def __init__(self, num_perm: int) -> None:
        self.num_perm = num_perm
        self.blocks: list[np.ndarray] = []
        self.count = 0

    def extend(self, signatures: np.ndarray) -> np.ndarray:
        slots = np.arange(self.count, self.count + len(signatures), dtype=np.uint32)
        done = 0
        while done < len(signatures):
            at = self.count % self.BLOCK
            if at == 0:
                self.blocks.append(np.empty((self.BLOCK, self.num_perm), dtype=np.uint32))
            take = min(self.BLOCK - at, len(signatures) - done)
            self.blocks[-1][at : at + take] = signatures[done : done + take]
            done += take
            self.count += take
        return slots

    def take(self, slots: np.ndarray) -> np.ndarray:
        out = np.empty((len(slots), self.num_perm), dtype=np.uint32)
        block_of = slots // self.BLOCK
        for block in np.unique(block_of):
            rows = np.flatnonzero(block_of == block)
            out[rows] = self.blocks[block][slots[rows] % self.BLOCK]
        return out


class _Deduplicator:
    """The state of one streaming pass: what has been kept so far, indexed for lookups."""

    def __init__(self, report: DedupReport) -> None:
        self.report = report
        self.kept_indices = array("q")  # slot → record index
        self.digests = SortedRuns()  # text digest → slot, for kept records
        if report.near:
            self.report.bands, self.report.rows = lsh_bands(report.threshold, report.num_perm)
            self.hasher = MinHasher(report.num_perm)
            self.signatures = _KeptSignatures(report.num_perm)
            self.buckets = SortedRuns()  # band key → slot
            # Band rows are folded into one 64-bit key with random odd multipliers (fixed seed).
            multipliers = np.random.RandomState(SEED).randint(0, 2**63, size=(self.report.bands, self.report.rows))
            self.band_mix = multipliers.astype(np.uint64) * np.uint64(2) + np.uint64(1)
            self.needed = math.ceil(report.threshold * report.num_perm - 1e-9)  # equal values to reach it

    def batch(self, indices: list[int], words: list[list[bytes]]) -> list[bool]:
        """Decide, in order, which records of the batch are kept; report the others."""
        digests = np.fromiter((text_digest(w) for w in words), dtype=np.uint64, count=len(words))
        outcome: list[tuple[int, str, float] | None] = [None] * len(words)  # (kept index, kind, similarity)
        at, slots = self.digests.lookup(digests)
        for row, slot in zip(at.tolist(), slots.tolist(), strict=True):
            outcome[row] = (self.kept_indices[slot], "exact", 1.0)
        # Within the batch, a repeated text follows the first of its copies (its leader).
        _, first = np.unique(digests, return_index=True)
        leader_of = dict(zip(digests[first].tolist(), first.tolist(), strict=True))
        leaders = [row for row in range(len(words)) if outcome[row] is None and leader_of[int(digests[row])] == row]
        kept = self._near(indices, words, leaders, outcome) if self.report.near else leaders
        kept_set = set(kept)
        for row in range(len(words)):
            if outcome[row] is None and row not in kept_set:
                leader = leader_of[int(digests[row])]
                outcome[row] = (indices[leader], "exact", 1.0) if leader in kept_set else outcome[leader]
        kept_slots = np.arange(len(self.kept_indices), len(self.kept_indices) + len(kept), dtype=np.uint32)
        self.kept_indices.extend(indices[row] for row in kept)
        self.digests.add(digests[kept], kept_slots)
        for row, decided in enumerate(outcome):
            if decided is not None:
                self.report.add(decided[0], indices[row], decided[1], decided[2])
        return [row in kept_set for row in range(len(words))]

    def _near(
        self, indices: list[int], words: list[list[bytes]], rows: list[int], outcome: list[tuple | None]
    ) -> list[int]:
        """Near-duplicate pass over `rows` (in order): fills `outcome`, returns the rows kept."""
        if not rows:
            return []
        num_perm, bands = self.report.num_perm, self.report.bands
        signatures = self.hasher.signatures([words[row] for row in rows])
        grid = signatures[:, : bands * self.report.rows].reshape(len(rows), bands, self.report.rows)
        keys = (grid.astype(np.uint64) * self.band_mix).sum(axis=2, dtype=np.uint64)  # (rows, bands)
        best = self._best_earlier_matches(signatures, keys)
        # Only rows sharing a band key with another row of the batch can match a row kept earlier in
        # it: those go through a small dict in order; the others are decided by `best` alone.
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        shared = (counts[inverse.ravel()] > 1).reshape(keys.shape)
        sharing = shared.any(axis=1)
        colliding = dict(zip(np.flatnonzero(sharing).tolist(), keys[sharing].tolist(), strict=True))
        in_batch: dict[int, list[int]] = {}  # band key → positions (in `rows`) kept earlier in this batch
        kept: list[int] = []  # positions in `rows`
        for position in range(len(rows)):
            match = best.get(position)  # (equal values, kept index) from earlier batches
            row_keys = colliding.get(position, ())
            candidates = sorted({p for key in row_keys for p in in_batch.get(key, ())})
            if candidates:
                equal = np.count_nonzero(signatures[candidates] == signatures[position], axis=1)
                top = int(np.argmax(equal))  # first of the best: the earliest kept record wins ties
                if equal[top] >= self.needed and (match is None or equal[top] > match[0]):
                    match = (int(equal[top]), indices[rows[candidates[top]]])
            if match is not None:
                outcome[rows[position]] = (match[1], "near", round(match[0] / num_perm, 4))
                continue
            kept.append(position)
            for key in row_keys:
                in_batch.setdefault(key, []).append(position)
        slots = self.signatures.extend(signatures[kept])
        self.buckets.add(keys[kept].ravel(), np.repeat(slots, bands))
        return [rows[position] for position in kept]

    def _best_earlier_matches(self, signatures: np.ndarray, keys: np.ndarray) -> dict[int, tuple[int, int]]:
        """Per row, the kept record of an earlier batch that it matches best: (equal values, index)."""
        at, slots = self.buckets.lookup(keys.ravel())
        if not len(at):
            return {}
        pairs = np.unique((at // keys.shape[1]) << 32 | slots.astype(np.int64))  # one per (row, slot)
        rows, slots = pairs >> 32, (pairs & 0xFFFFFFFF).astype(np.uint32)
        equal = np.count_nonzero(signatures[rows] == self.signatures.take(slots), axis=1)
        good = equal >= self.needed
        rows, slots, equal = rows[good], slots[good], equal[good]
        order = np.lexsort((slots, -equal, rows))  # per row: most equal values, then earliest slot
        best: dict[int, tuple[int, int]] = {}
        for row, slot, count in zip(rows[order].tolist(), slots[order].tolist(), equal[order].tolist(), strict=True):
            if row not in best:
                best[row] = (count, self.kept_indices[slot])
        return best


def deduplicated(
    records: Iterable[tuple[int, dict[str, Any]]],
    *,
    threshold: float = 0.8,
    num_perm: int = 128,
    near: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[Iterator[tuple[int, dict[str, Any]]], DedupReport]:
    """The kept `(index, record)` pairs as a stream, in input order, and the report, which is complete
    once the stream is consumed. Holds one batch of records at a time."""
    check_parameters(threshold, num_perm)
    report = DedupReport(threshold=threshold, num_perm=num_perm, near=near)
    state = _Deduplicator(report)

    def flush(batch: list[tuple[int, dict[str, Any]]], words: list[list[bytes]]) -> Iterator[tuple[int, dict]]:
        decisions = state.batch([index for index, _ in batch], words)
        report.records_out += sum(decisions)
        yield from (item for item, keep in zip(batch, decisions, strict=True) if keep)
        if progress is not None:
            progress(report.records_in)

    def stream() -> Iterator[tuple[int, dict[str, Any]]]:
        batch: list[tuple[int, dict[str, Any]]] = []
        words: list[list[bytes]] = []
        batch_words = 0
        for index, record in records:
            report.records_in += 1
            batch.append((index, record))
            words.append(tokens(record))
            batch_words += len(words[-1])
            if len(batch) == BATCH_RECORDS or batch_words >= BATCH_WORDS:
                yield from flush(batch, words)
                batch, words, batch_words = [], [], 0
        if batch:
            yield from flush(batch, words)

    return stream(), report


def deduplicate(
    records: Iterable[tuple[int, dict[str, Any]]],
    *,
    threshold: float = 0.8,
    num_perm: int = 128,
    near: bool = True,
    progress: Callable[[int], None] | None = None,
) -> DedupResult:
    """The indices to keep (first of each duplicate group, in order) and a report of what went."""
    stream, report = deduplicated(records, threshold=threshold, num_perm=num_perm, near=near, progress=progress)
    return DedupResult(keep=[index for index, _ in stream], report=report)
