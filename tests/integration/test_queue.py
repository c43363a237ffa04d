"""The queue's fairness, priorities and checkpoints, and its NATS face: what an agent may and may not do."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import socket
import sqlite3
import time
import zipfile

import nats
import pytest
from nats.errors import AuthorizationError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from adaptery.agent.link import AgentLink, LinkDown
from adaptery.db import models as m
from adaptery.messaging import protocol
from adaptery.services import agents as agent_records
from adaptery.services import finetuning, limits
from adaptery.services.queue import JobQueue
from tests.conftest import SAMPLE_CHAT
from tests.integration.test_tenancy_and_queue import add_file, make_blobs, make_tenant, queued_job
from tests.security.conftest import lora_zip


@pytest.fixture
def two_tenants(db, tmp_path):
    with db.system() as s:
        s.add(m.BaseModel(id="base", ref="/nowhere", display_name="b", finetune_defaults={}))
    a, b = make_tenant(db, "a"), make_tenant(db, "b")
    return a, add_file(db, a), b, add_file(db, b), make_blobs(db, tmp_path)


def tenant_of(db, job_id: str) -> str:
    with db.system() as s:
        return s.get(m.FineTuningJob, job_id).tenant_id


def test_two_sessions_writing_one_jobs_events_number_them_apart(db, two_tenants):
    """The API (a pause, a cancel) and the worker write a job's events from their own sessions at once:
    each loaded the job with the same counter, and neither may reuse the other's number."""
    a, file_a, *_ = two_tenants
    job_id = queued_job(db, a, file_a)
    with db.system() as worker, db.tenant(a) as api:
        worker_job, api_job = worker.get(m.FineTuningJob, job_id), api.get(m.FineTuningJob, job_id)
        assert worker_job.next_event_seq == api_job.next_event_seq == 0
        finetuning.add_event(api, api_job, "Pausing at the user's request: saving a checkpoint")
        api.commit()
        finetuning.add_event(worker, worker_job, "Checkpoint saved at step 2")
        finetuning.add_event(worker, worker_job, "Job paused")
    with db.system() as s:
        events = s.scalars(select(m.JobEvent).where(m.JobEvent.job_id == job_id).order_by(m.JobEvent.seq))
        assert [(e.seq, e.message[:8]) for e in events] == [(0, "Pausing "), (1, "Checkpoi"), (2, "Job paus")]
        assert s.get(m.FineTuningJob, job_id).next_event_seq == 3


def test_tenants_take_turns_and_none_runs_more_than_its_quota(db, two_tenants):
    a, file_a, b, file_b, blobs = two_tenants
    for _ in range(4):
        queued_job(db, a, file_a)  # tenant a queues first and more
    queued_job(db, b, file_b)
    queue = JobQueue(db, blobs, lease_seconds=60, max_attempts=2, tenant_concurrency=2)
    order = [tenant_of(db, queue.lease(f"agent-{i}").job_id) for i in range(3)]
    assert order.count(b) == 1 and order[:2] in ([a, b], [b, a])  # b is not starved behind a's backlog
    assert order[2] == a
    assert queue.lease("agent-9") is None  # a runs 2 = its quota; b has nothing queued
    with db.system() as s:
        running = s.query(m.FineTuningJob).filter_by(tenant_id=a, status="running").first()
        job_id, owner = running.id, running.lease_owner
    queue.fail(job_id, owner, "done")
    assert tenant_of(db, queue.lease("agent-10").job_id) == a  # a slot freed: a's next job runs


def test_higher_priority_goes_first_within_a_tenant(db, two_tenants):
    a, file_a, _, _, blobs = two_tenants
    old = queued_job(db, a, file_a)
    urgent = queued_job(db, a, file_a)
    with db.system() as s:
        s.get(m.FineTuningJob, urgent).priority = 5
    queue = JobQueue(db, blobs, lease_seconds=60, max_attempts=2)
    assert [queue.lease("x").job_id, queue.lease("y").job_id] == [urgent, old]


def test_an_agent_scoped_to_a_tenant_takes_only_its_jobs(db, two_tenants):
    a, file_a, b, _, blobs = two_tenants
    queued_job(db, a, file_a)
    queue = JobQueue(db, blobs, lease_seconds=60, max_attempts=2)
    assert queue.lease("scoped", tenant_scope=b) is None
    assert queue.lease("any").tenant_id == a


