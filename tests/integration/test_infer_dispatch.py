"""The control plane's side of inference on agents, over a real NATS server: an agent may fetch an adapter's blobs
only while a request naming them, sent to it, is open, only those blobs, and only from that request's tenant; an
announcement feeds the router, and only an enrolled agent's counts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import pytest
from nats.errors import TimeoutError as NatsTimeout

from adaptery.agent.link import AgentLink
from adaptery.engine.generation import Delta, GenerationFailed, Usage
from adaptery.engine.sampling import SamplingParams
from adaptery.messaging import protocol
from adaptery.messaging.protocol import InferRequest
from adaptery.services import agents as agent_records
from adaptery.services.inference import AgentBackend, AgentLost, Inference
from tests.conftest import SAMPLE_CHAT
from tests.integration.test_queue import connect, enroll, settings_overrides  # noqa: F401 - no embedded agent


def fetch(running, creds, body: dict) -> tuple[bytes, str | None]:
    async def ask() -> tuple[bytes, str | None]:
        nc = await connect(running, creds)
        try:
            subject = protocol.agent_subject(creds.agent_id, protocol.ADAPTER_VERB)
            reply = await nc.request(subject, protocol.encode(body), timeout=10)
            return reply.data, (reply.headers or {}).get(protocol.ERROR_HEADER)
        finally:
            await nc.close()

    return asyncio.run(ask())


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_agent_fetches_only_the_blobs_of_a_request_sent_to_it(running):
    first, second = enroll(running, "first"), enroll(running, "second")
    blobs, control = running.platform.blobs, running.platform.control
    mine = blobs.put_stream(running.tenant_id, [b"adapter weights of the first tenant"]).sha256
    other_tenant = running.new_tenant("otherlab", "olga")
    theirs = blobs.put_stream(other_tenant.tenant.id, [b"another tenant's weights"]).sha256
    request = InferRequest(
        request_id="0" * 32,
        base_id="adaptery-demo",
        prompt_ids=[1, 2],
        params={},
        adapter_key="a" * 64,
        adapter_files={"adapter_model.safetensors": mine},
    )
    stream = asyncio.run(control.open_stream(first.agent_id, running.tenant_id, request, deliver=lambda raw: None))
    try:
        data, error = fetch(running, first, {"request_id": request.request_id, "sha256": mine, "offset": 0})
        assert error is None and data == b"adapter weights of the first tenant"
        data, error = fetch(running, first, {"request_id": request.request_id, "sha256": mine, "offset": 8})
        assert data == b"weights of the first tenant"
        # the same refusal for a blob the request does not name (another tenant's or none), and another agent
        refusals = [
            fetch(running, first, {"request_id": request.request_id, "sha256": theirs, "offset": 0})[1],
            fetch(running, first, {"request_id": request.request_id, "sha256": "f" * 64, "offset": 0})[1],
            fetch(running, second, {"request_id": request.request_id, "sha256": mine, "offset": 0})[1],
        ]
        named = [theirs, "f" * 64, mine]
        assert refusals == [f"blob {sha} is not part of a request sent to you" for sha in named]
    finally:
        control.close_stream(stream)
    _, error = fetch(running, first, {"request_id": request.request_id, "sha256": mine, "offset": 0})
    assert error and "not part of a request sent to you" in error  # the request is over


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_announcement_reaches_the_router_and_a_revoked_agent_is_not_chosen(running):
    agent = enroll(running, "announcer")
    body = {"every": 1.0, "bases": {"adaptery-demo": {"max_batch": 4}}, "adapters": {"capacity": 2}}

    async def announce() -> None:
        nc = await connect(running, agent)
        try:
            subject = protocol.agent_subject(agent.agent_id, protocol.ANNOUNCE_VERB)
            reply = await nc.request(subject, protocol.encode(body), timeout=10)
            assert protocol.remote_error(reply.headers) is None
        finally:
            await nc.close()

    asyncio.run(announce())
    router = running.platform.router
    assert router.pick("adaptery-demo", None, tenant_id=running.tenant_id) == agent.agent_id
    router.finished(agent.agent_id)
    with running.platform.db.system() as s:
        agent_records.revoke_agent(s, "announcer")
    running.platform.sync_agents()
    assert router.pick("adaptery-demo", None, tenant_id=running.tenant_id) is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_agent_enrolled_without_the_infer_role_cannot_announce_itself_into_the_routing(running):
    agent = enroll(running, "trainer-only")
    with running.platform.db.system() as s:
        agent_records.find_agent(s, "trainer-only").roles = ["train"]
    running.platform.sync_agents()
    body = {"every": 1.0, "bases": {"adaptery-demo": {"max_batch": 4}}, "adapters": {"capacity": 2}}

    async def announce() -> str | None:
        nc = await connect(running, agent)
        try:
            subject = protocol.agent_subject(agent.agent_id, protocol.ANNOUNCE_VERB)
            reply = await nc.request(subject, protocol.encode(body), timeout=10)
            return (reply.headers or {}).get(protocol.ERROR_HEADER)
        finally:
            await nc.close()

    assert asyncio.run(announce()) == "this agent was enrolled without the infer role"
    assert running.platform.router.pick("adaptery-demo", None, tenant_id=running.tenant_id) is None


async def _ask(nc, subject: str, body: dict, timeout: float) -> dict:
    reply = await nc.request(subject, protocol.encode(body), timeout=timeout)
    assert protocol.remote_error(reply.headers) is None, reply.headers
    return protocol.decode(reply.data)


async def _answered_within(nc, subject: str, seconds: float) -> dict:
    """Ask until the control plane answers rather than sheds (a "slow down" reply, or none)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            reply = await nc.request(subject, b"{}", timeout=1)
        except NatsTimeout:
            reply = None
        if reply is not None:
            error = protocol.remote_error(reply.headers)
            if error is None:
                return protocol.decode(reply.data)
            assert error.retryable, error
        assert time.monotonic() < deadline, f"no answer on {subject} within {seconds} s"
        await asyncio.sleep(0.05)  # the pace of asking, not a wait for the flood to pass


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_one_agent_flooding_the_control_plane_does_not_silence_another(running):
    flooder, other = enroll(running, "flooder"), enroll(running, "bystander")
    announcement = {"every": 1.0, "bases": {"adaptery-demo": {"max_batch": 4}}, "adapters": {"capacity": 2}}

    async def scenario() -> None:
        loud, quiet = await connect(running, flooder), await connect(running, other)
        try:
            lease = protocol.agent_subject(flooder.agent_id, "lease")
            inbox = loud.new_inbox()
            for _ in range(20_000):  # published as fast as the client can, none awaited
                await loud.publish(lease, b"{}", reply=inbox)
            await loud.flush()
            # the other agent is answered while the flood is being shed (a serial responder: tens of seconds)
            assert await _ask(quiet, protocol.agent_subject(other.agent_id, "lease"), {}, 3) == {"assignment": None}
            await _ask(quiet, protocol.agent_subject(other.agent_id, protocol.ANNOUNCE_VERB), announcement, 3)
            # and the flooder itself is answered again once it stops (what is left of its flood drains first)
            assert await _answered_within(loud, lease, 10) == {"assignment": None}
        finally:
            await loud.close()
            await quiet.close()

    asyncio.run(scenario())
    assert running.platform.control.shed > 0
    assert running.platform.router.pick("adaptery-demo", None, tenant_id=running.tenant_id) == other.agent_id


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_control_plane_answers_only_into_the_asking_agents_own_inbox(running):
    attacker, victim = enroll(running, "attacker"), enroll(running, "victim")

    control = running.platform.control

    async def scenario() -> list[bytes]:
        nc, watcher = await connect(running, attacker), await connect(running, victim)
        seen: list[bytes] = []

        async def record(msg) -> None:
            seen.append(msg.data)

        try:
            # the victim listens on its own infer subject, as a serving agent does
            await watcher.subscribe(protocol.infer_subject(victim.agent_id), cb=record)
            await watcher.flush()
            lease = protocol.agent_subject(attacker.agent_id, "lease")
            shed = control.shed
            await nc.publish(lease, b"{}", reply=protocol.infer_subject(victim.agent_id))
            await nc.publish(lease, b"{}", reply=protocol.stream_subject(victim.agent_id, "0" * 32))
            await nc.flush()
            # its own inbox still works, and by then the two above were dropped unanswered: requests are sorted on
            # the control plane's loop in the order they arrive, so no worker ever had them to answer
            assert await _ask(nc, lease, {}, 5) == {"assignment": None}
            assert control.shed == shed + 2
            await watcher.flush()
        finally:
            await nc.close()
            await watcher.close()
        return seen

    assert asyncio.run(scenario()) == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_malformed_announcement_is_refused_and_the_agents_list_still_renders(running):
    agent = enroll(running, "garbler")
    good = {"every": 1.0, "bases": {"adaptery-demo": {"max_batch": 4}}, "adapters": {"capacity": 2}}
    bad = {
        "bases": {"x": {"kv_capacity_tokens": "x", "max_batch": "y"}},
        "running": "a",
        "waiting": [1],
        "adapters": "zz",
    }

    async def announce(body: dict) -> str | None:
        nc = await connect(running, agent)
        try:
            subject = protocol.agent_subject(agent.agent_id, protocol.ANNOUNCE_VERB)
            reply = await nc.request(subject, protocol.encode(body), timeout=10)
            return (reply.headers or {}).get(protocol.ERROR_HEADER)
        finally:
            await nc.close()

    assert asyncio.run(announce(good)) is None
    error = asyncio.run(announce(bad))
    assert error and error.startswith("invalid announcement: ") and "bases.x.kv_capacity_tokens" in error
    listed = running.client.get("/api/admin/agents", headers=running.auth())
    assert listed.status_code == 200, listed.text
    row = next(a for a in listed.json()["data"] if a["id"] == agent.agent_id)
    assert row["bases"] == ["adaptery-demo"]  # the previous announcement stands
    assert running.platform.router.pick("adaptery-demo", None, tenant_id=running.tenant_id) == agent.agent_id


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_agent_created_for_inference_only_leases_no_training_job(running):
    with running.platform.db.system() as s:
        infer_only = agent_records.create_agent(s, "server-only", roles=["infer"])
        assert agent_records.find_agent(s, "server-only").roles == ["infer"]
    running.platform.sync_agents()
    both = enroll(running, "both")  # the default: train and infer, as before
    headers = running.auth()
    file = running.client.post(
        "/v1/files", headers=headers, files={"file": SAMPLE_CHAT.open("rb")}, data={"purpose": "fine-tune"}
    ).json()
    job = running.client.post(
        "/v1/fine_tuning/jobs", headers=headers, json={"model": "adaptery-demo", "training_file": file["id"]}
    ).json()
    deadline = time.monotonic() + 30
    while running.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()["status"] != "queued":
        assert time.monotonic() < deadline
        time.sleep(0.2)

    async def lease(creds) -> dict:
        nc = await connect(running, creds)
        try:
            return await _ask(nc, protocol.agent_subject(creds.agent_id, "lease"), {}, 10)
        finally:
            await nc.close()

    assert asyncio.run(lease(infer_only)) == {"assignment": None}
    assert asyncio.run(lease(both))["assignment"]["job_id"] == job["id"]


