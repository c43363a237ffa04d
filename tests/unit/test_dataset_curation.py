"""Dedup, PII scrubbing, statistics and splits on crafted data."""

from __future__ import annotations

import pytest

from adaptery.data.dedup import deduplicate, normalise_for_dedup
from adaptery.data.pii import KINDS, luhn_valid, scrub, scrub_text
from adaptery.data.split import split_indices
from adaptery.data.stats import compute_stats

ANSWER = (
    "The Heron cluster has twelve nodes with two GPUs each; it is booked through the scheduler every Monday "
    "morning by the lab manager, who keeps the shared calendar up to date and answers questions about quotas"
)


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_exact_duplicates_ignore_case_spacing_and_punctuation():
    a = chat("Where is the lab?", "Building B, second floor.")
    b = chat("where is the LAB", "Building  B second floor")
    assert normalise_for_dedup(a) == normalise_for_dedup(b)
    result = deduplicate(enumerate([a, b, chat("Other", "thing")]), near=False)
    assert result.keep == [0, 2]
    report = result.report.to_dict()
    assert report["exact_duplicates"] == 1 and report["clusters"] == [
        {"kept": 0, "removed": [1], "kind": "exact", "similarity": 1.0}
    ]


def test_a_one_word_edit_is_a_near_duplicate_and_unrelated_records_are_not():
    records = [
        chat("Tell me about the cluster", ANSWER),
        chat("What is for lunch?", "Soup and bread in the canteen on the ground floor, from noon until two."),
        chat("Tell me about the cluster", ANSWER.replace("twelve", "fourteen")),
        chat("Tell me about the cluster", ANSWER.replace("quotas", "quotas and storage")),
        chat("How do I book a room?", "Use the room calendar on the intranet and add the meeting title."),
    ]
    result = deduplicate(enumerate(records), threshold=0.8)
    assert result.keep == [0, 1, 4]
    report = result.report.to_dict()
    assert (report["records_in"], report["records_out"], report["near_duplicates"]) == (5, 3, 2)
    (cluster,) = report["clusters"]
    assert cluster["kept"] == 0 and cluster["removed"] == [2, 3] and cluster["kind"] == "near"
    assert 0.8 <= cluster["similarity"] < 1.0


def test_a_higher_threshold_keeps_more():
    records = [chat("q", ANSWER), chat("q", ANSWER.replace("twelve nodes with two", "ten nodes with four"))]
    assert len(deduplicate(enumerate(records), threshold=0.6).keep) == 1
    assert len(deduplicate(enumerate(records), threshold=0.95).keep) == 2


