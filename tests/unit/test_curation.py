"""Curation operations on canonical chat records: dedup, PII scrubbing, statistics and splits."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash

from adaptery.data import dedup
from adaptery.data.dedup import MinHasher, deduplicate, deduplicated, lsh_bands, normalise_for_dedup, tokens
from adaptery.data.pii import KINDS, scrub, scrub_record, scrub_text
from adaptery.data.split import split_indices
from adaptery.data.stats import compute_stats

# 40 words.
ANSWER = (
    "The Heron cluster has twelve nodes with two GPUs each and is booked through the shared scheduler every "
    "Monday morning by the lab manager who keeps the calendar current answers questions about quotas and "
    "moves long jobs to weekend queues"
)
OTHER_ANSWERS = [
    "Soup and bread are served in the canteen on the ground floor from noon until two on weekdays",
    "Use the room calendar on the intranet and add the meeting title and the number of guests",
    "Badges are printed at the front desk after security has checked your contract and a photo",
]


def chat(question: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def near_copy(answer: str, old: str, new: str) -> str:
    assert old in answer
    return answer.replace(old, new, 1)


# --- dedup --------------------------------------------------------------------------------------


def test_trivial_edits_normalise_to_the_same_text():
    plain = chat("Where is the lab?", "Building B, second floor.")
    edited = chat("  where IS the lab", "Building\tB — second floor!!")
    fullwidth = chat("Ｗｈｅｒｅ is the lab?", "Building B, second floor.")
    assert normalise_for_dedup(plain) == normalise_for_dedup(edited) == normalise_for_dedup(fullwidth)
    assert normalise_for_dedup(plain) == "user where is the lab assistant building b second floor"
    swapped_roles = {"messages": [{**m, "role": "user"} for m in plain["messages"]]}
    assert normalise_for_dedup(swapped_roles) != normalise_for_dedup(plain)


def test_exact_duplicates_keep_the_first_and_report_its_cluster():
    records = [
        chat("Where is the lab?", "Building B."),
        chat("Lunch?", OTHER_ANSWERS[0]),
        chat("where is the LAB", "building b"),
        chat("Where is the lab?!", "Building   B"),
    ]
    result = deduplicate(enumerate(records), near=False)
    assert result.keep == [0, 1]
    report = result.report.to_dict()
    assert (report["records_in"], report["records_out"], report["exact_duplicates"]) == (4, 2, 2)
    assert report["near_duplicates"] == 0 and report["lsh"] is None
    assert report["clusters"] == [
        {"kept": 0, "removed": [2, 3], "removed_total": 2, "kind": "exact", "similarity": 1.0}
    ]
    assert json.loads(json.dumps(report)) == report


def test_one_changed_word_in_a_40_word_answer_is_a_near_duplicate_and_unrelated_records_are_not():
    assert len(ANSWER.split()) == 40
    records = [
        chat("Tell me about the cluster", ANSWER),
        chat("What is for lunch?", OTHER_ANSWERS[0]),
        chat("Tell me about the cluster", near_copy(ANSWER, "twelve", "fourteen")),
        chat("How do I book a room?", OTHER_ANSWERS[1]),
        chat("Tell me about the cluster", near_copy(ANSWER, "quotas", "quotas and storage")),
        chat("Where do I get a badge?", OTHER_ANSWERS[2]),
    ]
    result = deduplicate(enumerate(records), threshold=0.8)
    assert result.keep == [0, 1, 3, 5]
    report = result.report.to_dict()
    assert (report["records_in"], report["records_out"]) == (6, 4)
    assert (report["exact_duplicates"], report["near_duplicates"]) == (0, 2)
    (cluster,) = report["clusters"]
    assert (cluster["kept"], cluster["removed"], cluster["kind"]) == (0, [2, 4], "near")
    assert 0.8 <= cluster["similarity"] < 1.0
    assert report["clusters_total"] == 1 and not report["clusters_truncated"]


def test_each_near_duplicate_joins_the_kept_record_it_resembles_most():
    second = (
        "Printers on every floor take jobs from the print queue and hold them until you tap your badge at the machine"
    )
    records = [
        chat("Cluster?", ANSWER),
        chat("Printing?", second),
        chat("Printing?", near_copy(second, "every", "each")),
        chat("Cluster?", near_copy(ANSWER, "Monday", "Tuesday")),
        chat("Cluster?", near_copy(ANSWER, "Monday", "Tuesday")),  # exact copy of a removed record
    ]
    report = deduplicate(enumerate(records)).report.to_dict()
    assert [(c["kept"], c["removed"], c["kind"]) for c in report["clusters"]] == [(1, [2], "near"), (0, [3, 4], "near")]


def test_a_higher_threshold_keeps_more():
    records = [chat("q", ANSWER), chat("q", near_copy(ANSWER, "twelve nodes with two", "ten nodes with four"))]
    assert deduplicate(enumerate(records), threshold=0.6).keep == [0]
    assert deduplicate(enumerate(records), threshold=0.95).keep == [0, 1]


def test_unrelated_records_sharing_a_system_prompt_are_all_kept():
    system = "You are a helpful assistant for the lab. Answer briefly and politely, and say when you do not know."
    records = [chat(f"Question {i}", answer, system) for i, answer in enumerate([ANSWER, *OTHER_ANSWERS])]
    assert deduplicate(enumerate(records)).keep == [0, 1, 2, 3]


def test_text_in_unspaced_scripts_is_compared_by_characters():
    text = "我们的实验室在二号楼的三层，每周一上午由实验室经理统一安排集群的使用时间，有问题请直接联系他。"
    edited = text.replace("三层", "四层")
    assert len(tokens(chat("问", text))) > 40
    assert deduplicate(enumerate([chat("问", text), chat("问", edited)])).keep == [0]


def test_batches_change_nothing_and_the_stream_yields_kept_records_in_order(monkeypatch):
    records = [
        chat(f"Q{i % 5}", near_copy(ANSWER, "twelve", f"n{i % 5}") if i % 2 else OTHER_ANSWERS[i % 3])
        for i in range(23)
    ]
    whole = deduplicate(enumerate(records))
    assert 0 < len(whole.keep) < len(records)
    monkeypatch.setattr(dedup, "BATCH_RECORDS", 4)  # duplicates within batches and across them
    seen: list[int] = []
    stream, report = deduplicated(enumerate(records), progress=seen.append)
    kept = list(stream)
    assert [i for i, _ in kept] == whole.keep
    assert all(record is records[i] for i, record in kept)
    assert report.to_dict() == whole.report.to_dict()
    assert seen == [4, 8, 12, 16, 20, 23]


def test_the_report_lists_at_most_the_configured_number_of_clusters(monkeypatch):
    monkeypatch.setattr(dedup, "MAX_LISTED_CLUSTERS", 2)
    monkeypatch.setattr(dedup, "MAX_LISTED_REMOVED", 3)
    records = [chat(f"Q{i}", f"answer number {i}") for i in range(4) for _ in range(5)]
    report = deduplicate(enumerate(records), near=False).report.to_dict()
    assert report["clusters_total"] == 4 and report["clusters_truncated"]
    assert [(c["kept"], c["removed"], c["removed_total"]) for c in report["clusters"]] == [
        (0, [1, 2, 3], 4),
        (5, [6, 7, 8], 4),
    ]
    assert report["exact_duplicates"] == 16


@pytest.mark.parametrize(
    ("threshold", "num_perm", "message"),
    [
        (0, 128, "threshold"),
        (-0.1, 128, "threshold"),
        (1.5, 128, "threshold"),
        ("0.8", 128, "threshold"),
        (0.8, 8, "num_perm"),
        (0.8, 2048, "num_perm"),
        (0.8, 64.5, "num_perm"),
    ],
)
def test_dedup_parameters_are_checked_before_any_work(threshold, num_perm, message):
    with pytest.raises(ValueError, match=message):
        deduplicated(iter([]), threshold=threshold, num_perm=num_perm)


def test_extreme_but_valid_parameters_work():
    records = [chat("q", ANSWER), chat("q", OTHER_ANSWERS[0]), chat("q", near_copy(ANSWER, "twelve", "ten"))]
    assert deduplicate(enumerate(records), threshold=1.0, num_perm=16).report.to_dict()["lsh"] == {
        "bands": 1,
        "rows": 16,
    }
    assert deduplicate(enumerate(records[:2]), threshold=1.0, num_perm=16).keep == [0, 1]
    assert deduplicate(enumerate(records), threshold=0.5, num_perm=1024).keep == [0, 1]


def test_lsh_bands_catch_pairs_at_the_threshold():
    assert lsh_bands(0.8, 128) == (16, 8)
    for threshold in (0.5, 0.7, 0.8, 0.9, 1.0):
        bands, rows = lsh_bands(threshold, 128)
        assert bands * rows <= 128 and 1 - (1 - threshold**rows) ** bands >= dedup.CANDIDATE_RECALL


def test_signatures_are_datasketch_minhashes():
    records = [chat("Cluster?", ANSWER), chat("Lunch?", OTHER_ANSWERS[0]), chat("a", "b")]
    words = [tokens(r) for r in records]
    hasher = MinHasher(64)
    signatures = hasher.signatures(words)
    hashes, owner = hasher.shingle_hashes(words)
    for row in range(len(records)):
        reference = MinHash(num_perm=64, seed=dedup.SEED, hashfunc=int)
        reference.update_batch(hashes[owner == row])
        assert np.array_equal(signatures[row], reference.hashvalues)
    edited = hasher.signatures([tokens(chat("Cluster?", near_copy(ANSWER, "twelve", "ten")))])[0]
    lean = [LeanMinHash(seed=dedup.SEED, hashvalues=v, scheme="affine32") for v in (signatures[0], edited)]
    assert lean[0].jaccard(lean[1]) == np.mean(signatures[0] == edited) > 0.8


# --- PII ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("Mail ada.lovelace+lab@example.co.uk today", "Mail [EMAIL] today", "email"),
        ("Call +44 20 7946 0958 now", "Call [PHONE] now", "phone"),
        ("Call +1 (415) 555-0132.", "Call [PHONE].", "phone"),
        ("Tel +4915112345678", "Tel [PHONE]", "phone"),
        ("Call (415) 555-0132 now", "Call [PHONE] now", "phone"),
        ("Call 415.555.0132 now", "Call [PHONE] now", "phone"),
        ("Call 020 7946 0958 now", "Call [PHONE] now", "phone"),
        ("Mobile 07700 900123", "Mobile [PHONE]", "phone"),
        ("Host 192.168.1.20 is up.", "Host [IP_ADDRESS] is up.", "ip_address"),
        ("Host fe80::1ff:fe23:4567:890a is up", "Host [IP_ADDRESS] is up", "ip_address"),
        ("Ping ::1 now", "Ping [IP_ADDRESS] now", "ip_address"),
        ("Ping 2001:db8::8a2e:370:7334.", "Ping [IP_ADDRESS].", "ip_address"),
        ("Card 4111 1111 1111 1111 ok", "Card [CARD_NUMBER] ok", "card_number"),
        ("Card 5500-0000-0000-0004 ok", "Card [CARD_NUMBER] ok", "card_number"),
        ("Amex 3782 822463 10005 ok", "Amex [CARD_NUMBER] ok", "card_number"),
        ("pan=4111111111111111", "pan=[CARD_NUMBER]", "card_number"),
        ("SSN 123-45-6789 on file", "SSN [NATIONAL_ID] on file", "national_id"),
        ("NI number AB 12 34 56 C", "NI number [NATIONAL_ID]", "national_id"),
        ("NI AB123456C", "NI [NATIONAL_ID]", "national_id"),
        ("passport no. X1234567 expires", "passport no. [NATIONAL_ID] expires", "national_id"),
        ("Her ID number: 12345678Z", "Her ID number: [NATIONAL_ID]", "national_id"),
        ("db at postgres://bob:hunter2@db.internal:5432/x, ok", "db at [SECRET_URL], ok", "url_credentials"),
        ("see https://api.example.com/v1/items?api_key=abc123&page=2 now", "see [SECRET_URL] now", "url_credentials"),
        ("get https://x.example.com/f?X-Amz-Signature=abc&n=1.", "get [SECRET_URL].", "url_credentials"),
        ("cb https://app.example.com/cb#access_token=xyz", "cb [SECRET_URL]", "url_credentials"),
        ("key AKIAABCDEFGHIJKLMNOP leaked", "key [SECRET] leaked", "url_credentials"),
        ("use sk-proj-AbCdEf1234567890AbCdEf12 here", "use [SECRET] here", "url_credentials"),
        ("token ghp_" + "a1B2" * 9 + " expired", "token [SECRET] expired", "url_credentials"),
    ],
)
def test_each_kind_is_found_and_redacted(text, expected, kind):
    assert scrub_text(text) == (expected, Counter({kind: 1}))


@pytest.mark.parametrize(
    "text",
    [
        "We met on 2026-11-23, again on 23/11/2026 and 23.11.2026 at 10:30:00.",
        "Founded in 2019, the lab has 12 nodes and 1024 cores.",
        "Upgrade to version 3.2.1 or 10.4, or Python 3.11.7.",
        "Order 1234 5678 9012 3456 fails the Luhn check, and so does 4111 1111 1111 1112.",
        "Order number 12345678 shipped; invoice 2026-000123.",
        "Read https://example.org/docs?page=2&lang=en or https://example.com/?monkey=1 for more.",
        "Room 101, floor 3, extension 4567, pin 0000.",
        "Numbers like 000-12-3456 and 666-12-3456 are never issued.",
        "It costs $1,234,567.89 or 1 000 000 EUR.",
        "Timestamp 2026-11-23T10:25:33+01:00, pi is 3.14159265358979.",
        "std::vector and a::b are C++; the MAC is 00:1A:2B:3C:4D:5E.",
        "The passport number is required; your ID number is on the card.",
        "ISBN 978-3-16-148410-0 and score +12.5 points.",
        "Write to support at example dot com.",
        "task-management-system-design-notes",
    ],
)
def test_ordinary_text_is_left_alone(text):
    assert scrub_text(text) == (text, Counter())


def test_counts_per_kind_are_exact_and_a_card_is_not_taken_for_a_phone():
    text = (
        "Reach ada@example.org or bob@example.com, call +1 415 555 0132 or 020 7946 0958, "
        "card 4111 1111 1111 1111 and 5500 0000 0000 0004, server 10.0.0.1, SSN 123-45-6789, "
        "docs https://example.org/a?token=t0k3n"
    )
    redacted, counts = scrub_text(text)
    assert counts == Counter(email=2, phone=2, card_number=2, ip_address=1, national_id=1, url_credentials=1)
    assert redacted == (
        "Reach [EMAIL] or [EMAIL], call [PHONE] or [PHONE], card [CARD_NUMBER] and [CARD_NUMBER], "
        "server [IP_ADDRESS], SSN [NATIONAL_ID], docs [SECRET_URL]"
    )


def test_only_the_kinds_asked_for_are_redacted():
    text = "ada@example.org, +44 20 7946 0958, 4111 1111 1111 1111"
    assert scrub_text(text, ["phone"]) == ("ada@example.org, [PHONE], 4111 1111 1111 1111", Counter(phone=1))
    assert scrub_text(text, ["card_number", "email"])[0] == "[EMAIL], +44 20 7946 0958, [CARD_NUMBER]"


def test_an_unknown_kind_is_an_error_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"shoe_size.*valid kinds: email, phone, ip_address"):
        scrub_text("x", ["email", "shoe_size"])
    with pytest.raises(ValueError, match="shoe_size"):
        scrub([], ["shoe_size"])


def test_scrub_record_changes_only_contents():
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "I am ada@example.org", "weight": 0},
            {"role": "assistant", "content": "Noted, 10.0.0.1.", "weight": 1},
        ],
        "id": "r1",
    }
    cleaned, counts = scrub_record(record, KINDS)
    assert cleaned == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "I am [EMAIL]", "weight": 0},
            {"role": "assistant", "content": "Noted, [IP_ADDRESS].", "weight": 1},
        ],
        "id": "r1",
    }
    assert counts == Counter(email=1, ip_address=1)
    assert record["messages"][1]["content"] == "I am ada@example.org"  # the input is not modified


def test_scrub_streams_records_and_its_report_holds_no_pii():
    records = [
        chat("Contact?", "Write to ada@example.org or call (415) 555-0132 before 5 pm on 2026-11-23"),
        chat("Weather?", "Sunny"),
        chat("IPs", "10.0.0.1 and 10.0.0.2, card 4111 1111 1111 1111"),
    ] * 500
    seen: list[int] = []
    stream, report = scrub(records, ["email", "phone", "ip_address"], progress=seen.append)
    cleaned = list(stream)
    assert cleaned[0]["messages"][1]["content"] == "Write to [EMAIL] or call [PHONE] before 5 pm on 2026-11-23"
    assert cleaned[2]["messages"][1]["content"] == "[IP_ADDRESS] and [IP_ADDRESS], card 4111 1111 1111 1111"
    summary = report.to_dict()
    assert summary["records_total"] == 1500 and summary["records_changed"] == 1000
    assert summary["counts_by_kind"] == {"email": 500, "phone": 500, "ip_address": 1000}
    assert seen == [1000]
    assert summary["examples"]["email"][0] == "Write to [EMAIL] or call [PHONE] before # pm"
    text = json.dumps(summary)
    for secret in ("ada@", "555", "0132", "10.0.0", "4111"):
        assert secret not in text


# --- stats --------------------------------------------------------------------------------------


def test_stats_on_a_known_set():
    records = [
        chat("a", "bb"),
        chat("A!", "bb"),  # an exact duplicate of the first once normalised
        chat("ccc", "dddd", system="s"),
        chat("e", "f" * 10),
    ]
    lengths = []

    def count_tokens(record: dict) -> int:
        lengths.append(sum(len(m["content"]) for m in record["messages"]))
        return lengths[-1]

    stats = compute_stats(records, count_tokens=count_tokens)
    assert lengths == [3, 4, 8, 11]
    assert stats["records"] == 4
    assert stats["turns"] == {"total": 9, "mean": 2.25, "max": 3}
    assert stats["role_counts"] == {"system": 1, "user": 4, "assistant": 4, "tool": 0}
    assert stats["characters"] == {"total": 26, "mean": 6.5, "max": 11}
    assert stats["duplicate_rate"] == 0.25
    tokens_ = stats["tokens"]
    assert (tokens_["total"], tokens_["mean"], tokens_["min"], tokens_["max"]) == (26, 6.5, 3, 11)
    assert (tokens_["p50"], tokens_["p95"]) == (4, 11)
    assert tokens_["histogram"]["edges"][0] == 3 and tokens_["histogram"]["edges"][-1] == 12
    assert sum(tokens_["histogram"]["counts"]) == 4 and len(tokens_["histogram"]["counts"]) <= 20
    assert json.loads(json.dumps(stats)) == stats
    assert compute_stats(records, token_counts=iter([3, 4, 8, 11])) == stats


def test_token_histogram_has_about_twenty_log_spaced_bins():
    records = [chat("q", "a") for _ in range(1000)]
    lengths = iter(range(1, 1001))
    histogram = compute_stats(records, count_tokens=lambda _: next(lengths))["tokens"]["histogram"]
    edges, counts = histogram["edges"], histogram["counts"]
    assert 15 <= len(counts) <= 20 and edges[0] == 1 and edges[-1] == 1001 and sum(counts) == 1000
    widths = np.diff(edges)
    assert widths[-1] > 50 * widths[0]  # log-spaced: short lengths get fine bins
    assert counts == [int(np.sum((np.arange(1, 1001) >= lo) & (np.arange(1, 1001) < hi))) for lo, hi in pairwise(edges)]


def test_stats_of_nothing_are_zeros():
    assert compute_stats([], count_tokens=len) == {
        "records": 0,
        "turns": {"total": 0, "mean": 0.0, "max": 0},
        "role_counts": {"system": 0, "user": 0, "assistant": 0, "tool": 0},
        "characters": {"total": 0, "mean": 0.0, "max": 0},
        "duplicate_rate": 0.0,
        "tokens": {
            "total": 0,
            "mean": 0.0,
            "min": 0,
            "max": 0,
            "p50": 0,
            "p95": 0,
            "histogram": {"edges": [], "counts": []},
        },
    }


# --- split --------------------------------------------------------------------------------------


def test_split_is_seeded_complete_disjoint_and_proportional():
    train, validation = split_indices(1000, validation_fraction=0.1, seed=7)
    assert len(validation) == 100 and len(train) == 900
    assert sorted(train + validation) == list(range(1000)) and train == sorted(train)
    assert split_indices(1000, validation_fraction=0.1, seed=7) == (train, validation)
    assert split_indices(1000, validation_fraction=0.1, seed=8)[1] != validation
    # Pinned: the same on every Python and numpy version (only Random.random() draws are used).
    assert split_indices(10, validation_fraction=0.2, seed=0) == ([0, 1, 2, 4, 5, 6, 8, 9], [3, 7])


@pytest.mark.parametrize(
    ("n", "fraction", "sizes"), [(2, 0.1, (1, 1)), (3, 0.5, (2, 1)), (10, 0.01, (9, 1)), (7, 0.5, (4, 3))]
)
def test_both_parts_are_never_empty(n, fraction, sizes):
    train, validation = split_indices(n, validation_fraction=fraction, seed=0)
    assert (len(train), len(validation)) == sizes


@pytest.mark.parametrize(
    ("n", "fraction", "message"),
    [
        (1, 0.1, "at least 2 records"),
        (0, 0.1, "at least 2 records"),
        (10, 0, "validation_fraction"),
        (10, 0.7, "validation_fraction"),
    ],
)
def test_split_arguments_are_checked(n, fraction, message):
    with pytest.raises(ValueError, match=message):
        split_indices(n, validation_fraction=fraction, seed=0)
