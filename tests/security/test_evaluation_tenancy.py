"""The attack on evaluations: another tenant names the lab's evaluation, job, adapter, task and evaluation set on
every evaluation route, and each is not found (404), exactly as what does not exist; its lists show none of them.
Agents: one scoped to another tenant leases none of the lab's evaluations, and an agent that does not hold an
evaluation can neither fetch its blobs, keep it alive nor finish it."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.services import evaluations
from tests.integration.helpers import upload_sample
from tests.security.conftest import World

TASK = {"config": 'task: lab_task\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n', "data": '{"q": "1", "a": "2"}\n'}


@pytest.fixture(scope="module")
def lab(world_once: World, lora_bytes: bytes) -> dict[str, str]:
    world, client = world_once, world_once.client
    owner, other = world.auth("owner"), world.auth("other_tenant_member")
    task = client.post("/api/evaluation_tasks", headers=owner, json=TASK)
    assert task.status_code == 200, task.text
    model = world.ids["model_id"]
    evaluation = client.post("/api/evaluations", headers=owner, json={"model": model, "file_id": world.ids["file_id"]})
    assert evaluation.status_code == 200, evaluation.text
    kept = client.put(f"/api/models/{model}/evaluation_set", headers=owner, json={"file_id": world.ids["file_id"]})
    assert kept.status_code == 200, kept.text
    theirs = client.post(
        "/api/models/import", params={"base_model": "adaptery-demo", "suffix": "theirs"}, content=lora_bytes,
        headers=other,
    )  # fmt: skip
    assert theirs.status_code == 200, theirs.text
    record = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    their_file = client.post(
        "/v1/files", headers=other, files={"file": ("t.jsonl", record)}, data={"purpose": "fine-tune"}
    )
    return {"evaluation": evaluation.json()["id"], "task": task.json()["name"], "model": model,
            "their_model": theirs.json()["id"], "their_file": their_file.json()["id"]}  # fmt: skip


def test_another_tenant_gets_404_on_every_evaluation_route(world_once: World, lab: dict[str, str]):
    client, other = world_once.client, world_once.auth("other_tenant_member")
    ids = world_once.ids
    attempts = {
        "GET evaluation": client.get(f"/api/evaluations/{lab['evaluation']}", headers=other),
        "GET job report": client.get(f"/api/fine_tuning/jobs/{ids['job_id']}/evaluation", headers=other),
        "GET model report": client.get(f"/api/models/{lab['model']}/evaluation", headers=other),
        "PUT evaluation set on the lab's adapter": client.put(
            f"/api/models/{lab['model']}/evaluation_set", headers=other, json={"file_id": lab["their_file"]}),
        "PUT the lab's file beside their adapter": client.put(
            f"/api/models/{lab['their_model']}/evaluation_set", headers=other, json={"file_id": ids["file_id"]}),
        "POST evaluation of the lab's adapter": client.post(
            "/api/evaluations", headers=other, json={"model": lab["model"], "file_id": lab["their_file"]}),
        "POST evaluation on the lab's file": client.post(
            "/api/evaluations", headers=other, json={"model": lab["their_model"], "file_id": ids["file_id"]}),
        "POST lm-eval with the lab's task": client.post("/api/evaluations", headers=other, json={
            "model": lab["their_model"], "kind": "lm_eval", "task": lab["task"]}),
    }  # fmt: skip
    wrong = {name: (r.status_code, r.text[:120]) for name, r in attempts.items() if r.status_code != 404}
    assert not wrong, wrong
    assert client.get("/api/evaluations", headers=other).json()["data"] == []
    assert client.get("/api/evaluations", headers=other, params={"model": lab["model"]}).json()["data"] == []
    assert client.get("/api/evaluation_tasks", headers=other).json()["data"] == []
    # Their own task may take the lab's task's name: names are per tenant.
    assert client.post("/api/evaluation_tasks", headers=other, json=TASK).status_code == 200


def test_the_lab_sees_its_own_evaluation_and_the_same_name_twice_is_a_clear_error(world_once, lab):
    client, owner = world_once.client, world_once.auth("owner")
    got = client.get(f"/api/evaluations/{lab['evaluation']}", headers=owner).json()
    assert got["status"] == "queued" and got["source"] == {"kind": "file", "file_id": world_once.ids["file_id"]}
    again = client.post("/api/evaluation_tasks", headers=owner, json=TASK)
    assert again.status_code == 400 and "exists already" in again.json()["error"]["message"]


def test_agents_reach_only_the_evaluations_leased_to_them(world_once: World, lab: dict[str, str]):
    queue = world_once.platform.evaluations
    assert queue.lease("agent-of-elsewhere", tenant_scope=world_once.other_tenant_id) is None
    assignment = queue.lease("lab-agent", tenant_scope=world_once.tenant_id)
    assert assignment is not None and assignment["evaluation_id"] == lab["evaluation"]
    evaluation_id, attempt = assignment["evaluation_id"], assignment["attempt"]
    assert queue.holds(evaluation_id, "lab-agent") and not queue.holds(evaluation_id, "intruder")
    assert queue.job_blobs(evaluation_id, "intruder") == set()
    assert assignment["evaluation_file"]["sha256"] in queue.job_blobs(evaluation_id, "lab-agent")
    assert queue.heartbeat(evaluation_id, "intruder") == "lost"
    queue.finish(evaluation_id, "intruder", {"state": "failed", "message": "forged", "attempt": attempt})
    with world_once.platform.db.system() as s:
        row = s.scalar(select(m.Evaluation).where(m.Evaluation.id == evaluation_id))
        assert row.status == "running" and row.error is None  # the forged end changed nothing
    queue.finish(evaluation_id, "lab-agent", {"state": "released", "attempt": attempt})  # back as it was


# --- the predecessor and its evaluation set are the job's own tenant's: never another's --------------------------


def _succeeded_job(world: World, tenant_id: str, user_id: str, file_id: str, **fields: object) -> tuple[str, str]:
    """A succeeded job (as a finished fine-tune leaves it) with its tenant-visible adapter: (job id, adapter id)."""
    with world.platform.db.system() as s:
        job = m.FineTuningJob(
            id=new_id("ftjob-"), tenant_id=tenant_id, user_id=user_id, model="adaptery-demo", training_file=file_id,
            seed=3, hyperparameters={"n_epochs": 1}, method={"type": "supervised"}, status="succeeded",
            created_at=time.time(), **fields,
        )  # fmt: skip
        s.add(job)
        s.flush()
        job.fine_tuned_model = f"ft:adaptery-demo:{tenant_id}::{job.id}"
        s.add(m.Adapter(id=job.fine_tuned_model, tenant_id=tenant_id, base_model="adaptery-demo", job_id=job.id,
                        rank=8, manifest={}, sha256="0" * 64, visibility="tenant", created_by=user_id))  # fmt: skip
        return job.id, job.fine_tuned_model


def _enqueue(world: World, job_id: str) -> m.Evaluation | None:
    with world.platform.db.system() as s:  # as the job's end does: a system session
        evaluation = evaluations.enqueue_for_job(s, s.get(m.FineTuningJob, job_id))
        if evaluation is not None:
            s.expunge(evaluation)
        return evaluation


def test_the_predecessor_and_its_evaluation_set_are_never_another_tenants(world_once: World):
    client, running = world_once.client, world_once.running
    victim, attacker = running.new_tenant("beta-co", "beta-owner"), running.new_tenant("alpha-co", "alpha-owner")
    b_auth = {"Authorization": f"Bearer {victim.api_key}"}
    a_auth = {"Authorization": f"Bearer {attacker.api_key}"}
    b_file = upload_sample(client, b_auth)["id"]
    _, b_adapter = _succeeded_job(world_once, victim.tenant.id, victim.owner.id, b_file)
    kept = client.put(f"/api/models/{b_adapter}/evaluation_set", headers=b_auth, json={"file_id": b_file})
    assert kept.status_code == 200, kept.text
    a_file = upload_sample(client, a_auth)["id"]  # the same data: the same content hash as B's
    traces = [victim.tenant.id, victim.tenant.name, b_adapter, b_file]

    def report(job_id: str) -> str:
        got = client.get(f"/api/fine_tuning/jobs/{job_id}/evaluation", headers=a_auth)
        assert got.status_code == 200, got.text
        assert got.json()["hidden_models"] == [], got.text
        return got.text

    # No validation file and no predecessor of its own: not evaluated (never on B's set, beside B's adapter).
    a_first, a_adapter = _succeeded_job(world_once, attacker.tenant.id, attacker.owner.id, a_file)
    assert _enqueue(world_once, a_first) is None
    text = report(a_first)
    assert not [t for t in traces if t in text], text

    # With a validation file: A's own earlier adapter is the predecessor, though B fine-tuned on the same data since.
    _, b_later = _succeeded_job(world_once, victim.tenant.id, victim.owner.id, b_file, validation_file=b_file)
    a_id, a_owner = attacker.tenant.id, attacker.owner.id
    a_second, a_second_adapter = _succeeded_job(world_once, a_id, a_owner, a_file, validation_file=a_file)
    evaluation = _enqueue(world_once, a_second)
    assert [e["label"] for e in evaluation.models] == ["candidate", "predecessor", "base"]
    assert {e["label"]: e["model"] for e in evaluation.models}["predecessor"] == a_adapter  # A's own, not B's later
    text = report(a_second) + client.get(f"/api/evaluations/{evaluation.id}", headers=a_auth).text
    assert not [t for t in [*traces, b_later] if t in text], text

    # A's own evaluation set beside A's own predecessor is still used.
    kept = client.put(f"/api/models/{a_second_adapter}/evaluation_set", headers=a_auth, json={"file_id": a_file})
    assert kept.status_code == 200, kept.text
    _, b_last = _succeeded_job(world_once, victim.tenant.id, victim.owner.id, b_file)
    a_third, _ = _succeeded_job(world_once, attacker.tenant.id, attacker.owner.id, a_file)
    third = _enqueue(world_once, a_third)
    assert third.source == {"kind": "evaluation_set", "file_id": a_file, "beside": a_second_adapter}
    assert all(e["model"] not in (b_adapter, b_later, b_last) for e in third.models)


def test_an_evaluation_that_cannot_be_started_fails_alone_and_the_next_is_still_leased(world_once: World):
    running, queue = world_once.running, world_once.platform.evaluations
    gamma = running.new_tenant("gamma-co", "gamma-owner")
    auth = {"Authorization": f"Bearer {gamma.api_key}"}
    good_file = upload_sample(world_once.client, auth)["id"]
    with world_once.platform.db.system() as s:  # a file whose blob is gone (as another tenant's was, looked up here)
        s.add(m.File(id=new_id("file-"), tenant_id=gamma.tenant.id, filename="gone.jsonl", purpose="fine-tune",
                     bytes=10, sha256="e" * 64, records=1))  # fmt: skip
        s.flush()
        missing = s.scalar(select(m.File.id).where(m.File.sha256 == "e" * 64))
    broken_job, _ = _succeeded_job(world_once, gamma.tenant.id, gamma.owner.id, good_file, validation_file=missing)
    broken = _enqueue(world_once, broken_job)
    good_job, _ = _succeeded_job(world_once, gamma.tenant.id, gamma.owner.id, good_file, validation_file=good_file)
    good = _enqueue(world_once, good_job)
    assignment = queue.lease("gamma-agent", tenant_scope=gamma.tenant.id)
    assert assignment is not None and assignment["evaluation_id"] == good.id
    with world_once.platform.db.system() as s:
        row = s.get(m.Evaluation, broken.id)
        assert row.status == "failed" and row.lease_owner is None, (row.status, row.error)
        assert row.error.startswith("The evaluation could not be started") and "missing" in row.error, row.error
    queue.finish(good.id, "gamma-agent", {"state": "failed", "message": "test over", "attempt": assignment["attempt"]})