def _checkpoint_files(blobs, tenant_id: str, step: int) -> dict[str, str]:
    files = {
        "adapter_model.safetensors": f"weights {step}".encode(),
        "adapter_config.json": b"{}",
        "trainer_state.json": f'{{"global_step": {step}}}'.encode(),
        "optimizer.pt": f"optimizer {step}".encode(),
    }
    return {name: blobs.put_stream(tenant_id, [data]).sha256 for name, data in files.items()}


def _running_with_checkpoint(db, tenant_id: str, file_id: str, blobs) -> tuple[JobQueue, str, dict[str, str]]:
    """A job leased by "agent" that recorded a resumable checkpoint at step 2."""
    job_id = queued_job(db, tenant_id, file_id)
    queue = JobQueue(db, blobs, lease_seconds=60, max_attempts=2)
    queue.lease("agent")
    files = _checkpoint_files(blobs, tenant_id, 2)
    queue.record_checkpoint(job_id, "agent", step=2, epoch=1.0, metrics={"train_loss": 1.5}, manifest=files)
    return queue, job_id, files


def _requeue(db, job_id: str) -> None:
    """As `recover` does for a lost agent."""
    with db.system() as s:
        job = s.get(m.FineTuningJob, job_id)
        job.status, job.lease_owner = "queued", None


def test_a_new_resumable_checkpoint_keeps_only_the_adapter_of_older_ones(db, two_tenants):
    a, file_a, _, _, blobs = two_tenants
    queue, job_id, first = _running_with_checkpoint(db, a, file_a, blobs)
    second = _checkpoint_files(blobs, a, 4)
    queue.record_checkpoint(job_id, "agent", step=4, epoch=2.0, metrics={"train_loss": 0.5}, manifest=second)
    with db.system() as s:
        rows = {c.step: c for c in s.query(m.JobCheckpoint).filter_by(job_id=job_id)}
        assert set(rows[2].manifest) == {"adapter_model.safetensors", "adapter_config.json"}
        assert not rows[2].resumable and rows[4].resumable and rows[4].metrics["train_loss"] == 0.5
        assert rows[4].model_name.endswith(":ckpt-step-4")
    assert not blobs.exists(a, first["optimizer.pt"]) and blobs.exists(a, first["adapter_model.safetensors"])
    assert blobs.exists(a, second["optimizer.pt"])
    _requeue(db, job_id)  # and is sent the latest checkpoint to resume from
    assignment = queue.lease("another")
    assert (
        assignment.checkpoint.step == 4 and assignment.checkpoint.files["optimizer.pt"].sha256 == second["optimizer.pt"]
    )
    with pytest.raises(ValueError, match="incomplete"):
        queue.record_checkpoint(job_id, "another", step=6, epoch=3.0, metrics={}, manifest={"optimizer.pt": "0" * 64})


def test_a_runs_phase_reaches_the_job_events_data(db, two_tenants):
    a, file_a, _, _, blobs = two_tenants
    job_id = queued_job(db, a, file_a)
    queue = JobQueue(db, blobs, lease_seconds=60, max_attempts=2)
    queue.lease("agent")
    said = [
        {"type": "message", "level": "info", "message": "Loading the base model", "phase": "loading_base"},
        {"type": "message", "level": "info", "message": "odd", "phase": "<b>made up</b>"},
    ]
    queue.report(job_id, "agent", said)
    with db.system() as s:
        data = {e.message: e.data for e in s.query(m.JobEvent).filter_by(job_id=job_id)}
    assert data["Loading the base model"] == {"phase": "loading_base"} and data["odd"] is None


def _record(queue: JobQueue, blobs, tenant_id: str, job_id: str, step: int, metrics: dict) -> dict[str, str]:
    files = _checkpoint_files(blobs, tenant_id, step)
    queue.record_checkpoint(job_id, "agent", step=step, epoch=float(step), metrics=metrics, manifest=files)
    return files


