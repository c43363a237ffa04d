"""Races between the recovery loop, agents and validators, played in a fixed order (a hook or a nested call
stands where the other process would act; no sleeps)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from adaptery.data.untrusted import RecordLimits
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.services import finetuning, limits
from adaptery.services import queue as queue_module
from adaptery.services.datasets import TokenBudget
from adaptery.services.errors import NotFound
from adaptery.services.queue import JobQueue
from tests.conftest import SAMPLE_CHAT
from tests.integration.test_queue import _checkpoint_files
from tests.integration.test_tenancy_and_queue import add_file, make_blobs, make_tenant, queued_job


@pytest.fixture
def setup(db, tmp_path):
    tenant = make_tenant(db, "a")
    with db.system() as s:
        s.add(m.BaseModel(id="base", ref="/nowhere", display_name="b", finetune_defaults={}))
    blobs = make_blobs(db, tmp_path)
    queue = JobQueue(db, blobs, lease_seconds=60, max_attempts=3)
    return db, queue, blobs, tenant, add_file(db, tenant)


def expire_lease(db, job_id: str) -> None:
    with db.system() as s:
        s.get(m.FineTuningJob, job_id).lease_expires_at = time.time() - 1


def job_state(db, job_id: str) -> tuple[str, str | None, int]:
    with db.system() as s:
        job = s.get(m.FineTuningJob, job_id)
        return job.status, job.lease_owner, job.attempts


def test_a_heartbeat_committed_after_recovery_read_the_job_keeps_its_lease(setup):
    db, queue, _, tenant, file_id = setup
    job_id = queued_job(db, tenant, file_id)
    queue.lease("agent")
    expire_lease(db, job_id)
    beats: list[str] = []

    def heartbeat_first(_conn, _cursor, statement: str, *_args: object) -> None:
        # Recovery has read the job as stale and is about to write it: the agent's heartbeat lands first.
        if not beats and statement.lstrip().upper().startswith("UPDATE FINE_TUNING_JOBS"):
            beats.append("pending")
            beats[0] = queue.heartbeat(job_id, "agent")

    event.listen(db.engine, "before_cursor_execute", heartbeat_first)
    try:
        recovered = queue.recover()
    finally:
        event.remove(db.engine, "before_cursor_execute", heartbeat_first)
    assert beats == ["continue"]
    assert recovered == 0
    assert job_state(db, job_id) == ("running", "agent", 1)
    assert queue.heartbeat(job_id, "agent") == "continue"


def test_an_agent_cannot_act_for_an_attempt_that_is_over_when_the_job_came_back_to_it(setup):
    db, queue, blobs, tenant, file_id = setup
    job_id = queued_job(db, tenant, file_id)
    first = queue.lease("agent")
    expire_lease(db, job_id)
    assert queue.recover() == 1
    second = queue.lease("agent")  # the same agent id (restarted, or back from a partition) leases it again
    assert (first.attempt, second.attempt) == (1, 2)

    assert queue.heartbeat(job_id, "agent", first.attempt) == "lost"
    files = _checkpoint_files(blobs, tenant, 2)
    stale = {"step": 2, "epoch": 1.0, "metrics": {}, "manifest": files, "attempt": first.attempt}
    assert queue.record_checkpoint(job_id, "agent", **stale) is None
    queue.report(job_id, "agent", [{"type": "message", "message": "old attempt: step 3"}], first.attempt)
    queue.paused(job_id, "agent", first.attempt)
    queue.release(job_id, "agent", "old attempt: shutting down", first.attempt)
    queue.fail(job_id, "agent", "old attempt: gave up", attempt=first.attempt)
    assert queue.succeed(job_id, "agent", blobs.root, {}, first.attempt) is None
    assert job_state(db, job_id) == ("running", "agent", 2)
    with db.system() as s:
        assert s.scalars(select(m.JobCheckpoint).where(m.JobCheckpoint.job_id == job_id)).all() == []
        messages = s.scalars(select(m.JobEvent.message).where(m.JobEvent.job_id == job_id)).all()
        assert not any("old attempt" in message or message.startswith("Job ") for message in messages)

    assert queue.heartbeat(job_id, "agent", second.attempt) == "continue"
    assert queue.heartbeat(job_id, "agent") == "continue"  # an agent from before attempt numbers: by its id alone
    queue.fail(job_id, "agent", "attempt 2 gave up", attempt=second.attempt)
    assert job_state(db, job_id)[0] == "failed"


def test_one_job_that_cannot_be_recovered_does_not_hold_up_the_others(setup, monkeypatch):
    db, queue, _, tenant, file_id = setup
    broken, healthy = queued_job(db, tenant, file_id), queued_job(db, tenant, file_id)
    owners = {queue.lease(name).job_id: name for name in ("agent-1", "agent-2")}
    for job_id in (broken, healthy):
        expire_lease(db, job_id)
    label = queue_module.agent_label

    def failing_for_one(session, agent_id):
        if agent_id == owners[broken]:
            raise NotFound(f"no agent {agent_id}")
        return label(session, agent_id)

    monkeypatch.setattr(queue_module, "agent_label", failing_for_one)
    assert queue.recover() == 1
    assert job_state(db, healthy) == ("queued", None, 1)
    assert job_state(db, broken) == ("running", owners[broken], 1)  # untouched: the next pass tries again
    monkeypatch.undo()
    assert queue.recover() == 1
    assert job_state(db, broken) == ("queued", None, 1)


# --- validation ----------------------------------------------------------------------------------


def validating_job(db, blobs, tenant: str, model: str = "base") -> str:
    sha = blobs.put_path(tenant, SAMPLE_CHAT).sha256
    with db.tenant(tenant) as s:
        record = m.File(id=new_id("file-"), filename="chat.jsonl", purpose="fine-tune", bytes=1, sha256=sha)
        job = m.FineTuningJob(
            id=new_id("ftjob-"),
            model=model,
            training_file=record.id,
            seed=1,
            hyperparameters={"n_epochs": 1},
            method={"type": "supervised"},
            status="validating_files",
        )
        s.add_all([record, job])
    return job.id


def ten_tokens_each(during_count=None) -> TokenBudget:
    calls = []

    def count(messages) -> int:
        calls.append(messages)
        if len(calls) == 1 and during_count is not None:
            during_count()
        return 10

    return TokenBudget("base", count, 100_000, RecordLimits(max_bytes=1 << 20, max_depth=64))


def reserved(db, tenant: str, job_id: str) -> tuple[int, int]:
    """(the tenant's reserved tokens this month, the job's own hold)."""
    with db.system() as s:
        ledger = limits.usage(s, [f"tenant:{tenant}"])[f"tenant:{tenant}"]
        hold = s.scalar(select(m.UsageCounter.reserved).where(m.UsageCounter.subject == f"job:{job_id}"))
        return ledger["reserved"], hold


@pytest.mark.parametrize("claim", ["held", "lapsed"])
def test_two_validators_of_one_job_hold_its_budget_once(setup, claim):
    """The request's background validation and a server's recovery loop validate the same job at once: the
    second waits out the first's claim (held), or takes it over from one that outlived it (lapsed)."""
    db, _, blobs, tenant, _ = setup
    with db.system() as s:
        limits.set_tenant_limits(s, tenant, {"monthly_tokens": 1_000_000})
    job_id = validating_job(db, blobs, tenant)

    def the_recovery_loop_validates() -> None:
        if claim == "lapsed":
            expire_lease(db, job_id)
        finetuning.validate_job(db, blobs, tenant, job_id, lambda _model: ten_tokens_each())

    budget = ten_tokens_each(during_count=the_recovery_loop_validates)
    finetuning.validate_job(db, blobs, tenant, job_id, lambda _model: budget)
    tenant_reserved, hold = reserved(db, tenant, job_id)
    assert hold > 0 and tenant_reserved == hold
    assert job_state(db, job_id) == ("queued", None, 0)
    with db.system() as s:
        messages = s.scalars(select(m.JobEvent.message).where(m.JobEvent.job_id == job_id)).all()
        assert messages.count("Files validated, moving job to queued state") == 1


