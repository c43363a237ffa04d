"""An agent link's sender packs the messages of one control plane's streams that wait together into one message,
each stream's in order; the control plane's side unpacks them line by line."""

from __future__ import annotations

from adaptery.agent.link import _packed
from adaptery.messaging import protocol

BATCH = "adaptery.stream.agent-a.inst.many"


def line(key: str, seq: int) -> tuple[str, bytes, tuple[str, str]]:
    return f"adaptery.stream.agent-a.inst.{key}", protocol.encode({"seq": seq, "text": "x"}), (BATCH, key)


def test_the_messages_of_one_batch_subject_leave_as_one_in_order_and_the_others_alone():
    outgoing = [
        line("k1", 0),
        ("adaptery.agent.agent-a.announce", b"{}", None),
        line("k2", 0),
        line("k1", 1),
        ("adaptery.stream.agent-a.old.r9", b'{"seq": 0}', None),
    ]
    sent = _packed(outgoing)
    assert [subject for subject, _ in sent] == [
        "adaptery.agent.agent-a.announce", "adaptery.stream.agent-a.old.r9", BATCH,
    ]  # fmt: skip
    lines = list(protocol.unpack_stream_batch(sent[-1][1]))
    assert [(key, protocol.decode(data)["seq"]) for key, data in lines] == [("k1", 0), ("k2", 0), ("k1", 1)]


def test_a_batch_of_one_goes_on_its_streams_own_subject():
    assert _packed([line("k1", 0)]) == [("adaptery.stream.agent-a.inst.k1", line("k1", 0)[1])]


def test_a_batch_is_cut_before_it_outgrows_a_message():
    big = "x" * (protocol.STREAM_BATCH_BYTES // 3)
    outgoing = [(f"s.{i}", protocol.encode({"seq": i, "text": big}), (BATCH, f"k{i}")) for i in range(7)]
    sent = _packed(outgoing)
    assert len(sent) == 4 and {subject for subject, _ in sent} == {BATCH}
    assert all(len(data) <= protocol.STREAM_BATCH_BYTES + 64 for _, data in sent)
    keys = [key for _, data in sent for key, _ in protocol.unpack_stream_batch(data)]
    assert keys == [f"k{i}" for i in range(7)]


def test_a_line_without_a_key_reaches_no_stream():
    data = b'k1 {"seq": 0}\n{"seq":1}\n\nk2 {"seq": 0}'
    assert [key for key, _ in protocol.unpack_stream_batch(data)] == ["k1", "k2"]