def test_a_job_keeps_its_latest_three_checkpoints_and_the_best_and_releases_the_others_blobs(db, two_tenants):
    a, file_a, _, _, blobs = two_tenants
    job_id = queued_job(db, a, file_a)
    queue = JobQueue(db, blobs, lease_seconds=60, max_attempts=2)
    queue.lease("agent")
    losses = {1: 1.0, 2: 0.2, 3: 0.9, 4: 0.8, 5: 0.7, 6: 0.6}  # the best training loss is step 2's
    written = {step: _record(queue, blobs, a, job_id, step, {"train_loss": loss}) for step, loss in losses.items()}
    with db.system() as s:
        kept = {c.step for c in s.query(m.JobCheckpoint).filter_by(job_id=job_id)}
    assert kept == {2, 4, 5, 6}
    for step in (1, 3):  # gone with their files; the files every checkpoint shares stay
        assert not blobs.exists(a, written[step]["adapter_model.safetensors"])
    assert blobs.exists(a, written[2]["adapter_model.safetensors"]) and blobs.exists(a, written[6]["optimizer.pt"])
    assert blobs.exists(a, written[1]["adapter_config.json"])


def test_keep_checkpoints_keeps_more_and_the_best_is_by_validation_loss(db, two_tenants):
    a, file_a, _, _, blobs = two_tenants
    job_id = queued_job(db, a, file_a)
    with db.system() as s:
        job = s.get(m.FineTuningJob, job_id)
        job.method = {"type": "supervised", "supervised": {"hyperparameters": {"keep_checkpoints": 4}}}
    queue = JobQueue(db, blobs, lease_seconds=60, max_attempts=2)
    queue.lease("agent")
    for step in range(1, 8):  # training loss falls throughout; validation loss is lowest at step 1
        _record(queue, blobs, a, job_id, step, {"train_loss": 1.0 / step, "eval_loss": 0.5 if step == 1 else 0.9})
    with db.system() as s:
        assert {c.step for c in s.query(m.JobCheckpoint).filter_by(job_id=job_id)} == {1, 4, 5, 6, 7}


def test_a_checkpoint_that_never_commits_leaves_the_one_before_whole(db, two_tenants):
    """CI caught it: the server was killed while the step-4 checkpoint was being recorded, after the step-2
    checkpoint's optimizer state was deleted from disk but before the transaction committed. The database
    still named step 2 as the one to resume from, and every lease failed on its missing file."""
    a, file_a, _, _, blobs = two_tenants
    queue, job_id, first = _running_with_checkpoint(db, a, file_a, blobs)

    def killed(session):
        raise RuntimeError("the process died here")

    event.listen(Session, "before_commit", killed)
    try:
        with pytest.raises(RuntimeError, match="died"):
            queue.record_checkpoint(
                job_id, "agent", step=4, epoch=2.0, metrics={}, manifest=_checkpoint_files(blobs, a, 4)
            )
    finally:
        event.remove(Session, "before_commit", killed)
    assert all(blobs.exists(a, sha) for sha in first.values())
    _requeue(db, job_id)
    assignment = queue.lease("another")
    assert assignment.checkpoint.step == 2 and set(assignment.checkpoint.files) == set(first)


def test_a_checkpoint_whose_files_are_gone_is_skipped_not_a_stuck_queue(db, two_tenants):
    a, file_a, _, _, blobs = two_tenants
    queue, job_id, files = _running_with_checkpoint(db, a, file_a, blobs)
    blobs.delete(a, files["optimizer.pt"])  # a disk restored from an older backup, a hand-deleted file
    _requeue(db, job_id)
    assignment = queue.lease("another")
    assert assignment.job_id == job_id and assignment.checkpoint is None  # it starts over
    with db.system() as s:
        assert not s.get(m.JobCheckpoint, f"ftckpt-{job_id.removeprefix('ftjob-')}-2").resumable
        messages = [e.message for e in s.scalars(select(m.JobEvent).where(m.JobEvent.job_id == job_id))]
    assert "Checkpoint at step 2 cannot be resumed: optimizer.pt missing from storage" in messages
    assert any(msg.startswith("Fine-tuning job started (attempt 2") and "resuming" not in msg for msg in messages)


