"""The control plane's answers to agents about blobs: computed in the tenant of the job leased to the asking agent,
and the same whatever other tenants hold (an agent of one tenant cannot learn whether another holds a hash)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from nats.aio.msg import Msg
from sqlalchemy.exc import OperationalError

from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.messaging import protocol
from adaptery.services.control_plane import ControlPlane, RequestRefused
from adaptery.services.errors import NotFound
from adaptery.services.queue import JobQueue
from adaptery.storage.blobs import BlobStore
from tests.integration.test_tenancy_and_queue import make_blobs, make_tenant, queued_job


@dataclass
class Leased:
    control: ControlPlane
    blobs: BlobStore
    a: str  # tenant a: its job `job_a` is leased to "agent-a", which serves only tenant a
    b: str  # tenant b: its job `job_b` is leased to "agent-b"
    job_a: str
    job_b: str
    b_only: str  # a blob that only tenant b holds (say, weights everyone knows the hash of)


def file_with_blob(db, blobs: BlobStore, tenant_id: str) -> str:
    sha = blobs.put_stream(tenant_id, [b'{"messages": []}\n']).sha256
    with db.tenant(tenant_id) as s:
        s.add(m.File(id=new_id("file-"), filename="t.jsonl", purpose="fine-tune", bytes=17, sha256=sha))
    with db.tenant(tenant_id) as s:
        return s.query(m.File).filter_by(sha256=sha).one().id


@pytest.fixture
def leased(db, tmp_path) -> Iterator[Leased]:
    with db.system() as s:
        s.add(m.BaseModel(id="base", ref="/nowhere", display_name="b", finetune_defaults={}))
    blobs = make_blobs(db, tmp_path)
    a, b = make_tenant(db, "a"), make_tenant(db, "b")
    job_a = queued_job(db, a, file_with_blob(db, blobs, a))
    job_b = queued_job(db, b, file_with_blob(db, blobs, b))
    queue = JobQueue(db, blobs, lease_seconds=60, max_attempts=2)
    assert queue.lease("agent-a", tenant_scope=a).job_id == job_a
    assert queue.lease("agent-b", tenant_scope=b).job_id == job_b
    b_only = blobs.put_stream(b, [b"weights only tenant b holds"]).sha256
    control = ControlPlane(
        queue,
        blobs,
        tmp_path / "uploads",
        url="nats://127.0.0.1:1",  # never connected: the tests call the responder directly
        user=None,
        password=None,
        max_upload_bytes=1 << 20,
        agent_scope={"agent-a": a, "agent-b": b},
    )
    control.staging_dir.mkdir()
    yield Leased(control, blobs, a, b, job_a, job_b, b_only)
    control._workers.shutdown()
    control._loop.close()


def ask(control: ControlPlane, agent_id: str, job_id: str, verb: str, body: Any = b"{}", **headers: str) -> dict:
    """What the agent receives (as `ControlPlane._on_request` sends it: an answer, or the refusal)."""
    data = body if isinstance(body, bytes) else protocol.encode(body)
    msg = Msg(None, subject=protocol.job_subject(agent_id, job_id, verb), data=data, headers=headers or None)
    try:
        reply, _ = control._handle(msg)
    except RequestRefused as exc:
        return {"error": str(exc)}
    return {"data": reply} if verb == "download" else protocol.decode(reply)


def adapter_files(sha: str) -> dict[str, str]:
    return {"adapter_model.safetensors": sha, "adapter_config.json": sha}


def unknown_hash() -> str:
    return hashlib.sha256(os.urandom(16)).hexdigest()


def test_checkpoint_and_finish_answer_the_same_for_a_hash_another_tenant_holds(leased):
    """The probe: agent-a names tenant b's job and a hash. Before, a hash b held got past the blob check (and the
    lease check answered), one b did not hold was refused as not uploaded: an oracle for b's blobs."""
    control, known, unknown = leased.control, leased.b_only, unknown_hash()
    for verb, body in (
        ("checkpoint", lambda sha: {"step": 2, "files": adapter_files(sha)}),
        ("finish", lambda sha: {"state": "succeeded", "files": adapter_files(sha), "result": {}}),
        ("download", lambda sha: {"sha256": sha, "offset": 0}),
    ):
        replies = [ask(control, "agent-a", leased.job_b, verb, body(sha)) for sha in (known, unknown)]
        assert replies[0] == replies[1] == {"error": f"job {leased.job_b} is not leased to you"}, verb
    # On its own job, tenant b's blob is one tenant a does not have, like any unknown hash.
    for verb, body in (
        ("checkpoint", lambda sha: {"step": 2, "files": adapter_files(sha)}),
        ("finish", lambda sha: {"state": "succeeded", "files": adapter_files(sha), "result": {}}),
    ):
        replies = [ask(control, "agent-a", leased.job_a, verb, body(sha)) for sha in (known, unknown)]
        assert replies[0]["error"].replace(known, "<sha>") == replies[1]["error"].replace(unknown, "<sha>"), verb
        assert "was not uploaded" in replies[0]["error"]
    with control.queue.db.system() as s:  # and nothing was recorded or finished
        assert s.query(m.JobCheckpoint).count() == 0
        assert {j.status for j in s.query(m.FineTuningJob)} == {"running"}


