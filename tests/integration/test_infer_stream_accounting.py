"""An infer agent's stream is not taken at its word: a fake agent on the real NATS server answers a chat request
with crafted stream messages (negative usage in its end marker, more tokens than max_tokens, deltas far bigger
than their tokens can hold, a negative token count). The control plane bills what it counted and delivered, and
ends a stream that breaks the protocol with an error (an error event, or a 502 when not streamed); before the
first token the request goes elsewhere (the embedded engine here)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from adaptery.db import models as m
from adaptery.messaging import protocol
from tests.integration.test_queue import connect, enroll

Script = Callable[[dict[str, Any]], list[dict[str, Any]]]


class FakeAgent:
    """An enrolled agent that announces it serves adaptery-demo and answers each request with `script(request)`:
    the bodies of its stream messages, numbered here. It records the cancellations it receives."""

    def __init__(self, running, name: str, script: Script) -> None:  # noqa: ANN001
        self.running, self.creds, self.script = running, enroll(running, name), script
        self.cancelled: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)

    async def _start(self) -> None:
        self.nc = await connect(self.running, self.creds)
        agent_id = self.creds.agent_id

        async def on_request(msg) -> None:  # noqa: ANN001
            request = protocol.decode(msg.data)
            self.requests.append(request)
            subject = protocol.stream_subject(agent_id, request["request_id"])
            for seq, body in enumerate(self.script(request)):
                await self.nc.publish(subject, json.dumps({"seq": seq, **body}).encode())
            await self.nc.flush()

        async def on_cancel(msg) -> None:  # noqa: ANN001
            self.cancelled.append(protocol.decode(msg.data).get("request_id"))

        await self.nc.subscribe(protocol.infer_subject(agent_id), cb=on_request)
        await self.nc.subscribe(protocol.infer_cancel_subject(agent_id), cb=on_cancel)
        await self.nc.flush()
        await self.announce()

    async def announce(self) -> None:
        body = {"every": 60.0, "bases": {"adaptery-demo": {"max_batch": 4}}, "adapters": {"capacity": 2}}
        subject = protocol.agent_subject(self.creds.agent_id, protocol.ANNOUNCE_VERB)
        reply = await self.nc.request(subject, protocol.encode(body), timeout=10)
        assert protocol.remote_error(reply.headers) is None

    def cancelled_within(self, seconds: float) -> list[str]:
        """The cancellations received, once there is one (or `seconds` passed): the agent may still be sending."""
        deadline = time.monotonic() + seconds
        while not self.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.cancelled

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.nc.close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def fake_agent(running) -> Iterator[Callable[[Script], FakeAgent]]:  # noqa: ANN001
    made: list[FakeAgent] = []

    def make(script: Script) -> FakeAgent:
        made.append(FakeAgent(running, f"fake-{len(made)}", script))
        return made[-1]

    yield make
    for agent in made:
        agent.close()


def delta(text: str, tokens: Any, finish: str | None = None) -> dict[str, Any]:
    return {"text": text, "finish_reason": finish, "logprobs": None, "tokens": tokens}


def billed(running) -> tuple[int, int, int, int]:  # noqa: ANN001
    """The tenant's ledger (prompt, completion, failed requests) and its month's counted tokens."""
    with running.platform.db.system() as s:
        record = m.UsageRecord
        prompt, completion, failed = s.execute(
            select(
                func.coalesce(func.sum(record.prompt_tokens), 0),
                func.coalesce(func.sum(record.completion_tokens), 0),
                func.coalesce(func.sum(record.failed_requests), 0),
            ).where(record.tenant_id == running.tenant_id, record.kind == "completions")
        ).one()
        month = s.scalar(
            select(func.coalesce(func.sum(m.UsageCounter.tokens), 0)).where(
                m.UsageCounter.subject == f"tenant:{running.tenant_id}", m.UsageCounter.period.like("month:%")
            )
        )
    return int(prompt), int(completion), int(failed), int(month)


def chat(running, **body: Any):  # noqa: ANN001, ANN201
    messages = [{"role": "user", "content": "Hello there"}]
    return running.client.post(
        "/v1/chat/completions",
        headers=running.auth(),
        json={"model": "adaptery-demo", "messages": messages, **body},
        timeout=60,
    )


def events(response) -> list[dict[str, Any]]:  # noqa: ANN001
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_negative_usage_in_an_agents_end_marker_is_a_protocol_error_and_never_billed(running, fake_agent):
    end = {"end": True, "usage": {"prompt_tokens": -100000, "completion_tokens": -100000}}
    agent = fake_agent(lambda request: [{"accepted": True}, delta("Hi", 1), delta("", 0, "stop"), end])
    response = chat(running, max_tokens=4, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200
    chunks = events(response)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text == "Hi"
    assert chunks[-1]["error"]["type"] == "server_error" and "protocol" in chunks[-1]["error"]["message"]
    assert not any((c.get("usage") or {}).get("total_tokens", 0) < 0 for c in chunks)
    prompt, completion, failed, month = billed(running)
    assert prompt == len(agent.requests[0]["prompt_ids"]) > 0
    assert (completion, failed, month) == (1, 1, prompt + 1)  # what was delivered, counted here


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_agent_streaming_past_max_tokens_is_cut_off_cancelled_and_billed_what_was_delivered(running, fake_agent):
    overrun = [delta("word ", 1) for _ in range(199)]
    end = {"end": True, "usage": {"prompt_tokens": 3, "completion_tokens": 0}}
    agent = fake_agent(lambda request: [{"accepted": True}, *overrun, delta("", 0, "stop"), end])
    response = chat(running, max_tokens=4)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "agent_protocol_error" and "more than max_tokens 4" in error["message"]
    prompt, completion, failed, month = billed(running)
    assert prompt == len(agent.requests[0]["prompt_ids"]) > 0
    assert (completion, failed, month) == (4, 1, prompt + 4)
    assert agent.cancelled_within(30) == [agent.requests[0]["request_id"]]  # its slot is freed on the agent


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("size", "says"),
    [(900_000, "the stream exceeded 66560 bytes for max_tokens 4"), (100, "102 bytes of text for 2 tokens")],
)
def test_deltas_bigger_than_their_tokens_can_hold_end_the_answer_without_buffering_them(
    running, fake_agent, size, says
):
    big = "x" * size
    agent = fake_agent(
        lambda request: [{"accepted": True}, delta("Hi", 1), *[delta(big, 1) for _ in range(100)], {"end": True}]
    )
    response = chat(running, max_tokens=4)
    assert response.status_code == 502 and len(response.content) < 2000, response.text[:300]
    assert says in response.json()["error"]["message"]
    prompt, completion, failed, month = billed(running)
    assert (completion, failed, month) == (1, 1, prompt + 1)
    assert agent.cancelled_within(30) == [agent.requests[0]["request_id"]]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_negative_token_count_before_the_first_token_sends_the_request_elsewhere(running, fake_agent):
    agent = fake_agent(lambda request: [{"accepted": True}, delta("Hi", -100000), {"end": True}])
    response = chat(running, max_tokens=4)
    assert response.status_code == 200, response.text  # the embedded engine answered instead
    usage = response.json()["usage"]
    assert len(agent.requests) == 1 and 0 < usage["completion_tokens"] <= 4
    prompt, completion, failed, month = billed(running)
    assert (prompt, completion, failed) == (usage["prompt_tokens"], usage["completion_tokens"], 0)
    assert month == usage["total_tokens"]
    assert running.platform.router.pick("adaptery-demo", None, tenant_id=running.tenant_id) is None  # broken


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_agent_is_told_whether_the_client_reads_the_answer_as_it_comes(running, fake_agent):
    end = {"end": True, "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    agent = fake_agent(lambda request: [{"accepted": True}, delta("Hi", 1, "stop"), end])
    assert chat(running, max_tokens=4, stream=True).status_code == 200
    assert chat(running, max_tokens=4).json()["choices"][0]["message"]["content"] == "Hi"
    assert [request["streamed"] for request in agent.requests] == [True, False]  # a whole answer: fewer messages
