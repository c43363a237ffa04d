"""An infer agent sends a request's deltas coalesced: fewer messages, the same text, tokens, logprobs and order."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from adaptery.agent.inference import InferenceHost, _Stream
from adaptery.agent.link import LinkDown
from adaptery.agent.vault import AgentVault
from adaptery.engine.generation import Delta, Usage
from adaptery.messaging.protocol import InferRequest
from adaptery.messaging.streams import StreamAccount, StreamReassembly

# (text, finish, logprobs, tokens) as an engine yields them: a token whose bytes needed the next one (2 tokens)
DELTAS = [
    ("Hel", None, [{"token": "Hel"}], 1),
    ("lo", None, [{"token": "lo"}], 1),
    (" wö", None, [{"token": " w"}, {"token": "ö"}], 2),
    ("rld", None, [{"token": "rld"}], 1),
    ("", "stop", None, 0),
]


class RecordingLink:
    agent_id = "agent-test"

    def __init__(self, down_for: int = 0) -> None:
        self.sent: list[dict[str, Any]] = []
        self.batches: list[tuple[str, str] | None] = []
        self.down_for = down_for  # the next this many publishes fail as if the link were down

    def publish(self, subject: str, body: dict[str, Any], *, batch: tuple[str, str] | None = None) -> None:
        if self.down_for:
            self.down_for -= 1
            raise LinkDown("not connected")
        self.sent.append(body)
        self.batches.append(batch)


def received(messages: list[dict[str, Any]], max_tokens: int = 16) -> tuple[str, int, list[dict[str, Any]], str]:
    """What the control plane makes of the messages: text, tokens counted, logprob entries, finish reason."""
    reassembly, account = StreamReassembly(), StreamAccount(max_tokens, 16, logprobs=True)
    text, entries, finish = "", [], None
    for raw in messages:
        message = reassembly.accept(raw)
        if message is not None and "text" in message:
            piece, finish, logprobs = account.delta(message)
            text += piece
            entries += logprobs or []
    return text, account.tokens, entries, finish


def test_without_a_window_every_delta_is_its_own_message():
    link = RecordingLink()
    stream = _Stream(link, "s", coalesce_seconds=0.0)
    assert all(stream.delta(*delta) for delta in DELTAS)
    assert [m["seq"] for m in link.sent] == [0, 1, 2, 3, 4]
    assert received(link.sent) == ("Hello wörld", 5, [{"token": t} for t in ["Hel", "lo", " w", "ö", "rld"]], "stop")


def test_deltas_within_the_window_go_out_together_with_the_same_text_tokens_and_logprobs():
    link = RecordingLink()
    stream = _Stream(link, "s", coalesce_seconds=60.0)
    sent = [stream.delta(*delta) for delta in DELTAS]
    assert sent == [True, False, False, False, True]  # the first at once, the finishing one releases the rest
    assert len(link.sent) == 2 and [m["seq"] for m in link.sent] == [0, 1]
    assert link.sent[1]["tokens"] == 4 and link.sent[1]["text"] == "lo wörld"
    separate = RecordingLink()
    alone = _Stream(separate, "s", coalesce_seconds=0.0)
    for delta in DELTAS:
        alone.delta(*delta)
    assert received(link.sent) == received(separate.sent)


def test_held_deltas_leave_before_any_other_message_and_once_their_window_passed():
    link = RecordingLink()
    stream = _Stream(link, "s", coalesce_seconds=0.05)
    stream.delta("a", None, None, 1)
    stream.delta("b", None, None, 1)
    assert stream.flush_due(time.monotonic())  # not yet due: still held
    assert len(link.sent) == 1
    assert not stream.flush_due(time.monotonic() + 0.06)
    assert [m.get("text") for m in link.sent] == ["a", "b"] and link.sent[1]["logprobs"] is None
    stream.delta("c", None, None, 1)
    stream.send({"end": True})  # the end marker never overtakes a held delta
    assert [(m["seq"], m.get("text"), m.get("end")) for m in link.sent[2:]] == [(2, "c", None), (3, None, True)]


def test_a_delta_held_when_the_link_was_down_is_sent_later_without_a_gap():
    link = RecordingLink()
    stream = _Stream(link, "s", coalesce_seconds=60.0)
    stream.delta("a", None, None, 1)
    stream.delta("b", None, None, 1)
    link.down_for = 1
    with pytest.raises(LinkDown):
        stream.delta("", "length", None, 0)
    stream.send({"end": True})
    assert [(m["seq"], m.get("text"), m.get("finish_reason")) for m in link.sent] == [
        (0, "a", None),
        (1, "b", "length"),  # held across the failure, finish reason included
        (2, None, None),
    ]
    assert received(link.sent)[:2] == ("ab", 2)


class ScriptedEngine:
    """Yields DELTAS with a pause between them, counting usage as an engine does; stops when told."""

    max_batch = 1

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self.stopped = threading.Event()
        self.streamed: list[bool] = []  # what each request told the engine (vLLM's streams an unread answer whole)

    def base(self, base_id: str, path: str) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"device": "cpu", "bases": {}}

    def generate(self, base_id, path, adapter, prompt_ids, params, usage: Usage, should_stop, fairness_key, streamed):  # noqa: ANN001
        self.streamed.append(streamed)

        def deltas() -> Iterator[Delta]:
            for text, finish, logprobs, tokens in DELTAS:
                if should_stop():
                    self.stopped.set()
                    return
                time.sleep(self.pause)
                usage.completion_tokens += tokens
                yield Delta(text, finish, logprobs)

        return deltas()


def serve(
    tmp_path, engine: ScriptedEngine, link: RecordingLink, coalesce: float, cancel: bool = False, streamed: bool = True
) -> None:  # noqa: ANN001, E501
    host = InferenceHost(
        link, engine, {"base": str(tmp_path)}, tmp_path / "adapters",  # type: ignore[arg-type]
        vault=AgentVault(tmp_path / "agent.key", tmp_path / "scratch"), roles=["infer"], max_adapters=1,
        announce_seconds=60, coalesce_seconds=coalesce,
    )  # fmt: skip
    request = InferRequest(
        request_id="r1", base_id="base", prompt_ids=[1, 2, 3], params={"max_tokens": 16}, streamed=streamed
    )
    stream = host._stream_for(InferRequest.from_json(request.to_json()))  # as it arrives over the bus
    if cancel:
        stream.cancelled.set()
    host._serve(request, stream)


@pytest.mark.parametrize("coalesce", [0.0, 60.0])
def test_the_agent_streams_what_its_engine_made_and_counts_every_token(tmp_path, coalesce):
    link, engine = RecordingLink(), ScriptedEngine(pause=0.001)
    serve(tmp_path, engine, link, coalesce)
    assert engine.streamed == [True]
    assert link.sent[0]["accepted"] and link.sent[-1]["end"]
    assert link.sent[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5}
    assert received(link.sent)[:2] == ("Hello wörld", 5)
    assert len(link.sent) == (7 if coalesce == 0 else 4)  # accepted, deltas, end


def test_an_answer_read_whole_goes_in_a_message_a_second_its_first_token_at_once(tmp_path):
    link, engine = RecordingLink(), ScriptedEngine(pause=0.001)
    serve(tmp_path, engine, link, 0.0, streamed=False)  # the agent's own window: none
    assert engine.streamed == [False]  # the engine hears it too (vLLM then sends the answer in one piece)
    assert received(link.sent)[:2] == ("Hello wörld", 5)
    deltas = [message for message in link.sent if "text" in message]
    assert [d["text"] for d in deltas] == ["Hel", "lo wörld"]  # the first at once, the rest with the end
    assert InferRequest.from_json({**InferRequest("r", "b", [1], {}).to_json(), "streamed": None}).streamed
    assert not InferRequest.from_json({**InferRequest("r", "b", [1], {}).to_json(), "streamed": False}).streamed


def test_a_cancelled_request_stops_its_engine_at_once_whatever_the_window(tmp_path):
    link, engine = RecordingLink(), ScriptedEngine(pause=0.001)
    serve(tmp_path, engine, link, 60.0, cancel=True)
    assert engine.stopped.is_set()
    assert link.sent[-1]["end"] and link.sent[-1]["usage"]["completion_tokens"] == 0


def test_a_stream_goes_in_its_control_planes_batches_only_when_the_request_says_it_reads_them(tmp_path):
    host = InferenceHost(
        RecordingLink(), ScriptedEngine(pause=0), {"base": str(tmp_path)}, tmp_path / "adapters",  # type: ignore[arg-type]
        vault=AgentVault(tmp_path / "agent.key", tmp_path / "scratch"), roles=["infer"], max_adapters=1,
        announce_seconds=60,
    )  # fmt: skip

    def stream_for(request_id: str, **fields: Any) -> _Stream:
        request = InferRequest(request_id=request_id, base_id="base", prompt_ids=[1], params={}, **fields)
        return host._stream_for(InferRequest.from_json(request.to_json()))  # as it arrives over the bus

    batched = stream_for("c0ffee.5e1f", batched=True)
    assert batched.subject == "adaptery.stream.agent-test.c0ffee.5e1f"
    assert batched.batch == ("adaptery.stream.agent-test.c0ffee.many", "5e1f")
    assert stream_for("c0ffee.5e1f").batch is None  # a control plane that does not read batches (an older one)
    # an id that cannot be a batch line's key or a subject's token: each message alone, on the stream's subject
    for odd in ("no-instance", "c0ffee.a b", "c0ffee.*", "c0ffee.>", ".5e1f"):
        assert stream_for(odd, batched=True).batch is None
    assert not InferRequest.from_json({**InferRequest("r", "b", [1], {}).to_json(), "batched": "yes"}).batched