def test_an_upload_is_stored_only_in_the_tenant_of_the_job_leased_to_the_agent(leased):
    control, data = leased.control, b"adapter weights from agent-a"
    sha = hashlib.sha256(data).hexdigest()
    upload_id = uuid.uuid4().hex
    begun = ask(
        control,
        "agent-a",
        leased.job_a,
        "upload",
        data[:10],
        **{protocol.UPLOAD_HEADER: upload_id, protocol.OFFSET_HEADER: "0"},
    )
    assert begun == {}
    # Begun on its own job, finished naming tenant b's: refused, and nothing lands in b's store.
    headers = {protocol.UPLOAD_HEADER: upload_id, protocol.OFFSET_HEADER: "10", protocol.SHA256_HEADER: sha}
    finished = ask(control, "agent-a", leased.job_b, "upload", data[10:], **headers)
    assert finished == {"error": f"job {leased.job_b} is not leased to you"}
    assert not leased.blobs.exists(leased.b, sha) and not leased.blobs.exists(leased.a, sha)
    assert list(control.staging_dir.iterdir()) == []  # the staged part is not left behind

    # The ordinary path: upload to its own job, then a checkpoint naming the blob.
    headers = {protocol.UPLOAD_HEADER: uuid.uuid4().hex, protocol.OFFSET_HEADER: "0", protocol.SHA256_HEADER: sha}
    assert ask(control, "agent-a", leased.job_a, "upload", data, **headers) == {"sha256": sha}
    assert leased.blobs.exists(leased.a, sha) and not leased.blobs.exists(leased.b, sha)
    recorded = ask(control, "agent-a", leased.job_a, "checkpoint", {"step": 2, "files": adapter_files(sha)})
    assert recorded == {"checkpoint": f"ftckpt-{leased.job_a.removeprefix('ftjob-')}-2"}


def error_of(control: ControlPlane, agent_id: str, job_id: str, verb: str, body: bytes) -> protocol.RemoteError:
    """The error the agent's link raises for the reply `ControlPlane._on_request` publishes."""
    published: list[dict[str, str] | None] = []

    class Connection:
        async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
            published.append(headers)

    control._nc = Connection()
    reply = f"{protocol.inbox_prefix(agent_id)}.1"
    msg = Msg(None, subject=protocol.job_subject(agent_id, job_id, verb), reply=reply, data=body)
    control._loop.run_until_complete(control._on_request(msg))
    control._loop.run_until_complete(asyncio.gather(*control._tasks))  # the request is worked on in a task
    error = protocol.remote_error(published[0])
    assert error is not None, verb
    return error


