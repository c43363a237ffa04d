"""The broker itself keeps tenants apart: the hub's two nats-servers (loopback with passwords, fabric with mutual
TLS and leaf nodes) as `adaptery serve` configures them, agents with certificates of the platform CA, and an
island's leaf node dialing in. Real processes, no platform: the control plane here is a client with its password.

Cast: tenant A's island `lab` has a direct agent `a1` and a leaf (`leaf-a`) whose agent `a2` connects to it; tenant
A's other island `edge.gpu-1` has a direct agent `a3`; tenant B has a direct agent `b1`; `p1` is a platform-wide agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from nats.errors import NoRespondersError

from adaptery.auth.agent_ca import CertificateAuthority, pem
from adaptery.auth.tls import ensure_server_certificate
from adaptery.messaging import identity, protocol
from adaptery.messaging.accounts import PLATFORM_ORGANIZATION, Member
from adaptery.messaging.identity import Identity, IdentityDir
from adaptery.messaging.leaf import IslandLeaf
from adaptery.messaging.server import CONTROL_USER, FabricListener, NatsProcess, NatsServer
from tests.conftest import free_port

DAY = dt.timedelta(hours=24)
AGENTS = {
    "a1": ("tenant-a", "lab"),
    "a2": ("tenant-a", "lab"),
    "a3": ("tenant-a", "edge.gpu-1"),  # an island's name may hold '.', which an account's may not
    "b1": ("tenant-b", "hpc"),
    "p1": (None, "cloud"),
}


@dataclass
class Fabric:
    hub: NatsServer
    ca: CertificateAuthority
    certs: Path
    leaf: IslandLeaf
    island_dir: Path
    members: list[Member]

    def ids(self, name: str) -> str:
        return f"agent-{name}"

    def context(self, name: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        context.load_cert_chain(str(self.certs / f"{name}.pem"), str(self.certs / f"{name}.key"))
        return context

    @property
    def fabric_url(self) -> str:
        return f"tls://127.0.0.1:{self.hub.fabric_client_port}"


def leaf_name(subject: x509.Name) -> str:
    """The name the leaf whose certificate has `subject` serves its island's agents under."""
    organization = subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    island = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    return identity.leaf_server_name(organization, island)


def issue(ca: CertificateAuthority, certs: Path, name: str, subject, lifetime=DAY, *, leaf: bool = False) -> None:
    key = identity.make_key()
    server_name = leaf_name(subject) if leaf else None
    cert = ca.issue(identity.make_csr(key), subject, lifetime, server_name=server_name)
    (certs / f"{name}.pem").write_bytes(pem(cert))
    (certs / f"{name}.key").write_bytes(identity.key_pem(key))


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    root = tmp_path_factory.mktemp("fabric")
    tls_dir, certs = root / "tls", root / "certs"
    certs.mkdir()
    ca = CertificateAuthority.load(tls_dir)
    (certs / "ca.pem").write_bytes(ca.pem)
    members = []
    for name, (tenant, island) in AGENTS.items():
        subject = identity.subject_name(tenant or PLATFORM_ORGANIZATION, island, f"agent-{name}")
        issue(ca, certs, name, subject)
        members.append(Member(f"agent-{name}", tenant, island, identity.subject_string(subject)))
    leaf_subject = identity.subject_name("tenant-a", "lab", "agent-leaf-a")
    members.append(Member("agent-leaf-a", "tenant-a", "lab", identity.subject_string(leaf_subject), leaf=True))
    # What an attacker can make: a certificate with a1's very subject, signed by a CA of its own.
    rogue = CertificateAuthority.load(root / "rogue-ca")
    issue(rogue, certs, "rogue", identity.subject_name("tenant-a", "lab", "agent-a1"))
    issue(ca, certs, "expired", identity.subject_name("tenant-a", "lab", "agent-a1"), dt.timedelta(minutes=-1))

    cert, key = ensure_server_certificate(tls_dir, "127.0.0.1")
    listener = FabricListener("127.0.0.1", free_port(), free_port(), cert, key, ca.file(tls_dir))
    hub = NatsServer(root / "nats", host="127.0.0.1", port=0, fabric=listener)
    hub.start({}, members)

    island_dir = root / "island"
    key_ = identity.make_key()
    island_cert = ca.issue(identity.make_csr(key_), leaf_subject, DAY, server_name=leaf_name(leaf_subject))
    me = Identity("agent-leaf-a", "leaf", "tenant-a", "lab", ["train"], "https://hub", None, None)
    IdentityDir(island_dir).save(me, key_, pem(island_cert), ca.pem)
    leaf = IslandLeaf(island_dir, hub_url=f"tls://127.0.0.1:{listener.leaf_port}", port=free_port())
    leaf.start()
    try:
        yield Fabric(hub, ca, certs, leaf, island_dir, members)
    finally:
        leaf.stop()
        hub.stop()


