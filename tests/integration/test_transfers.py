"""Large artifacts of enrolled agents travel over HTTPS with presigned URLs, not the bus: a URL is handed out over
the bus only for a blob of work leased to the asking agent, and is refused, with a status that says why, once it
has expired, for another blob, tenant, job or agent, when its signature was touched, or an upload URL used again.
An upload is kept only when its hash matches; a download streams the blob the agent checks by hash."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import hashlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nats.aio.msg import Msg
from sqlalchemy import func, select

from adaptery.agent.bases import BaseStore
from adaptery.agent.transfers import HttpsTransfers
from adaptery.agent.vault import AgentVault
from adaptery.auth.transfers import CERTIFICATE_HEADER, PROOF_HEADER, Grant, TransferRefused, TransferSigner, prove
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.engine.demo_model import DEMO_MODEL_ID
from adaptery.messaging import identity, protocol
from adaptery.messaging.protocol import InferRequest
from adaptery.services import transfers
from adaptery.services.control_plane import RequestRefused
from tests.integration.conftest import Running
from tests.integration.test_tenancy_and_queue import make_tenant

DATA = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


@pytest.fixture
def settings_overrides() -> dict[str, object]:
    return {"embedded_agent": False}  # the jobs here are leased by the test, to the agents it enrolls


@dataclass
class Enrolled:
    agent_id: str
    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes

    def headers(self, url: str) -> dict[str, str]:
        token = url.split("token=", 1)[1]
        return {CERTIFICATE_HEADER: base64.b64encode(self.cert_pem).decode(), PROOF_HEADER: prove(self.key, token)}


@dataclass
class World:
    running: Running
    a: Enrolled  # tenant-scoped to the first tenant; job_a is leased to it
    b: Enrolled  # tenant-scoped to tenant "other"; job_b is leased to it
    job_a: str
    job_b: str
    other: str
    data_sha: str  # job_a's training file

    def ask(self, agent: Enrolled, **body: object) -> dict:
        msg = Msg(None, subject=protocol.agent_subject(agent.agent_id, "transfer"), data=json.dumps(body).encode())
        try:
            reply, _ = self.running.platform.control._handle(msg)
        except RequestRefused as exc:
            return {"error": str(exc)}
        return protocol.decode(reply)

    def url(self, agent: Enrolled, job: str, method: str = "GET", sha: str | None = None, **extra: object) -> str:
        body = {"purpose": "job", "id": job, "method": method, "sha256": sha or self.data_sha, "attempt": 1, **extra}
        answer = self.ask(agent, **body)
        assert "url" in answer, answer
        return answer["url"]


def enroll(running: Running, headers: dict[str, str], scope: str) -> Enrolled:
    made = running.client.post(
        "/api/admin/agents/tokens", json={"scope": scope, "roles": ["train"], "ttl_seconds": 600}, headers=headers
    )
    assert made.status_code == 200, made.text
    key = identity.make_key()
    body = {"token": made.json()["token"], "csr": identity.make_csr(key).decode(), "kind": "agent"}
    enrolled = running.client.post("/api/fabric/enroll", json=body)
    assert enrolled.status_code == 200, enrolled.text
    return Enrolled(enrolled.json()["agent_id"], key, enrolled.json()["certificate"].encode())


def leased_job(running: Running, tenant_id: str, agent_id: str) -> tuple[str, str]:
    platform = running.platform
    sha = platform.blobs.put_stream(tenant_id, [DATA]).sha256
    with platform.db.tenant(tenant_id) as s:
        record = m.File(id=new_id("file-"), filename="t.jsonl", purpose="fine-tune", bytes=len(DATA), sha256=sha)
        s.add(record)
        s.flush()
        job = m.FineTuningJob(
            id=new_id("ftjob-"), model=DEMO_MODEL_ID, training_file=record.id, seed=1, status="queued",
            hyperparameters={"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0},
            method={"type": "supervised"},
        )  # fmt: skip
        s.add(job)
    assert platform.queue.lease(agent_id, tenant_scope=tenant_id).job_id == job.id
    return job.id, sha


@pytest.fixture
def world(running: Running) -> Iterator[World]:
    other = make_tenant(running.platform.db, "other")
    a = enroll(running, running.auth(), "tenant")
    b = enroll(running, running.auth(), "platform")
    with running.platform.db.system() as s:  # agent b serves only tenant "other" (as an island of its own)
        s.get(m.Agent, b.agent_id).tenant_scope = other
    running.platform.sync_agents()
    job_a, sha = leased_job(running, running.tenant_id, a.agent_id)
    job_b, _ = leased_job(running, other, b.agent_id)
    yield World(running, a, b, job_a, job_b, other, sha)


def test_a_leased_jobs_blob_streams_over_https_to_its_agent_and_to_no_other(world: World):
    url = world.url(world.a, world.job_a)
    assert url.startswith(f"/api/fabric/transfers/{world.data_sha}?token=")
    response = world.running.client.get(url, headers=world.a.headers(url))
    assert response.status_code == 200, response.text
    assert response.content == DATA and hashlib.sha256(response.content).hexdigest() == world.data_sha
    assert response.headers["content-length"] == str(len(DATA))

    # The bus carries no artifact of an enrolled agent
    control = world.running.platform.control
    for verb, body in (("download", {"sha256": world.data_sha, "offset": 0}), ("upload", {})):
        msg = Msg(
            None, subject=protocol.job_subject(world.a.agent_id, world.job_a, verb), data=json.dumps(body).encode()
        )
        with pytest.raises(RequestRefused, match="artifacts travel over HTTPS"):
            control._handle(msg)

    # and a URL is handed out only for a blob of work leased to the asking agent
    refusals = [
        world.ask(world.a, purpose="job", id=world.job_b, method="GET", sha256=world.data_sha),  # another's job
        world.ask(world.b, purpose="job", id=world.job_a, method="GET", sha256=world.data_sha),  # another tenant's
        world.ask(world.a, purpose="job", id=world.job_a, method="GET", sha256="0" * 64),  # not the job's blob
        world.ask(world.a, purpose="job", id=world.job_a, method="GET", sha256=world.data_sha, attempt=2),
        world.ask(world.a, purpose="request", id="chatcmpl-x", method="GET", sha256=world.data_sha),  # no request
        world.ask(world.a, purpose="job", id=world.job_a, method="DELETE", sha256=world.data_sha),
    ]
    assert all("error" in refusal for refusal in refusals), refusals
    assert refusals[0]["error"] == refusals[1]["error"].replace(world.job_a, world.job_b)  # the same for both

    # An infer request's adapter: only while the request sent to this agent is open
    client = world.running.client
    request = InferRequest(
        "chatcmpl-t", DEMO_MODEL_ID, [1, 2], {}, adapter_key=world.data_sha,
        adapter_files={"adapter_model.safetensors": world.data_sha},
    )  # fmt: skip
    stream = asyncio.run(control.open_stream(world.a.agent_id, world.running.tenant_id, request, lambda raw: None))
    ask = {"purpose": "request", "id": "chatcmpl-t", "method": "GET", "sha256": world.data_sha}
    assert "error" in world.ask(world.b, **ask)  # sent to a, not b
    url = world.ask(world.a, **ask)["url"]
    assert client.get(url, headers=world.a.headers(url)).content == DATA
    control.close_stream(stream)
    answer = client.get(url, headers=world.a.headers(url))
    assert answer.status_code == 403 and "not part of a request sent to you" in answer.json()["error"]["message"]


def test_an_enrolled_agent_names_its_attempt_so_no_url_or_report_outlives_its_lease(world: World):
    # An attacker's find: a URL asked for without an attempt was fenced by the agent's id alone, so it worked again
    # when the job, leased to another agent meanwhile, came back to the same agent under a later attempt.
    refusal = "an agent enrolled by certificate names the attempt its lease is under"
    for method, extra in (("GET", {}), ("PUT", {"bytes": 3})):
        asked = world.ask(world.a, purpose="job", id=world.job_a, method=method, sha256=world.data_sha, **extra)
        assert asked == {"error": refusal}
    control = world.running.platform.control
    for verb, body in (("heartbeat", {}), ("events", {"events": []}), ("finish", {"state": "failed"})):
        subject = protocol.job_subject(world.a.agent_id, world.job_a, verb)
        with pytest.raises(RequestRefused, match=refusal):
            control._handle(Msg(None, subject=subject, data=json.dumps(body).encode()))
    assert world.running.platform.queue.holds(world.job_a, world.a.agent_id, 1)  # nothing above touched the lease

    # An attempt no lease can have is refused as final, not a database error the agent would retry (2**70 was)
    for wrong in (2**70, 2**31, -1, True, "1", 1.0):
        asked = world.ask(world.a, purpose="job", id=world.job_a, method="GET", sha256=world.data_sha, attempt=wrong)
        assert asked["error"].startswith("attempt must be the assignment's attempt number"), (wrong, asked)
    heartbeat = Msg(None, subject=protocol.job_subject(world.a.agent_id, world.job_a, "heartbeat"))
    heartbeat.data = json.dumps({"attempt": 2**70}).encode()
    with pytest.raises(RequestRefused, match="attempt must be"):
        control._handle(heartbeat)

    # Named, as the agent names it: granted for the attempt it holds, and for no other
    assert "url" in world.ask(world.a, purpose="job", id=world.job_a, method="GET", sha256=world.data_sha, attempt=1)
    assert "error" in world.ask(world.a, purpose="job", id=world.job_a, method="GET", sha256=world.data_sha, attempt=2)


def test_a_url_is_refused_expired_tampered_misdirected_or_in_another_agents_hands(world: World):
    client = world.running.client
    url = world.url(world.a, world.job_a)
    answer = client.get(url, headers=world.b.headers(url))  # b presents a's URL with its own certificate
    assert answer.status_code == 403 and "another agent" in answer.json()["error"]["message"]

    stolen = world.a.headers(url) | {PROOF_HEADER: prove(world.b.key, url.split("token=")[1])}
    answer = client.get(url, headers=stolen)  # a's certificate, but not a's key
    assert answer.status_code == 403 and "not signed by the certificate's key" in answer.json()["error"]["message"]

    answer = client.get(url)  # no certificate at all
    assert answer.status_code == 401

    # A self-made certificate with a's subject and the key that signs the proof: not the platform CA's
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.load_pem_x509_certificate(world.a.cert_pem).subject
    now = time.time()
    rogue = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(rogue_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.fromtimestamp(now - 60, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(now + 3600, dt.UTC))
        .sign(rogue_key, hashes.SHA256())
    )  # fmt: skip
    rogue_agent = Enrolled(world.a.agent_id, rogue_key, rogue.public_bytes(serialization.Encoding.PEM))
    answer = client.get(url, headers=rogue_agent.headers(url))
    assert answer.status_code == 401 and "not issued by this platform's CA" in answer.json()["error"]["message"]

    a, signer = world.a, world.running.platform.transfers
    path, token = url.split("?token=")
    payload, mac = token.split(".")
    grant = Grant(**json.loads(base64.urlsafe_b64decode(payload + "==")))

    expired = signer.sign(dataclasses.replace(grant, expires_at=int(time.time()) - 1))
    answer = client.get(f"{path}?token={expired}", headers=a.headers(f"{path}?token={expired}"))
    assert answer.status_code == 410 and "expired" in answer.json()["error"]["message"]

    flipped = mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB")
    answer = client.get(f"{path}?token={payload}.{flipped}", headers=a.headers(f"{path}?token={payload}.{flipped}"))
    assert answer.status_code == 403 and "tampered" in answer.json()["error"]["message"]

    # Its fields edited to name the other tenant's job, or a longer life: the MAC no longer matches
    for edit in ({"tenant_id": world.other, "work_id": world.job_b}, {"expires_at": grant.expires_at + 3600}):
        forged = dataclasses.asdict(grant) | edit
        forged_payload = base64.urlsafe_b64encode(json.dumps(forged, sort_keys=True).encode()).rstrip(b"=").decode()
        forged_url = f"{path}?token={forged_payload}.{mac}"
        answer = client.get(forged_url, headers=a.headers(forged_url))
        assert answer.status_code == 403 and "tampered" in answer.json()["error"]["message"], edit

    other_blob = f"/api/fabric/transfers/{'1' * 64}?token={token}"
    answer = client.get(other_blob, headers=a.headers(other_blob))
    assert answer.status_code == 403 and "another blob" in answer.json()["error"]["message"]

    answer = client.put(url, content=DATA, headers=a.headers(url))  # a GET URL does not upload
    assert answer.status_code == 403 and "for GET" in answer.json()["error"]["message"]

    # Once the job is no longer this agent's (released), the URL it was given for it is refused
    world.running.platform.queue.release(world.job_a, a.agent_id, "moved", 1)
    answer = client.get(url, headers=a.headers(url))
    assert answer.status_code == 403 and "not leased to you" in answer.json()["error"]["message"]

    # A revoked agent's URLs die with it
    url_b = world.url(world.b, world.job_b)
    assert client.get(url_b, headers=world.b.headers(url_b)).status_code == 200
    revoked = client.post(f"/api/admin/agents/{world.b.agent_id}/revoke", headers=world.running.auth())
    assert revoked.status_code == 200, revoked.text
    answer = client.get(url_b, headers=world.b.headers(url_b))
    assert answer.status_code == 403 and "unrevoked" in answer.json()["error"]["message"]


def test_an_upload_is_kept_only_when_its_hash_matches_and_its_url_is_used_once(world: World):
    client, blobs, tenant = world.running.client, world.running.platform.blobs, world.running.tenant_id
    weights = b"adapter weights " * 70_000  # over one megabyte: streamed in pieces
    sha = hashlib.sha256(weights).hexdigest()

    damaged_url = world.url(world.a, world.job_a, "PUT", sha, bytes=len(weights))
    answer = client.put(damaged_url, content=weights[:-1] + b"!", headers=world.a.headers(damaged_url))
    assert answer.status_code == 422 and "nothing was kept" in answer.json()["error"]["message"]
    assert not blobs.exists(tenant, sha)

    url = world.url(world.a, world.job_a, "PUT", sha, bytes=len(weights))
    answer = client.put(url, content=weights, headers=world.a.headers(url))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"object": "blob", "sha256": sha, "bytes": len(weights)}
    assert b"".join(blobs.iter_bytes(tenant, sha)) == weights and not blobs.exists(world.other, sha)

    replay = client.put(url, content=weights, headers=world.a.headers(url))
    assert replay.status_code == 409 and "already used" in replay.json()["error"]["message"]

    too_big = world.ask(world.a, purpose="job", id=world.job_a, method="PUT", sha256=sha, bytes=1 << 60)
    assert "at most" in too_big["error"]
    longer_url = world.url(world.a, world.job_a, "PUT", sha, bytes=10)
    answer = client.put(longer_url, content=weights, headers=world.a.headers(longer_url))
    assert answer.status_code == 413


def test_a_used_upload_url_stays_used_after_a_restart_and_in_another_process(world: World):
    """A used upload URL is remembered in the database, not in the process: a control plane that restarts (a new
    signer with the same key, nothing in memory) or a second one beside it refuses the replay (409)."""
    client, platform = world.running.client, world.running.platform
    weights = b"checkpoint " * 1000
    sha = hashlib.sha256(weights).hexdigest()
    url = world.url(world.a, world.job_a, "PUT", sha, bytes=len(weights))
    assert client.put(url, content=weights, headers=world.a.headers(url)).status_code == 200

    platform.transfers = TransferSigner(platform.transfers.key, platform.transfers.lifetime_seconds)  # a restart
    replay = client.put(url, content=weights, headers=world.a.headers(url))
    assert replay.status_code == 409 and "already used" in replay.json()["error"]["message"]

    # Uses of one fresh URL at once (each on its own connection, as processes are): the unique key lets one win.
    _, grant = platform.transfers.grant(method="PUT", sha256=sha, tenant_id=world.running.tenant_id, purpose="job",
                                        work_id=world.job_a, attempt=1, agent_id=world.a.agent_id, size=1)  # fmt: skip

    def use(_: int) -> int:
        try:
            transfers.spend(platform.db, grant, now=time.time())
        except TransferRefused as refused:
            return refused.status
        return 200

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(use, range(4))) == [200, 409, 409, 409]

    # Spent nonces are kept only until their URL expires: a later spend prunes them.
    transfers.spend(platform.db, dataclasses.replace(grant, nonce="later"), now=grant.expires_at + 1)
    with platform.db.system() as s:
        assert s.scalar(select(func.count()).select_from(m.SpentTransferNonce)) == 1


class BusOf:
    """An agent's link whose bus is the control plane's responder in this process and whose HTTPS client is the
    test's (the same routes, without a socket)."""

    def __init__(self, world: World, agent: Enrolled, identity_dir: Path) -> None:
        self.world, self.agent_id = world, agent.agent_id
        store = identity.IdentityDir(identity_dir)
        me = identity.Identity(agent.agent_id, "agent", None, "default", ["infer"], "http://testserver", None, None)
        store.save(me, agent.key, agent.cert_pem, world.running.platform.trust_pem())
        self.transfers = HttpsTransfers("http://testserver", identity_dir)
        self.transfers.client = world.running.client
        self.downloads = 0
        fetch = self.transfers.download

        def counted(*args: object) -> Path:
            self.downloads += 1
            return fetch(*args)

        self.transfers.download = counted  # type: ignore[method-assign]

    def call(self, subject: str, body: dict) -> dict:
        msg = Msg(None, subject=subject, data=json.dumps(body).encode())
        try:
            reply, _ = self.world.running.platform.control._handle(msg)
        except RequestRefused as exc:
            raise protocol.RemoteError(str(exc)) from exc
        return protocol.decode(reply)


