"""An agent's stream put back together: in order, duplicates dropped, a gap is an error, nothing after the end."""

from __future__ import annotations

import pytest

from adaptery.messaging.streams import StreamBroken, StreamReassembly


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