def run(coroutine):  # noqa: ANN001, ANN201 - a test's coroutine and its result
    return asyncio.run(asyncio.wait_for(coroutine, 30))


async def control_plane(fabric: Fabric) -> nats.NATS:
    """The control plane's connection, answering every agent request with the subject it came on."""
    nc = await nats.connect(fabric.hub.url, user=CONTROL_USER, password=fabric.hub.control_password)

    async def answer(msg) -> None:  # noqa: ANN001 - a nats Msg
        await nc.publish(msg.reply, json.dumps({"heard": msg.subject}).encode())

    await nc.subscribe(protocol.CONTROL_SUBSCRIPTION, queue=protocol.CONTROL_QUEUE_GROUP, cb=answer)
    await nc.flush()
    return nc


async def control_plane_hearing_streams(fabric: Fabric) -> tuple[nats.NATS, list[str]]:
    """`control_plane`, and the subjects of every agent stream message that reaches it, as they come."""
    control = await control_plane(fabric)
    streamed: list[str] = []

    async def on_stream(msg) -> None:  # noqa: ANN001 - a nats Msg
        streamed.append(msg.subject)

    await control.subscribe(f"{protocol.STREAM_PREFIX}.*.>", cb=on_stream)
    await control.flush()
    return control, streamed


async def agent(fabric: Fabric, name: str, url: str | None = None) -> tuple[nats.NATS, list[str]]:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    tenant, island = AGENTS[name]
    nc = await nats.connect(
        url or fabric.fabric_url,
        tls=fabric.context(name),
        tls_handshake_first=True,  # as agents do
        # an island's agent checks its leaf's name, never the loopback address every leaf would share
        tls_hostname=identity.leaf_server_name(tenant or PLATFORM_ORGANIZATION, island) if url else None,
        inbox_prefix=protocol.inbox_prefix(fabric.ids(name)),
        error_cb=on_error,
        allow_reconnect=False,
    )
    return nc, errors


async def until(condition: Callable[[], object], what: str, seconds: float = 10) -> None:
    """Wait for what the broker does in its own time (an error it sends, a message it delivers)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def until_delivered(publisher: nats.NATS, subject: str, heard: Callable[[], bool]) -> None:
    """Publish on `subject` until `heard()`: a subscription's interest reaches another account, or the hub through a
    leaf, a moment after the subscriber's flush."""
    for _ in range(100):
        await publisher.publish(subject, b"ping")
        await publisher.flush()
        try:
            await until(heard, f"a message on {subject}", 0.1)
            return
        except AssertionError:
            continue
    raise AssertionError(f"nothing published on {subject} was ever delivered")


async def until_leaf_carries(fabric: Fabric, nc: nats.NATS, agent_id: str) -> None:
    """The leaf's interest reaches the hub a moment after it connects."""
    for _ in range(100):
        try:
            await nc.request(protocol.agent_subject(agent_id, "lease"), b"{}", timeout=0.5)
            return
        except (NoRespondersError, TimeoutError):
            await asyncio.sleep(0.1)
    raise AssertionError("the island's leaf never carried a request to the hub")


def violated(errors: list[str], what: str) -> Callable[[], bool]:
    return lambda: any(f"permissions violation for {what}" in e for e in errors)