class FakeAgents:
    """Agents over real NATS that accept every request: `stalling` ones send only keepalives, others answer."""

    def __init__(self, running, agents: dict[str, tuple[object, bool]]) -> None:
        self.running, self.agents = running, agents
        self.received: list[str] = []
        self.ready, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        connections, tasks = [], []
        for name, (creds, stalling) in self.agents.items():
            nc = await connect(self.running, creds)
            connections.append(nc)

            async def on_request(msg, nc=nc, name=name, agent_id=creds.agent_id, stalling=stalling) -> None:
                request_id = protocol.decode(msg.data)["request_id"]
                self.received.append(name)
                subject = protocol.stream_subject(agent_id, request_id)
                tasks.append(asyncio.create_task(self._answer(nc, subject, stalling)))

            await nc.subscribe(protocol.infer_subject(creds.agent_id), cb=on_request)
            await nc.flush()
        self.ready.set()
        while not self.stop.is_set():
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        for nc in connections:
            await nc.close()

    async def _answer(self, nc, subject: str, stalling: bool) -> None:
        if not stalling:
            await nc.publish(subject, protocol.encode({"seq": 0, "text": "hi", "tokens": 1}))
            await nc.publish(subject, protocol.encode({"seq": 1, "end": True, "usage": {"completion_tokens": 1}}))
            return
        for seq in range(1000):  # keepalives, and never a token
            await nc.publish(subject, protocol.encode({"seq": seq}))
            await asyncio.sleep(0.2)

    def __enter__(self) -> FakeAgents:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def collect(deltas: AsyncIterator[Delta]) -> list[Delta]:
    """An answer's deltas, read on an event loop of their own as the server reads them on its own."""

    async def read() -> list[Delta]:
        return [delta async for delta in deltas]

    return asyncio.run(read())