def test_a_refusal_is_final_and_a_fault_that_may_pass_is_retryable(leased, monkeypatch):
    control = leased.control
    someone_elses = error_of(control, "agent-a", leased.job_b, "checkpoint", protocol.encode({"step": 1}))
    assert str(someone_elses) == f"job {leased.job_b} is not leased to you" and not someone_elses.retryable
    assert not error_of(control, "agent-a", leased.job_a, "events", b"not json").retryable

    def locked(*args: object) -> str:
        raise OperationalError("UPDATE fine_tuning_jobs ...", {}, sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr(control.queue, "heartbeat", locked)
    busy = error_of(control, "agent-a", leased.job_a, "heartbeat", b"{}")
    assert busy.retryable and "database is locked" in str(busy)

    def missing(*args: object) -> str:
        raise NotFound("No such job")

    monkeypatch.setattr(control.queue, "heartbeat", missing)
    assert not error_of(control, "agent-a", leased.job_a, "heartbeat", b"{}").retryable

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a fault of the control plane's own")

    monkeypatch.setattr(control.queue, "fail", broken)
    unexpected = error_of(control, "agent-a", leased.job_a, "finish", protocol.encode({"state": "failed"}))
    assert unexpected.retryable and "a fault of the control plane's own" in str(unexpected)


def test_an_older_attempt_of_the_same_agent_may_not_move_the_jobs_blobs(leased):
    """The job came back to agent-a (restarted, or back from a partition) as attempt 2: attempt 1's uploads and
    downloads are refused, finally, as its heartbeats and finishes are; attempt 2's, and an agent's from before
    attempt numbers (fenced by its id alone), go through."""
    control, job = leased.control, leased.job_a
    queue = control.queue
    with queue.db.system() as s:
        s.get(m.FineTuningJob, job).lease_expires_at = 0.0
    assert queue.recover() == 1
    assert queue.lease("agent-a", tenant_scope=leased.a).attempt == 2
    with queue.db.system() as s:
        training = s.get(m.File, s.get(m.FineTuningJob, job).training_file).sha256
    data = b"adapter weights of attempt 1"
    sha = hashlib.sha256(data).hexdigest()

    def upload(attempt: str | None, offset: int = 0, chunk: bytes = data, **more: str) -> dict:
        headers = {protocol.UPLOAD_HEADER: "1" * 32, protocol.OFFSET_HEADER: str(offset), **more}
        if attempt is not None:
            headers[protocol.ATTEMPT_HEADER] = attempt
        return ask(control, "agent-a", job, "upload", chunk, **headers)

    over = {"error": f"job {job} is not leased to you"}
    assert ask(control, "agent-a", job, "download", {"sha256": training, "offset": 0, "attempt": 1}) == over
    assert upload("1") == over  # its first chunk
    assert upload("2", chunk=data[:5]) == {}  # begun under attempt 2, ended under attempt 1: refused
    assert upload("1", 5, data[5:], **{protocol.SHA256_HEADER: sha}) == over
    assert not leased.blobs.exists(leased.a, sha) and list(control.staging_dir.iterdir()) == []
    for verb, body in (
        ("checkpoint", {"step": 2, "files": adapter_files(training), "attempt": 1}),
        ("finish", {"state": "succeeded", "files": adapter_files(training), "result": {}, "attempt": 1}),
    ):
        assert ask(control, "agent-a", job, verb, body) == over, verb
    refused = error_of(control, "agent-a", job, "download", protocol.encode({"sha256": training, "attempt": 1}))
    assert str(refused) == over["error"] and not refused.retryable
    bad = upload("one")
    assert bad == {"error": "attempt must be the assignment's attempt number, not 'one'"}

    assert ask(control, "agent-a", job, "download", {"sha256": training, "offset": 0, "attempt": 2})["data"]
    assert ask(control, "agent-a", job, "download", {"sha256": training, "offset": 0})["data"]
    assert upload("2", **{protocol.SHA256_HEADER: sha}) == {"sha256": sha}
    assert upload(None, **{protocol.SHA256_HEADER: sha}) == {"sha256": sha}
    with queue.db.system() as s:
        assert s.query(m.JobCheckpoint).count() == 0
        assert s.get(m.FineTuningJob, job).status == "running"