def test_an_enrolled_agent_reaches_the_control_plane_under_its_own_id_only(fabric: Fabric):
    async def scenario():
        control = await control_plane(fabric)
        a1, errors = await agent(fabric, "a1")
        reply = await a1.request(protocol.agent_subject("agent-a1", "lease"), b"{}", timeout=5)
        await a1.publish(protocol.agent_subject("agent-b1", "lease"), b"{}")  # posing as another tenant's agent
        await a1.flush()
        await until(violated(errors, 'publish to "adaptery.agent.agent-b1.lease"'), "the server's refusal")
        await a1.close()
        await control.close()
        return json.loads(reply.data), errors

    reply, errors = run(scenario())
    assert reply == {"heard": "adaptery.agent.agent-a1.lease"}
    assert any('permissions violation for publish to "adaptery.agent.agent-b1.lease"' in e for e in errors), errors


def test_infer_and_stream_subjects_cross_accounts_for_their_own_agent_only(fabric: Fabric):
    async def scenario():
        control, streamed = await control_plane_hearing_streams(fabric)
        a1, errors = await agent(fabric, "a1")
        requests: list[bytes] = []
        pinged = asyncio.Event()

        async def on_infer(msg) -> None:  # noqa: ANN001
            if msg.data == b"ping":
                pinged.set()
            else:
                requests.append(msg.data)

        await a1.subscribe(protocol.infer_subject("agent-a1"), cb=on_infer)
        await a1.subscribe(protocol.infer_cancel_subject("agent-a1"), cb=on_infer)
        await a1.flush()
        await until_delivered(control, protocol.infer_subject("agent-a1"), pinged.is_set)
        # The others' first: one publisher's messages arrive in order, so once a1 has its cancel, theirs would be in.
        for target in ("agent-b1", "agent-p1", "agent-a1"):
            await control.publish(protocol.infer_subject(target), target.encode())
        await control.publish(protocol.infer_cancel_subject("agent-a1"), b"cancel")
        await control.flush()
        await a1.publish(protocol.stream_subject("agent-a1", "req1"), b'{"seq": 0}')
        await a1.flush()
        await until(lambda: b"cancel" in requests and streamed, "a1's request, its cancel and its stream")
        await a1.subscribe(protocol.infer_subject("agent-b1"))  # another tenant's agent's requests
        await a1.flush()
        await until(violated(errors, 'subscription to "adaptery.infer.agent-b1"'), "the server's refusal")
        await a1.close()
        await control.close()
        return requests, streamed, errors

    requests, streamed, errors = run(scenario())
    assert requests == [b"agent-a1", b"cancel"]
    assert streamed == ["adaptery.stream.agent-a1.req1"]
    assert any('permissions violation for subscription to "adaptery.infer.agent-b1"' in e for e in errors), errors


def test_another_tenants_leaf_certificate_cannot_pose_as_an_islands_leaf(fabric: Fabric, tmp_path: Path):
    """An attacker's find: leaf certificates named 127.0.0.1, so tenant B's leaf certificate, served on a loopback
    port of tenant A's island machine (or the hub's), passed every agent's check. A leaf's certificate now names
    only its own island's leaf, and an island's agent checks that name."""
    key = identity.make_key()
    subject = identity.subject_name("tenant-b", "hpc", "agent-leaf-b")
    cert = fabric.ca.issue(identity.make_csr(key), subject, DAY, server_name=leaf_name(subject))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [identity.leaf_server_name("tenant-b", "hpc")]
    assert names.get_values_for_type(x509.IPAddress) == []
    (tmp_path / "b.pem").write_bytes(pem(cert))
    (tmp_path / "b.key").write_bytes(identity.key_pem(key))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "b.pem", tmp_path / "b.key")

    async def handshake(server_hostname: str) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        listening = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server)
        port = listening.sockets[0].getsockname()[1]
        try:
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=fabric.context("a2"), server_hostname=server_hostname
            )
            writer.close()
        finally:
            listening.close()

    a2 = Identity("agent-a2", "agent", "tenant-a", "lab", ["infer"], "https://hub", fabric.fabric_url, None)
    own_leaf = a2.tls_hostname("tls://127.0.0.1:4333")
    assert own_leaf == identity.leaf_server_name("tenant-a", "lab")
    for posing_as in (own_leaf, "127.0.0.1", "localhost"):
        with pytest.raises(ssl.SSLCertVerificationError):
            run(handshake(posing_as))
    run(handshake(identity.leaf_server_name("tenant-b", "hpc")))  # the certificate itself is good, for its island
    assert a2.tls_hostname(fabric.fabric_url) is None  # the hub, where it enrolled: its own name, as usual
    assert a2.tls_hostname("tls://hub.example.org:4222") is None