def test_a_base_is_fetched_once_from_the_platform_verified_and_sealed_at_rest(world: World, tmp_path: Path):
    link = BusOf(world, world.a, tmp_path / "identity")
    vault = AgentVault(tmp_path / "agent.key", tmp_path / "scratch")
    served = BaseStore(tmp_path / "bases", vault).ensure(link, DEMO_MODEL_ID)  # type: ignore[arg-type]
    origin = Path(world.running.platform.settings.models_dir / DEMO_MODEL_ID)
    wanted = {p.name for p in origin.iterdir() if p.suffix in (".json", ".safetensors", ".jinja", ".txt", ".model")}
    assert {p.name for p in served.iterdir()} == wanted and link.downloads == len(wanted)
    for name in wanted:
        assert (served / name).read_bytes() == (origin / name).read_bytes()
    sealed = [p for p in (tmp_path / "bases").rglob("*") if p.is_file()]
    weights = (origin / "model.safetensors").read_bytes()
    assert len(sealed) == len(wanted) and all(weights[1000:1064] not in p.read_bytes() for p in sealed)

    # The agent restarts (a new scratch): the sealed copy is unsealed and checked, nothing is fetched again;
    # a sealed file that was altered is fetched anew
    victim = next(p for p in sealed if p.name == "model.safetensors")
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    again = BaseStore(tmp_path / "bases", AgentVault(tmp_path / "agent.key", tmp_path / "scratch-2"))
    link.downloads = 0
    served = again.ensure(link, DEMO_MODEL_ID)  # type: ignore[arg-type]
    assert link.downloads == 1 and (served / "model.safetensors").read_bytes() == weights

    # Only enrolled agents get a base's URLs, only for its files, and an unknown base is refused
    listing = link.call(protocol.agent_subject(world.a.agent_id, "base"), {"base_id": DEMO_MODEL_ID})["files"]
    url = listing["model.safetensors"]["url"]
    misdirected = url.replace(listing["model.safetensors"]["sha256"], listing["config.json"]["sha256"], 1)
    answer = world.running.client.get(misdirected, headers=world.a.headers(misdirected))
    assert answer.status_code == 403
    with pytest.raises(protocol.RemoteError, match="no base model"):
        link.call(protocol.agent_subject(world.a.agent_id, "base"), {"base_id": "nobody/nothing"})
    world.running.platform.control.certified.discard(world.a.agent_id)  # as a password agent is
    with pytest.raises(protocol.RemoteError, match="enrolled by certificate"):
        link.call(protocol.agent_subject(world.a.agent_id, "base"), {"base_id": DEMO_MODEL_ID})
