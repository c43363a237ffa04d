"""The data layer's tenant filter, and the job queue's leases."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.db.session import Database
from adaptery.db.tenancy import TenancyViolation
from adaptery.services import tenants
from adaptery.services.queue import JobQueue
from adaptery.storage.blobs import BlobStore
from adaptery.storage.crypto import LocalKeyProvider
from adaptery.storage.keys import Keyring


def make_tenant(db: Database, name: str) -> str:
    with db.system() as s:
        return tenants.create_tenant(s, name, f"{name}-owner", login_link_hours=1, invitation_days=1).tenant.id


def add_file(db: Database, tenant_id: str) -> str:
    with db.tenant(tenant_id) as s:
        record = m.File(id=new_id("file-"), filename="f", purpose="fine-tune", bytes=1, sha256="0" * 64)
        s.add(record)
    return record.id


def test_a_tenant_session_sees_only_its_own_rows(db):
    a, b = make_tenant(db, "a"), make_tenant(db, "b")
    file_a, file_b = add_file(db, a), add_file(db, b)
    with db.tenant(a) as s:
        assert [f.id for f in s.scalars(select(m.File))] == [file_a]
        assert s.get(m.File, file_b) is None
        assert s.scalar(select(m.File).where(m.File.id == file_b)) is None
    with db.system() as s:
        assert {f.id for f in s.scalars(select(m.File))} == {file_a, file_b}


def test_writing_another_tenants_row_is_refused(db):
    a, b = make_tenant(db, "a"), make_tenant(db, "b")
    with pytest.raises(TenancyViolation), db.tenant(a) as s:
        s.add(m.File(id=new_id("file-"), tenant_id=b, filename="f", purpose="fine-tune", bytes=1, sha256="0" * 64))


def test_new_rows_are_stamped_with_the_sessions_tenant(db):
    a = make_tenant(db, "a")
    file_id = add_file(db, a)
    with db.system() as s:
        assert s.get(m.File, file_id).tenant_id == a


def test_a_session_without_tenant_or_system_role_fails_closed(db):
    session = db._sessions()
    with pytest.raises(TenancyViolation):
        session.scalars(select(m.File)).all()
    session.close()


def queued_job(db: Database, tenant_id: str, file_id: str) -> str:
    with db.tenant(tenant_id) as s:
        job = m.FineTuningJob(
            id=new_id("ftjob-"),
            model="base",
            training_file=file_id,
            seed=1,
            hyperparameters={"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0},
            method={"type": "supervised"},
            status="queued",
        )
        s.add(job)
    return job.id


def make_blobs(db: Database, tmp_path) -> BlobStore:
    """An encrypted blob store with its own master key file, as the platform makes one."""
    keyring = Keyring(db, LocalKeyProvider(tmp_path / "keys" / "master.key"))
    return BlobStore(tmp_path / "blobs", keyring, tmp_path / "scratch")


class ManualClock:
    """The queue's clock, moved by the test: a lease expires when the test says so, not after a sleep."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def queue_setup(db, tmp_path, clock):
    tenant = make_tenant(db, "a")
    with db.system() as s:
        s.add(m.BaseModel(id="base", ref="/nowhere", display_name="b", finetune_defaults={}))
    file_id = add_file(db, tenant)
    queue = JobQueue(db, make_blobs(db, tmp_path), lease_seconds=60, max_attempts=2, clock=clock)
    return db, queue, tenant, file_id


def test_concurrent_agents_never_lease_the_same_job(queue_setup):
    db, queue, tenant, file_id = queue_setup
    jobs = {queued_job(db, tenant, file_id) for _ in range(6)}
    leased: list[str] = []
    lock = threading.Lock()

    def agent(name: str) -> None:
        while True:
            got = queue.lease(name)
            if got is None:
                return
            with lock:
                leased.append(got.job_id)

    threads = [threading.Thread(target=agent, args=(f"agent-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(leased) == sorted(jobs)


def test_an_expired_lease_goes_back_to_the_queue_then_fails_after_max_attempts(queue_setup, clock):
    db, queue, tenant, file_id = queue_setup
    job_id = queued_job(db, tenant, file_id)
    assert queue.lease("dead-agent").job_id == job_id
    clock.advance(59)
    assert queue.recover() == 0  # not yet expired
    clock.advance(2)
    assert queue.heartbeat(job_id, "dead-agent") == "continue"  # still its own until recovered; renews it
    clock.advance(61)
    assert queue.recover() == 1
    with db.system() as s:
        job = s.get(m.FineTuningJob, job_id)
        assert (job.status, job.attempts, job.lease_owner) == ("queued", 1, None)
    assert queue.heartbeat(job_id, "dead-agent") == "lost"
    assert queue.lease("second-agent").attempt == 2
    clock.advance(61)
    assert queue.recover() == 1
    with db.system() as s:
        job = s.get(m.FineTuningJob, job_id)
        assert job.status == "failed" and job.error["code"] == "worker_lost"
        assert "stopped responding 2 times" in job.error["message"]


def test_a_lost_lease_cannot_finish_the_job(queue_setup, tmp_path):
    db, queue, tenant, file_id = queue_setup
    job_id = queued_job(db, tenant, file_id)
    queue.lease("a1")
    queue.fail(job_id, "someone-else", "not mine")
    with db.system() as s:
        assert s.get(m.FineTuningJob, job_id).status == "running"