def test_an_agent_never_talks_in_the_clear_to_a_server_that_does_not_ask_for_tls(fabric: Fabric):
    """An attacker's find: a listener with no certificate at all, whose INFO only left out `tls_required`, got an
    enrolled agent's connection in plaintext (its leases, its streams) and passed for its island's leaf. An agent
    starts TLS before reading anything: such a server gets a TLS handshake it cannot answer, and nothing else."""
    import threading

    from adaptery.agent.link import AgentLink

    heard: list[bytes] = []
    ready = threading.Event()
    port = free_port()

    async def impostor() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b'INFO {"server_id":"fake","version":"2.15.1","max_payload":1048576,"headers":true}\r\n')
            await writer.drain()
            with contextlib.suppress(Exception):
                while data := await asyncio.wait_for(reader.read(4096), 5):
                    heard.append(data)
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", port)
        ready.set()
        await asyncio.sleep(4)
        server.close()

    thread = threading.Thread(target=lambda: asyncio.run(impostor()), daemon=True)
    thread.start()
    assert ready.wait(5)
    tenant, island = AGENTS["a2"]
    link = AgentLink(
        f"tls://127.0.0.1:{port}", "agent-a2", tls=fabric.context("a2"),
        tls_hostname=identity.leaf_server_name(tenant, island),
    )  # fmt: skip
    with pytest.raises(Exception):  # noqa: B017, PT011 - refused, however nats-py words it
        link.connect(timeout=2, enrollment_grace=0)
    thread.join(10)
    received = b"".join(heard)
    assert heard and received[:1] == b"\x16"  # a TLS ClientHello, first and alone
    assert b"CONNECT" not in received and b"agent-a2" not in received


def test_an_island_agent_reaches_the_hub_through_its_leaf_and_never_another_tenant(fabric: Fabric):
    leaf_url = fabric.leaf.url

    async def scenario():
        control, streamed = await control_plane_hearing_streams(fabric)
        # The island's own listener is its leaf's: whatever the island lets its machines publish there, the hub
        # binds the leaf to tenant A's account.
        a2, _ = await agent(fabric, "a2", leaf_url)
        await until_leaf_carries(fabric, a2, "agent-a2")
        refused = []
        for target in ("agent-b1", "agent-p1", "agent-a1-not-enrolled"):
            try:
                await a2.request(protocol.agent_subject(target, "lease"), b"{}", timeout=2)
            except NoRespondersError:
                refused.append(target)
        heard: list[str] = []

        async def on_any(msg) -> None:  # noqa: ANN001
            heard.append(msg.subject)

        await a2.subscribe("adaptery.>", cb=on_any)
        await a2.flush()
        await until_delivered(control, protocol.notify_subject("agent-a2"), lambda: heard)
        # The others' first: one publisher's messages arrive in order (through the leaf too), so once the last one
        # is in, any that crossed to the wrong tenant would be in as well.
        for target in ("agent-b1", "agent-p1", "agent-a2"):
            await control.publish(protocol.notify_subject(target), b"{}")
            await control.publish(protocol.infer_subject(target), b"{}")
        await control.flush()
        await a2.publish(protocol.stream_subject("agent-b1", "forged"), b"{}")  # another tenant's stream
        await a2.publish(protocol.stream_subject("agent-a2", "r1"), b"{}")
        await a2.flush()
        await until(lambda: "adaptery.infer.agent-a2" in heard and streamed, "a2's request and its stream")
        await a2.close()
        await control.close()
        return refused, heard, streamed

    refused, heard, streamed = run(scenario())
    assert refused == ["agent-b1", "agent-p1", "agent-a1-not-enrolled"]
    assert sorted(set(heard) - {"adaptery.stream.agent-a2.r1", "adaptery.stream.agent-b1.forged"}) == [
        "adaptery.infer.agent-a2",
        "adaptery.notify.agent-a2",
    ]
    assert streamed == ["adaptery.stream.agent-a2.r1"]