def job_error(db, job_id: str) -> dict | None:
    with db.system() as s:
        return s.get(m.FineTuningJob, job_id).error


def test_a_job_whose_base_model_is_gone_fails_naming_it_and_does_not_hold_up_the_others(setup):
    """Its base model was unregistered after the job was created: asking again cannot help, so the job fails at
    once with the model's name instead of waiting in validating_files, tried again each time its claim lapses."""
    db, _, blobs, tenant, _ = setup
    orphan = validating_job(db, blobs, tenant, model="deleted-model")
    healthy = validating_job(db, blobs, tenant)
    asked: list[str] = []

    def budget_for(model: str) -> TokenBudget:
        asked.append(model)
        return ten_tokens_each()

    finetuning.validate_waiting(db, blobs, budget_for)
    assert job_state(db, healthy)[0] == "queued"
    assert job_state(db, orphan) == ("failed", None, 0)
    error = job_error(db, orphan)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'deleted-model'" in error["message"] and "no longer registered" in error["message"]
    assert asked == ["base"]  # the orphan's tokenizer was never asked for
    with db.system() as s:
        messages = s.scalars(select(m.JobEvent.message).where(m.JobEvent.job_id == orphan)).all()
        assert messages[-1] == f"Job failed: {error['message']}"
        assert s.scalar(select(m.UsageCounter.reserved).where(m.UsageCounter.subject == f"job:{orphan}")) in (None, 0)


def test_a_refused_tokenizer_fails_the_job_and_a_transient_fault_leaves_it_to_the_next_validator(setup):
    db, _, blobs, tenant, _ = setup
    refused, locked = validating_job(db, blobs, tenant), validating_job(db, blobs, tenant)

    def budget_for(_model: str) -> TokenBudget:
        raise NotFound("The model 'base' has no tokenizer files", param="model", code="model_not_found")

    finetuning.validate_job(db, blobs, tenant, refused, budget_for)
    assert job_state(db, refused)[0] == "failed"
    assert job_error(db, refused) == {
        "code": "model_not_found",
        "message": "The model 'base' has no tokenizer files",
        "param": "model",
    }

    def database_locked(_model: str) -> TokenBudget:
        raise OperationalError("SELECT 1", {}, Exception("database is locked"))

    with pytest.raises(OperationalError):
        finetuning.validate_job(db, blobs, tenant, locked, database_locked)
    status, claimant, _ = job_state(db, locked)
    assert status == "validating_files" and claimant.startswith("validator-")  # until its claim lapses
    expire_lease(db, locked)
    finetuning.validate_job(db, blobs, tenant, locked, lambda _model: ten_tokens_each())
    assert job_state(db, locked) == ("queued", None, 0)