@pytest.mark.parametrize(("threshold", "num_perm"), [(0, 128), (1.5, 128), (0.8, 8), (0.8, 5000)])
def test_dedup_parameters_are_checked(threshold, num_perm):
    with pytest.raises(ValueError):
        deduplicate(iter([]), threshold=threshold, num_perm=num_perm)


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("Mail ada.lovelace+lab@example.co.uk today", "Mail [EMAIL] today", "email"),
        ("Call +44 20 7946 0958 now", "Call [PHONE] now", "phone"),
        ("Call (415) 555-0132 now", "Call [PHONE] now", "phone"),
        ("Call 415-555-0132 now", "Call [PHONE] now", "phone"),
        ("Call 020 7946 0958 now", "Call [PHONE] now", "phone"),
        ("Host 192.168.1.20 is up", "Host [IP_ADDRESS] is up", "ip_address"),
        ("Host fe80::1ff:fe23:4567:890a is up", "Host [IP_ADDRESS] is up", "ip_address"),
        ("Card 4111 1111 1111 1111 ok", "Card [CARD_NUMBER] ok", "card_number"),
        ("Card 5500-0000-0000-0004 ok", "Card [CARD_NUMBER] ok", "card_number"),
        ("SSN 123-45-6789 on file", "SSN [NATIONAL_ID] on file", "national_id"),
        ("NI number AB 12 34 56 C", "NI number [NATIONAL_ID]", "national_id"),
        ("passport no. X1234567 expires", "passport no. [NATIONAL_ID] expires", "national_id"),
        ("db at postgres://bob:hunter2@db.internal:5432/x, ok", "db at [SECRET_URL], ok", "url_credentials"),
        ("see https://api.example.com/v1/items?api_key=abc123&page=2 now", "see [SECRET_URL] now", "url_credentials"),
        ("key AKIAABCDEFGHIJKLMNOP leaked", "key [SECRET] leaked", "url_credentials"),
    ],
)
def test_each_kind_is_found_and_redacted(text, expected, kind):
    redacted, counts = scrub_text(text)
    assert redacted == expected
    assert counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "We met on 2026-11-23 and again on 23/11/2026.",
        "Founded in 2019, the lab has 12 nodes.",
        "Upgrade to version 3.2.1 or 10.4.",
        "Order 1234 5678 9012 3456 fails the Luhn check.",
        "Order number 12345678 shipped.",
        "Read https://example.org/docs?page=2&lang=en for more.",
        "The meeting is at 10:30:00 in room B214.",
        "Numbers like 000-12-3456 and 666-12-3456 are never issued.",
    ],
)
def test_ordinary_text_is_left_alone(text):
    assert scrub_text(text) == (text, {})


def test_luhn():
    assert luhn_valid("4111111111111111") and not luhn_valid("1234567890123456")


def test_scrub_streams_records_and_counts_per_kind_without_keeping_pii():
    records = [
        chat("Contact?", "ada@example.org or +1 415 555 0132"),
        chat("Weather?", "Sunny"),
        chat("IPs", "10.0.0.1 and 10.0.0.2"),
    ]
    stream, report = scrub(records, ["email", "ip_address"])
    cleaned = list(stream)
    assert cleaned[0]["messages"][1]["content"] == "[EMAIL] or +1 415 555 0132"  # phone not asked for
    assert report.to_dict() == {
        "kinds": ["email", "ip_address"],
        "records_total": 3,
        "records_changed": 2,
        "counts_by_kind": {"email": 1, "ip_address": 2},
    }
    with pytest.raises(ValueError, match="unknown PII kind"):
        scrub(records, ["shoe_size"])
    assert set(KINDS) == {"email", "phone", "ip_address", "card_number", "national_id", "url_credentials"}


def test_stats_on_a_known_set():
    records = [
        chat("a", "bb"),
        chat("a", "bb"),
        {"messages": [{"role": "system", "content": "s"}, *chat("ccc", "d")["messages"]]},
    ]
    stats = compute_stats(records, count_tokens=lambda messages: sum(len(m["content"]) for m in messages))
    assert stats["records"] == 3
    assert stats["turns"] == {"total": 7, "mean": 7 / 3, "max": 3}
    assert stats["role_counts"] == {"system": 1, "user": 3, "assistant": 3}
    assert stats["duplicate_rate"] == pytest.approx(1 / 3)
    assert stats["tokens"]["total"] == 3 + 3 + 5 and stats["tokens"]["max"] == 5
    assert sum(stats["tokens"]["histogram"]["counts"]) == 3


def test_split_is_seeded_complete_and_disjoint():
    train, validation = split_indices(100, validation_fraction=0.2, seed=7)
    assert len(validation) == 20 and sorted(train + validation) == list(range(100))
    assert split_indices(100, validation_fraction=0.2, seed=7) == (train, validation)
    assert split_indices(100, validation_fraction=0.2, seed=8) != (train, validation)
    assert split_indices(2, validation_fraction=0.1, seed=0)[1] != []
    with pytest.raises(ValueError):
        split_indices(1, validation_fraction=0.1, seed=0)
    with pytest.raises(ValueError):
        split_indices(10, validation_fraction=0.7, seed=0)