def test_an_island_leaf_reaches_the_hub_only_as_its_own_islands_agents(fabric: Fabric):
    """The operator of an island owns its leaf: here they run a nats-server of their own with the leaf's certificate
    and a listener without credentials (as an attacker did), then pose as the agents of another island of the same
    tenant. The hub binds the leaf to its island's account, which carries only that island's agents."""
    rogue = NatsProcess(fabric.island_dir, "rogue-leaf")
    port = free_port()
    store = IdentityDir(fabric.island_dir)
    files = {"cert_file": str(store.cert_path), "key_file": str(store.key_path), "ca_file": str(store.ca_path)}
    remote = {"urls": [f"tls://127.0.0.1:{fabric.hub.fabric.leaf_port}"], "tls": files}
    rogue.write(f"listen: 127.0.0.1:{port}\nleafnodes: {json.dumps({'remotes': [remote]})}\n")
    rogue.start()
    rogue.wait_listening("127.0.0.1", port, f"nats://127.0.0.1:{port}", "the operator's own leaf")

    async def scenario():
        control, streamed = await control_plane_hearing_streams(fabric)
        operator = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
        await until_leaf_carries(fabric, operator, "agent-a2")
        answers = {}
        for target in ("agent-a1", "agent-a3", "agent-b1", "agent-p1"):  # its own island's, then the others'
            try:
                reply = await operator.request(protocol.agent_subject(target, "lease"), b"{}", timeout=2)
                answers[target] = json.loads(reply.data)["heard"]
            except NoRespondersError:
                answers[target] = "no responders"
        heard: list[str] = []

        async def on_any(msg) -> None:  # noqa: ANN001
            heard.append(msg.subject)

        await operator.subscribe("adaptery.>", cb=on_any)
        await operator.flush()
        await until_delivered(control, protocol.notify_subject("agent-a2"), lambda: heard)
        for target in ("agent-a3", "agent-a2"):  # the other island's first: a2's last one is the barrier
            await control.publish(protocol.notify_subject(target), b"{}")
            await control.publish(protocol.infer_subject(target), b"{}")
        await control.flush()
        await operator.publish(protocol.stream_subject("agent-a3", "forged"), b"{}")
        await operator.publish(protocol.stream_subject("agent-a2", "r1"), b"{}")
        await operator.flush()
        await until(lambda: "adaptery.infer.agent-a2" in heard and streamed, "a2's request and its stream")
        await operator.close()
        a3, _ = await agent(fabric, "a3")  # the other island's agent itself, dialing the hub: served
        reply = await a3.request(protocol.agent_subject("agent-a3", "lease"), b"{}", timeout=5)
        answers["a3 itself"] = json.loads(reply.data)
        await a3.close()
        await control.close()
        return answers, heard, streamed

    try:
        answers, heard, streamed = run(scenario())
    finally:
        rogue.stop()
    assert answers == {
        "agent-a1": "adaptery.agent.agent-a1.lease",  # an agent of the leaf's own island (dialing the hub itself)
        "agent-a3": "no responders",  # tenant A's other island
        "agent-b1": "no responders",
        "agent-p1": "no responders",
        "a3 itself": {"heard": "adaptery.agent.agent-a3.lease"},
    }
    # Of a3's subjects the island hears only its own forged stream, echoed by its own server.
    assert {subject for subject in heard if "agent-a3" in subject} == {"adaptery.stream.agent-a3.forged"}
    assert streamed == ["adaptery.stream.agent-a2.r1"]


