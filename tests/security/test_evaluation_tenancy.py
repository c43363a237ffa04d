"""The attack on evaluations: another tenant names the lab's evaluation, job, adapter, task and evaluation set on
every evaluation route, and each is not found (404), exactly as what does not exist; its lists show none of them.
Agents: one scoped to another tenant leases none of the lab's evaluations, and an agent that does not hold an
evaluation can neither fetch its blobs, keep it alive nor finish it."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from adaptery.db import models as m
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