def first_choice(running, first, second) -> None:  # noqa: ANN001 - the fixture, two agents' credentials
    """Both agents announce the demo base; `second` is made busier (a request in flight), so `first` is chosen."""
    router = running.platform.router
    for creds in (first, second):
        router.announce(creds.agent_id, {"every": 60.0, "bases": {"adaptery-demo": {"max_batch": 4}}}, 60.0)
    assert router.pick("adaptery-demo", None, tenant_id=running.tenant_id, exclude=[first.agent_id]) == second.agent_id


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_agent_that_only_keeps_alive_loses_the_request_to_another_and_is_not_chosen_again(running, monkeypatch):
    stalling, working = enroll(running, "stalling"), enroll(running, "working")
    router, control = running.platform.router, running.platform.control
    first_choice(running, stalling, working)
    inference = Inference(
        running.platform.engine, router, lambda: control, idle_seconds=5, max_bytes_per_token=32, first_token_seconds=2
    )
    usage = Usage()
    with FakeAgents(running, {"stalling": (stalling, True), "working": (working, False)}) as agents:
        started: list[str] = []
        start = threading.Thread.start
        monkeypatch.setattr(threading.Thread, "start", lambda thread: (started.append(thread.name), start(thread)))
        deltas = collect(
            inference.generate(
                "adaptery-demo",
                "adaptery-demo",
                None,
                [1, 2, 3],
                SamplingParams(max_tokens=4),
                usage,
                tenant_id=running.tenant_id,
            )  # fmt: skip
        )
    assert agents.received == ["stalling", "working"]
    assert [d.text for d in deltas] == ["hi"]  # the client saw only the answer
    assert started == []  # relayed on the caller's event loop: no thread per request, nor per agent tried
    assert router.is_lost(stalling.agent_id)  # until it announces again
    router.finished(working.agent_id)
    assert router.pick("adaptery-demo", None, tenant_id=running.tenant_id) == working.agent_id


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_stream_that_stalls_after_its_first_token_ends_with_an_error(running):
    agent = enroll(running, "stalls-later")
    router, control = running.platform.router, running.platform.control
    router.announce(agent.agent_id, {"every": 60.0, "bases": {"adaptery-demo": {"max_batch": 4}}}, 60.0)
    backend = AgentBackend(
        control, router, idle_seconds=3, max_bytes_per_token=32, first_token_seconds=5, stall_seconds=1
    )
    router.pick("adaptery-demo", None, tenant_id=running.tenant_id)

    async def first_token_then_keepalives(nc, subject: str, stalling: bool) -> None:
        await nc.publish(subject, protocol.encode({"seq": 0, "text": "a", "tokens": 1}))
        for seq in range(1, 1000):
            await nc.publish(subject, protocol.encode({"seq": seq}))
            await asyncio.sleep(0.2)

    with FakeAgents(running, {"stalls-later": (agent, True)}) as agents:
        agents._answer = first_token_then_keepalives

        async def read() -> None:
            stream = backend.generate_on(
                agent.agent_id, "adaptery-demo", None, [1, 2], SamplingParams(max_tokens=4), Usage(), lambda: False,
                running.tenant_id,
            )  # fmt: skip
            assert (await anext(stream)).text == "a"
            with pytest.raises(AgentLost, match="sent no token for 1 s"):
                await anext(stream)

        asyncio.run(read())
    assert router.is_lost(agent.agent_id)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_agent_whose_engine_is_down_passes_the_request_on_before_a_token_and_errors_after(running):
    down, working = enroll(running, "engine-down"), enroll(running, "engine-up")
    router, control = running.platform.router, running.platform.control
    first_choice(running, down, working)
    inference = Inference(running.platform.engine, router, lambda: control, idle_seconds=5, max_bytes_per_token=32)
    retryable = {"seq": 1, "end": True, "error": "vLLM for adaptery-demo is restarting", "retryable": True}
    answer_after_a_token: list[bool] = [False]

    async def answer(nc, subject: str, stalling: bool) -> None:
        if subject.startswith(protocol.stream_subject(working.agent_id, "")):
            await nc.publish(subject, protocol.encode({"seq": 0, "text": "hi", "tokens": 1, "finish_reason": "stop"}))
            await nc.publish(subject, protocol.encode({"seq": 1, "end": True}))
        elif answer_after_a_token[0]:  # a token went out, then the engine died: the agent may not pass it on
            await nc.publish(subject, protocol.encode({"seq": 0, "text": "a", "tokens": 1}))
            await nc.publish(subject, protocol.encode({**retryable, "seq": 1}))
        else:
            await nc.publish(subject, protocol.encode({"seq": 0, "accepted": True}))
            await nc.publish(subject, protocol.encode(retryable))

    def ask() -> list[str]:
        deltas = inference.generate(
            "adaptery-demo", "adaptery-demo", None, [1, 2, 3], SamplingParams(max_tokens=4), Usage(),
            tenant_id=running.tenant_id,
        )  # fmt: skip
        return [d.text for d in collect(deltas)]

    with FakeAgents(running, {"engine-down": (down, False), "engine-up": (working, False)}) as agents:
        agents._answer = answer
        assert ask() == ["hi"]  # the client saw only the other agent's answer
        assert agents.received == ["engine-down", "engine-up"]
        assert router.is_lost(down.agent_id)  # not chosen until it announces again
        router.finished(working.agent_id)

        router.announce(down.agent_id, {"every": 60.0, "bases": {"adaptery-demo": {"max_batch": 4}}}, 60.0)
        answer_after_a_token[0] = True
        router.pick("adaptery-demo", None, tenant_id=running.tenant_id, exclude=[down.agent_id])
        with pytest.raises(GenerationFailed, match="is restarting; the answer is incomplete"):
            ask()
        assert agents.received[2:] == ["engine-down"]  # not sent elsewhere: a token had been delivered


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_request_the_bus_could_not_send_goes_to_another_agent_and_leaves_no_stream_open(running, monkeypatch):
    broken, working = enroll(running, "unreachable"), enroll(running, "reachable")
    router, control = running.platform.router, running.platform.control
    first_choice(running, broken, working)
    publish = control._nc.publish

    async def refusing(subject: str, payload: bytes = b"", **kwargs: object) -> None:
        if subject == protocol.infer_subject(broken.agent_id):
            raise ConnectionError("nats: connection closed")
        await publish(subject, payload, **kwargs)

    monkeypatch.setattr(control._nc, "publish", refusing)
    inference = Inference(running.platform.engine, router, lambda: control, idle_seconds=5, max_bytes_per_token=32)
    with FakeAgents(running, {"reachable": (working, False)}) as agents:
        deltas = collect(
            inference.generate(
                "adaptery-demo",
                "adaptery-demo",
                None,
                [1, 2, 3],
                SamplingParams(max_tokens=4),
                Usage(),
                tenant_id=running.tenant_id,
            )  # fmt: skip
        )
    assert agents.received == ["reachable"] and [d.text for d in deltas] == ["hi"]  # the client saw only the answer
    assert not router.is_lost(broken.agent_id)  # the bus failed, not the agent: it stays in the routing
    assert control._streams == {}  # neither stream is left open (nor its adapter's blobs fetchable)
    streams = [sub.subject for sub in control._nc._subs.values() if "stream" in sub.subject]
    assert streams == [protocol.stream_subject("*", f"{control.instance}.*")]  # one for all, none per request


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_batch_reaches_only_its_agents_streams_each_in_order_and_no_other_agent_may_send_one(running):
    """One message from an agent carries the deltas of several of its streams (`protocol.stream_batch_subject`):
    each reaches its own reader in order, one naming another agent's stream reaches nothing, and another agent
    cannot publish a batch in this agent's name (the broker refuses the subject)."""
    mine, bystander = enroll(running, "batcher"), enroll(running, "bystander")
    control = running.platform.control
    batch_subject = protocol.stream_batch_subject(mine.agent_id, control.instance)

    async def scenario() -> dict[str, list[int]]:
        got: dict[str, list[int]] = {"a": [], "b": [], "theirs": []}
        keys = {}
        for name, creds in (("a", mine), ("b", mine), ("theirs", bystander)):
            request_id = control.new_request_id()
            request = InferRequest(request_id, "adaptery-demo", [1], {}, batched=True)
            deliver = lambda raw, name=name: got[name].append(protocol.decode(raw)["seq"])  # noqa: E731
            await control.open_stream(creds.agent_id, running.tenant_id, request, deliver)
            keys[name] = request_id.rpartition(".")[2]
        lines = [("a", 0), ("b", 0), ("theirs", 0), ("a", 1), ("nobody", 0), ("b", 1), ("a", 2)]
        packed = protocol.pack_stream_batch(
            [(keys.get(name, "f" * 32), protocol.encode({"seq": seq})) for name, seq in lines]
        )
        agent, other = await connect(running, mine), await connect(running, bystander)
        try:
            await other.publish(batch_subject, protocol.pack_stream_batch([(keys["a"], b'{"seq": 0}')]))
            await other.flush()
            await agent.publish(batch_subject, packed)
            await agent.flush()
            deadline = time.monotonic() + 10
            while (len(got["a"]), len(got["b"])) != (3, 2) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # anything that should not arrive has had time to
        finally:
            await agent.close()
            await other.close()
        return got

    assert asyncio.run(scenario()) == {"a": [0, 1, 2], "b": [0, 1], "theirs": []}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_agent_link_sends_what_waits_for_one_control_plane_as_one_message_and_keeps_each_streams_order(running):
    agent = enroll(running, "sender")
    control = running.platform.control
    link = AgentLink(running.platform.nats.url, agent.agent_id, agent.secret)
    link.connect()
    sent: list[str] = []

    async def scenario() -> dict[str, list[int]]:
        got: dict[str, list[int]] = {"a": [], "b": []}
        streams = {}
        for name in got:
            request = InferRequest(control.new_request_id(), "adaptery-demo", [1], {}, batched=True)
            deliver = lambda raw, name=name: got[name].append(protocol.decode(raw)["seq"])  # noqa: E731
            await control.open_stream(agent.agent_id, running.tenant_id, request, deliver)
            instance, _, key = request.request_id.rpartition(".")
            subject = protocol.stream_subject(agent.agent_id, request.request_id)
            streams[name] = (subject, (protocol.stream_batch_subject(agent.agent_id, instance), key))
        nc = link._nc
        publish = nc.publish
        nc.publish = lambda subject, data, **kw: (sent.append(subject), publish(subject, data, **kw))[1]
        hold = threading.Event()
        link._loop.call_soon_threadsafe(hold.wait, 10)  # the link's loop busy: what is published waits together
        for seq in range(3):
            for subject, batch in streams.values():
                link.publish(subject, {"seq": seq}, batch=batch)
        hold.set()
        deadline = time.monotonic() + 10
        while (len(got["a"]), len(got["b"])) != (3, 3) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return got

    try:
        assert asyncio.run(scenario()) == {"a": [0, 1, 2], "b": [0, 1, 2]}
    finally:
        link.close()
    assert sent == [protocol.stream_batch_subject(agent.agent_id, control.instance)]  # six deltas, one message