def test_a_job_that_cannot_be_started_fails_and_the_queue_moves_on(db, two_tenants, monkeypatch):
    a, file_a, _, _, blobs = two_tenants
    broken, fine = queued_job(db, a, file_a), queued_job(db, a, file_a)
    real = finetuning.training_arguments

    def arguments(job, base):
        if job.id == broken:
            raise OSError("the storage is not mounted")
        return real(job, base)

    monkeypatch.setattr(finetuning, "training_arguments", arguments)
    queue = JobQueue(db, blobs, lease_seconds=60, max_attempts=2)
    assert queue.lease("agent") is None  # the head could not be started: it fails, nothing is handed out
    assert queue.lease("agent").job_id == fine
    with db.system() as s:
        job = s.get(m.FineTuningJob, broken)
        assert job.status == "failed" and job.lease_owner is None and job.attempts == 0
        assert job.error == {
            "code": "job_unstartable",
            "message": "The job could not be started: OSError: the storage is not mounted",
            "param": None,
        }
        last = s.scalars(select(m.JobEvent).where(m.JobEvent.job_id == broken).order_by(m.JobEvent.seq.desc())).first()
    assert last.level == "error" and "storage is not mounted" in last.message


def test_a_transient_fault_while_a_job_is_put_together_leaves_it_queued(db, two_tenants, monkeypatch):
    a, file_a, _, _, blobs = two_tenants
    job_id = queued_job(db, a, file_a)
    real = finetuning.training_arguments

    def locked(job, base):
        raise OperationalError("SELECT ...", {}, sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr(finetuning, "training_arguments", locked)
    queue = JobQueue(db, blobs, lease_seconds=60, max_attempts=2)
    with pytest.raises(OperationalError):  # the agent hears a retryable error and asks again later
        queue.lease("agent")
    with db.system() as s:
        job = s.get(m.FineTuningJob, job_id)
        assert job.status == "queued" and job.lease_owner is None and job.attempts == 0 and job.error is None
        assert s.scalar(select(func.count()).select_from(m.JobEvent).where(m.JobEvent.job_id == job_id)) == 0
    monkeypatch.setattr(finetuning, "training_arguments", real)
    assert queue.lease("agent").job_id == job_id


def test_a_job_an_agent_could_not_prepare_is_requeued_until_its_attempts_are_spent(db, two_tenants):
    a, file_a, _, _, blobs = two_tenants
    job_id = queued_job(db, a, file_a)
    queue = JobQueue(db, blobs, lease_seconds=60, max_attempts=2)
    for attempt in (1, 2):
        assert queue.lease("agent").attempt == attempt
        queue.release(job_id, "agent", "agent a could not prepare it: disk full", attempt, fault=True)
    with db.system() as s:
        job = s.get(m.FineTuningJob, job_id)
        assert job.status == "failed" and job.lease_owner is None
        assert job.error["code"] == "job_unstartable"
        last = "agent a could not prepare it: disk full"
        assert job.error["message"] == f"The job could not be prepared in 2 attempts (last: {last})"
    other = queued_job(db, a, file_a)  # a shutdown (no fault) gives a job back whatever its attempts
    for attempt in (1, 2, 3):
        assert queue.lease("agent").attempt == attempt
        queue.release(other, "agent", "the agent is shutting down", attempt)
    with db.system() as s:
        assert s.get(m.FineTuningJob, other).status == "queued"


# --- over NATS, against a running platform ------------------------------------------------------------


@pytest.fixture
def settings_overrides() -> dict[str, object]:
    return {"embedded_agent": False}


def enroll(running, name: str) -> agent_records.AgentCredentials:
    with running.platform.db.system() as s:
        created = agent_records.create_agent(s, name)
    running.platform.sync_agents()
    return created


async def connect(running, creds: agent_records.AgentCredentials) -> nats.NATS:
    return await nats.connect(
        running.platform.nats.url,
        user=creds.agent_id,
        password=creds.secret,
        inbox_prefix=protocol.inbox_prefix(creds.agent_id),
        allow_reconnect=False,
        max_reconnect_attempts=0,
    )


def test_an_agent_may_act_only_as_itself_and_only_on_jobs_it_holds(running):
    first, second = enroll(running, "first"), enroll(running, "second")
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

    async def scenario() -> None:
        nc = await connect(running, first)
        try:
            # Publishing under another agent's subjects is refused by the NATS server: nobody answers.
            with pytest.raises((NoRespondersError, NatsTimeout)):
                await nc.request(protocol.agent_subject(second.agent_id, "lease"), b"{}", timeout=1)
            reply = json.loads(
                (await nc.request(protocol.agent_subject(first.agent_id, "lease"), b"{}", timeout=10)).data
            )
            leased = protocol.Assignment.from_json(reply["assignment"])
            assert leased.job_id == job["id"] and leased.checkpoint is None
            blob = leased.training_file
            chunk = await nc.request(
                protocol.job_subject(first.agent_id, job["id"], "download"),
                protocol.encode({"sha256": blob.sha256, "offset": 0}),
                timeout=10,
            )
            assert chunk.data == SAMPLE_CHAT.read_bytes()[: protocol.CHUNK_BYTES]
            # A blob outside the job, even one that exists, is refused.
            other = await nc.request(
                protocol.job_subject(first.agent_id, job["id"], "download"),
                protocol.encode({"sha256": "a" * 64, "offset": 0}),
                timeout=10,
            )
            assert protocol.ERROR_HEADER in (other.headers or {})
            beat = await nc.request(protocol.job_subject(first.agent_id, job["id"], "heartbeat"), b"{}", timeout=10)
            assert json.loads(beat.data) == {"verdict": "continue"}
        finally:
            await nc.close()
        nc = await connect(running, second)
        try:
            # The other agent does not hold the job: no uploads, no heartbeat, no finishing it.
            upload = await nc.request(
                protocol.job_subject(second.agent_id, job["id"], "upload"),
                b"bytes",
                headers={protocol.UPLOAD_HEADER: "0" * 32, protocol.OFFSET_HEADER: "0"},
                timeout=10,
            )
            assert "not leased to you" in upload.headers[protocol.ERROR_HEADER]
            beat = await nc.request(protocol.job_subject(second.agent_id, job["id"], "heartbeat"), b"{}", timeout=10)
            assert json.loads(beat.data) == {"verdict": "lost"}
            await nc.request(
                protocol.job_subject(second.agent_id, job["id"], "finish"),
                protocol.encode({"state": "failed", "message": "not mine"}),
                timeout=10,
            )
        finally:
            await nc.close()

    asyncio.run(scenario())
    assert running.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()["status"] == "running"
    agents = running.client.get("/api/admin/agents", headers=headers).json()["data"]
    assert {a["name"]: a["current_job"] for a in agents}["first"] == job["id"]


def test_an_agent_link_with_a_wrong_secret_fails_after_the_enrollment_grace_not_its_timeout(running):
    """The agent's own link reconnects for ever once joined; a refused first connection must still fail at once
    (nats-py retries it quietly otherwise, until the connect timeout runs out)."""
    agent = enroll(running, "knocks")
    for grace in (0.0, 1.0):
        link = AgentLink(running.platform.nats.url, agent.agent_id, "not-the-secret")
        started = time.monotonic()
        with pytest.raises(AuthorizationError):
            link.connect(timeout=20, enrollment_grace=grace)
        assert grace <= time.monotonic() - started < grace + 5
    right = AgentLink(running.platform.nats.url, agent.agent_id, agent.secret)
    right.connect(timeout=20, enrollment_grace=0)
    try:
        assert right._nc.is_connected
    finally:
        right.close()


def test_an_agent_link_to_an_address_nobody_answers_on_says_so_and_stops_trying():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    link = AgentLink(f"nats://127.0.0.1:{port}", "agent-nowhere", "secret")
    with pytest.raises(LinkDown, match=rf"no NATS server answered at nats://127.0.0.1:{port} within 0.5 s \(\w+"):
        link.connect(timeout=0.5, enrollment_grace=0)
    assert not link._loop.is_running() and not link._thread.is_alive()  # and nothing goes on retrying


def test_revoked_or_wrong_credentials_are_refused_by_the_nats_server(running):
    agent = enroll(running, "soon-revoked")
    wrong = agent_records.AgentCredentials(agent.agent_id, agent.name, "not-the-secret")

    async def attempt(creds: agent_records.AgentCredentials) -> None:
        nc = await connect(running, creds)
        await nc.close()

    with pytest.raises(Exception, match="[Aa]uthorization"):
        asyncio.run(attempt(wrong))
    asyncio.run(attempt(agent))
    with running.platform.db.system() as s:
        agent_records.revoke_agent(s, "soon-revoked")
    running.platform.sync_agents()
    deadline = time.monotonic() + 10  # the server reloads its configuration on SIGHUP, a moment later
    while True:
        try:
            asyncio.run(attempt(agent))
        except Exception as refused:  # nats raises its own authorization error types
            assert "uthorization" in str(refused), refused
            break
        assert time.monotonic() < deadline, "the revoked agent could still connect"
        time.sleep(0.05)


def test_an_agents_finish_with_an_impossible_trained_tokens_is_refused_and_charges_nothing(
    running, demo_model_dir, tmp_path
):
    """trained_tokens is billed: a negative one, a non-integer, or more than the training file can hold (its
    bytes × 2 × epochs × processes) is refused as final, with the adapter uploaded and all else in order, and the
    job is left as it was; an honest finish then succeeds and is charged what it reported."""
    agent = enroll(running, "trainer")
    headers = running.auth()
    file = running.client.post(
        "/v1/files", headers=headers, files={"file": SAMPLE_CHAT.open("rb")}, data={"purpose": "fine-tune"}
    ).json()
    job = running.client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "adaptery-demo", "training_file": file["id"], "hyperparameters": {"n_epochs": 2}},
    ).json()
    deadline = time.monotonic() + 30
    while running.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()["status"] != "queued":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    bound = SAMPLE_CHAT.stat().st_size * 2 * 2
    archive = zipfile.ZipFile(io.BytesIO(lora_zip(demo_model_dir, tmp_path)))
    adapter = {name: archive.read(name) for name in archive.namelist()}

    async def scenario() -> list[dict[str, str]]:
        nc = await connect(running, agent)
        try:
            lease = await nc.request(protocol.agent_subject(agent.agent_id, "lease"), b"{}", timeout=10)
            assert json.loads(lease.data)["assignment"]["job_id"] == job["id"]
            files = {}
            for number, (name, data) in enumerate(adapter.items()):
                assert len(data) < protocol.CHUNK_BYTES
                sha = hashlib.sha256(data).hexdigest()
                upload = {protocol.UPLOAD_HEADER: f"{number:032x}", protocol.OFFSET_HEADER: "0"}
                upload[protocol.SHA256_HEADER] = sha
                subject = protocol.job_subject(agent.agent_id, job["id"], "upload")
                reply = await nc.request(subject, data, headers=upload, timeout=10)
                assert json.loads(reply.data) == {"sha256": sha}, reply.headers
                files[name] = sha
            answers = []
            for trained in (-1_000_000, 12.5, True, bound + 1, bound):
                body = {"state": "succeeded", "result": {"trained_tokens": trained, "steps": 1}, "files": files}
                answer = await nc.request(
                    protocol.job_subject(agent.agent_id, job["id"], "finish"), protocol.encode(body), timeout=30
                )
                answers.append(dict(answer.headers or {}))
                if trained == bound + 1:
                    shown = running.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()
                    assert shown["status"] == "running" and shown["trained_tokens"] is None
            return answers
        finally:
            await nc.close()

    answers = asyncio.run(scenario())
    assert [a.get(protocol.RETRYABLE_HEADER) for a in answers] == ["false"] * 4 + [None]
    assert [a.get(protocol.ERROR_HEADER) for a in answers] == [
        *(f"result.trained_tokens must be a non-negative integer, not {v!r}" for v in (-1_000_000, 12.5, True)),
        f"result.trained_tokens {bound + 1} is more than job {job['id']} can have trained (at most {bound})",
        None,
    ]
    shown = running.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()
    assert shown["status"] == "succeeded" and shown["trained_tokens"] == bound
    with running.platform.db.system() as s:
        limits.charge_training(s, running.tenant_id, time.time())
        trained = s.scalar(
            select(func.coalesce(func.sum(m.UsageRecord.trained_tokens), 0)).where(
                m.UsageRecord.tenant_id == running.tenant_id
            )
        )
    assert trained == bound
