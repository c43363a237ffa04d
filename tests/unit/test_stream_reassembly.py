"""An agent's stream put back together: in order, duplicates dropped, a gap is an error, nothing after the end."""

from __future__ import annotations

import re

import pytest

from adaptery.messaging.streams import StreamAccount, StreamBroken, StreamInvalid, StreamReassembly


def test_messages_in_order_are_delivered_until_the_end_marker():
    stream = StreamReassembly()
    assert stream.accept({"seq": 0, "accepted": True}) == {"seq": 0, "accepted": True}
    assert stream.accept({"seq": 1, "text": "a"})["text"] == "a"
    assert not stream.ended
    assert stream.accept({"seq": 2, "end": True})["end"]
    assert stream.ended


def test_a_duplicate_is_dropped():
    stream = StreamReassembly()
    stream.accept({"seq": 0})
    stream.accept({"seq": 1, "text": "a"})
    assert stream.accept({"seq": 1, "text": "a"}) is None
    assert stream.accept({"seq": 0}) is None
    assert stream.accept({"seq": 2, "text": "b"})["text"] == "b"


def test_a_gap_breaks_the_stream():
    stream = StreamReassembly()
    stream.accept({"seq": 0})
    with pytest.raises(StreamBroken, match="message 1 of the stream was lost"):
        stream.accept({"seq": 2, "text": "b"})


def test_nothing_after_the_end_counts():
    stream = StreamReassembly()
    stream.accept({"seq": 0, "end": True})
    assert stream.accept({"seq": 1, "text": "late"}) is None


@pytest.mark.parametrize("seq", [None, "1", -1, True, 1.0])
def test_a_message_without_a_valid_sequence_number_breaks_the_stream(seq):
    with pytest.raises(StreamBroken):
        StreamReassembly().accept({"seq": seq})


def delta(text: str, tokens: object, finish: str | None = None, logprobs: list | None = None) -> dict:
    return {"text": text, "tokens": tokens, "finish_reason": finish, "logprobs": logprobs}


def test_an_honest_stream_is_counted_here_and_held_back_text_may_come_later():
    account = StreamAccount(max_tokens=4, max_bytes_per_token=4)
    assert account.delta(delta("", 2))[0] == ""  # two tokens held back (an incomplete character, a stop prefix)
    assert account.delta(delta("abcdefgh", 0))[0] == "abcdefgh"  # their text: 8 bytes for 2 tokens
    account.delta(delta("ij", 2))
    account.delta(delta("", 0, "length"))
    account.end({"end": True, "usage": {"prompt_tokens": 3, "completion_tokens": 999}})  # its word is not used
    assert account.tokens == 4 and account.text_bytes == 10


@pytest.mark.parametrize(
    ("deltas", "says"),
    [
        ([delta("a", -1)], "a delta's tokens must be a non-negative integer, not -1"),
        ([delta("a", 1.0)], "not 1.0"),
        ([delta("a", True)], "not True"),
        ([delta("a", None)], "not None"),
        ([delta("a", 1), delta("b", 4)], "the agent sent 5 tokens, more than max_tokens 4"),
        ([delta("x" * 5, 1)], "5 bytes of text for 1 tokens: more than 4 bytes a token"),
        ([delta("é" * 3, 1)], "6 bytes of text for 1 tokens"),  # bytes, not characters
        ([delta("a", 1, logprobs=[{}, {}])], "2 logprob entries for 1 tokens"),
        ([delta("a", 1), delta("", 0), delta("", 0), delta("", 0)], "4 deltas for 1 tokens"),
        ([delta("a", 1, "stop"), delta("b", 1)], "a delta after the one that finished the choice"),
        ([delta("a", 1, "because")], "unknown finish_reason 'because'"),
        ([{"text": 5, "tokens": 1}], "a delta's text must be a string"),
    ],
)
def test_a_stream_claiming_the_impossible_is_invalid_and_the_offending_delta_is_not_counted(deltas, says):
    account = StreamAccount(max_tokens=4, max_bytes_per_token=4)
    with pytest.raises(StreamInvalid, match=re.escape(says)):
        for body in deltas:
            account.delta(body)
    assert account.tokens <= 4 and account.deltas == len(deltas) - 1


@pytest.mark.parametrize("usage", [{"completion_tokens": -100000}, {"prompt_tokens": 1.5}, [], "lots"])
def test_an_end_marker_with_malformed_usage_is_invalid(usage):
    with pytest.raises(StreamInvalid):
        StreamAccount(max_tokens=4, max_bytes_per_token=4).end({"end": True, "usage": usage})


def test_the_wire_budget_grows_with_max_tokens_and_is_spent_by_every_message():
    account = StreamAccount(max_tokens=4, max_bytes_per_token=32)
    account.received(account.max_wire_bytes)
    with pytest.raises(StreamInvalid, match="the stream exceeded"):
        account.received(1)
    assert StreamAccount(max_tokens=8, max_bytes_per_token=32).max_wire_bytes > account.max_wire_bytes