@pytest.mark.parametrize(
    "cert",
    [None, "rogue", "expired"],
    ids=["unenrolled", "self-signed-with-the-same-subject", "expired"],
)
def test_a_client_without_a_valid_certificate_of_our_ca_is_refused_in_the_handshake(fabric: Fabric, cert):
    async def scenario():
        context = fabric.context(cert) if cert else ssl.create_default_context(cafile=str(fabric.certs / "ca.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError, nats.errors.Error)):
            await nats.connect(
                fabric.fabric_url, tls=context, tls_handshake_first=True, allow_reconnect=False, connect_timeout=3
            )

    run(scenario())
    reason = {
        None: "client didn't provide a certificate",
        "rogue": "certificate signed by unknown authority",
        "expired": "certificate has expired",
    }[cert]
    deadline = time.monotonic() + 5  # the server logs the refusal in its own time
    while reason not in fabric.hub.fabric_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reason in fabric.hub.fabric_log()


def test_revoking_an_agent_closes_its_connection_at_once(fabric: Fabric):
    async def scenario():
        closed = asyncio.Event()

        async def on_closed() -> None:
            closed.set()

        p1 = await nats.connect(
            fabric.fabric_url,
            tls=fabric.context("p1"),
            tls_handshake_first=True,
            allow_reconnect=False,
            closed_cb=on_closed,
        )
        await p1.flush()
        remaining = [member for member in fabric.members if member.agent_id != "agent-p1"]
        await asyncio.get_running_loop().run_in_executor(None, fabric.hub.sync_agents, {}, remaining)
        await asyncio.wait_for(closed.wait(), 5)
        with pytest.raises((ssl.SSLError, ConnectionError, nats.errors.Error)):
            await nats.connect(
                fabric.fabric_url,
                tls=fabric.context("p1"),
                tls_handshake_first=True,
                allow_reconnect=False,
                connect_timeout=3,
            )

    run(scenario())


def test_an_island_joining_later_is_admitted_and_cut_off_when_revoked(fabric: Fabric, tmp_path: Path):
    # nats-server cannot reload its leafnode users: the hub restarts for them (this test runs last for that).
    subject = identity.subject_name("tenant-b", "hpc", "agent-leaf-b")
    key = identity.make_key()
    cert = fabric.ca.issue(identity.make_csr(key), subject, DAY, server_name=leaf_name(subject))
    me = Identity("agent-leaf-b", "leaf", "tenant-b", "hpc", ["train"], "https://hub", None, None)
    IdentityDir(tmp_path).save(me, key, pem(cert), fabric.ca.pem)
    joined = [*fabric.members, Member("agent-leaf-b", "tenant-b", "hpc", identity.subject_string(subject), leaf=True)]
    fabric.hub.sync_agents({}, joined)
    leaf = IslandLeaf(tmp_path, hub_url=f"tls://127.0.0.1:{fabric.hub.fabric.leaf_port}", port=free_port())
    leaf.start()
    try:

        async def asks_as_b1() -> dict:
            b1, _ = await agent(fabric, "b1", leaf.url)
            control = await control_plane(fabric)
            await until_leaf_carries(fabric, b1, "agent-b1")
            reply = await b1.request(protocol.agent_subject("agent-b1", "lease"), b"{}", timeout=5)
            await b1.close()
            await control.close()
            return json.loads(reply.data)

        assert run(asks_as_b1()) == {"heard": "adaptery.agent.agent-b1.lease"}
        refusals = fabric.hub.fabric_log().count("authentication error")
        fabric.hub.sync_agents({}, fabric.members)  # revoked: the leaf is refused at every redial

        async def asks_after_revocation() -> str:
            b1, _ = await agent(fabric, "b1", leaf.url)
            control = await control_plane(fabric)
            redial_refused = lambda: fabric.hub.fabric_log().count("authentication error") > refusals  # noqa: E731
            await until(redial_refused, "the leaf's redial to be refused")
            try:
                await b1.request(protocol.agent_subject("agent-b1", "lease"), b"{}", timeout=2)
                return "answered"
            except NoRespondersError:
                return "no responders"
            finally:
                await b1.close()
                await control.close()

        assert run(asks_after_revocation()) == "no responders"
        assert "authentication error" in fabric.hub.fabric_log()
    finally:
        leaf.stop()
