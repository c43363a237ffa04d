"""/v1/fine_tuning/jobs: OpenAI's statuses, events, checkpoints, cancel, pagination and errors."""

from __future__ import annotations

import time

import psutil
import pytest
from sqlalchemy import select

from adaptery.db import models as m
from tests.contracts.openai_schema import assert_matches
from tests.integration.helpers import upload_sample, wait_for_job


def create_job(running, **body) -> dict:
    response = running.client.post("/v1/fine_tuning/jobs", headers=running.auth(), json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_job_runs_to_an_adapter_with_events_and_checkpoint(running):
    client, headers = running.client, running.auth()
    file = upload_sample(client, headers)
    job = create_job(
        running,
        model="adaptery-demo",
        training_file=file["id"],
        suffix="lab",
        hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5},
    )
    assert_matches("FineTuningJob", job)
    assert job["status"] in ("validating_files", "queued")
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}

    done = wait_for_job(client, headers, job["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    assert_matches("FineTuningJob", done)
    assert done["fine_tuned_model"] == f"ft:adaptery-demo:default:lab:{job['id'][6:14]}"
    assert done["trained_tokens"] > 0 and done["finished_at"] >= done["created_at"]

    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100", headers=headers).json()
    assert_matches("ListFineTuningJobEventsResponse", events)
    messages = [e["message"] for e in reversed(events["data"])]
    assert messages[0].startswith("Validating training file")
    assert "Files validated, moving job to queued state" in messages
    assert messages[-1] == "The job has successfully completed"
    metrics = [e for e in events["data"] if e["type"] == "metrics"]
    assert metrics and {"step", "total_steps", "train_loss", "learning_rate"} <= set(metrics[0]["data"])
    assert not any(str(running.platform.settings.data_dir) in m for m in messages)  # no server paths leak

    page = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=2", headers=headers).json()
    older = client.get(
        f"/v1/fine_tuning/jobs/{job['id']}/events?limit=2&after={page['data'][-1]['id']}", headers=headers
    ).json()
    assert page["has_more"] and [e["id"] for e in older["data"]] == [e["id"] for e in events["data"][2:4]]

    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=headers).json()
    assert_matches("ListFineTuningJobCheckpointsResponse", checkpoints)
    assert checkpoints["data"][0]["fine_tuned_model_checkpoint"] == done["fine_tuned_model"]

    models = client.get("/v1/models", headers=headers).json()
    assert_matches("ListModelsResponse", models)
    assert done["fine_tuned_model"] in [m["id"] for m in models["data"]]
    assert_matches("Model", client.get(f"/v1/models/{done['fine_tuned_model']}", headers=headers).json())

    with running.platform.db.system() as s:
        manifest = dict(s.get(m.Adapter, done["fine_tuned_model"]).manifest)
    assert all(running.platform.blobs.exists(running.tenant_id, sha) for sha in manifest.values())
    deleted = client.delete(f"/v1/models/{done['fine_tuned_model']}", headers=headers)
    assert_matches("DeleteModelResponse", deleted.json())
    assert client.get(f"/v1/models/{done['fine_tuned_model']}", headers=headers).status_code == 404
    gone = client.post(
        "/v1/chat/completions",
        headers=headers,
        json={"model": done["fine_tuned_model"], "messages": [{"role": "user", "content": "hi"}]},
    )
    assert gone.status_code == 404
    assert client.delete("/v1/models/adaptery-demo", headers=headers).status_code == 400
    # The model's own files are released; what its job's checkpoints still name stays until they go too.
    with running.platform.db.system() as s:
        checkpoints = s.scalars(select(m.JobCheckpoint.manifest).where(m.JobCheckpoint.job_id == job["id"])).all()
    kept = {sha for ckpt in checkpoints if ckpt for sha in ckpt.values()}
    assert manifest and kept
    assert all(running.platform.blobs.exists(running.tenant_id, sha) == (sha in kept) for sha in manifest.values())


def test_list_is_newest_first_with_cursor_pagination(running):
    file = upload_sample(running.client, running.auth())
    ids = []
    for _ in range(3):
        job = create_job(running, model="adaptery-demo", training_file=file["id"])
        running.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=running.auth())
        ids.append(job["id"])  # created one after the other (each a whole HTTP round trip): created_at orders them
    first = running.client.get("/v1/fine_tuning/jobs?limit=2", headers=running.auth()).json()
    assert_matches("ListPaginatedFineTuningJobsResponse", first)
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    rest = running.client.get(f"/v1/fine_tuning/jobs?limit=2&after={ids[1]}", headers=running.auth()).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]


def test_cancel_while_running_stops_training_within_seconds(running):
    file = upload_sample(running.client, running.auth())
    job = create_job(running, model="adaptery-demo", training_file=file["id"], hyperparameters={"n_epochs": 50})
    wait_for_job(running.client, running.auth(), job["id"], ("running",))
    deadline = time.monotonic() + 30  # the agent starts its training process after marking the job running
    while time.monotonic() < deadline and not _training_children():
        time.sleep(0.1)
    assert _training_children(), "no training process started"
    cancelled = running.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=running.auth()).json()
    assert_matches("FineTuningJob", cancelled)
    assert cancelled["status"] == "cancelled"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _training_children():
        time.sleep(0.3)
    assert _training_children() == []
    final = running.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=running.auth()).json()
    assert final["status"] == "cancelled" and final["fine_tuned_model"] is None
    again = running.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=running.auth())
    assert again.status_code == 400


def _training_children() -> list[psutil.Process]:
    """Live (not zombie) training processes started by this test process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "adaptery.training.runner" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_a_killed_training_process_fails_the_job_with_its_cause_and_the_agent_goes_on(running):
    file = upload_sample(running.client, running.auth())
    job = create_job(running, model="adaptery-demo", training_file=file["id"], hyperparameters={"n_epochs": 50})
    wait_for_job(running.client, running.auth(), job["id"], ("running",))
    deadline = time.monotonic() + 30
    while not _training_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    for child in _training_children():
        child.kill()
    failed = wait_for_job(running.client, running.auth(), job["id"], ("failed", "succeeded"))
    assert failed["status"] == "failed"
    assert "SIGKILL" in failed["error"]["message"]
    assert_matches("FineTuningJob", failed)
    # the agent survived and takes the next job
    next_job = create_job(running, model="adaptery-demo", training_file=file["id"], hyperparameters={"n_epochs": 1})
    assert (
        wait_for_job(running.client, running.auth(), next_job["id"], ("succeeded", "failed"))["status"] == "succeeded"
    )


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "no-such-model", "training_file": "FILE"}, 404, "model"),
        ({"model": "adaptery-demo", "training_file": "file-nope"}, 400, "training_file"),
        (
            {"model": "adaptery-demo", "training_file": "FILE", "hyperparameters": {"n_epochs": 0}},
            400,
            "hyperparameters.n_epochs",
        ),
        (
            {"model": "adaptery-demo", "training_file": "FILE", "hyperparameters": {"learning_rate_multiplier": -1}},
            400,
            "hyperparameters.learning_rate_multiplier",
        ),
        ({"model": "adaptery-demo", "training_file": "FILE", "hyperparameters": {"warp": 9}}, 400, "hyperparameters"),
        ({"model": "adaptery-demo", "training_file": "FILE", "suffix": "has:colon"}, 400, "suffix"),
        ({"model": "adaptery-demo", "training_file": "FILE", "method": {"type": "reinforcement"}}, 400, "method.type"),
        ({"model": "adaptery-demo"}, 400, "training_file"),
        ({"model": "adaptery-demo", "training_file": "FILE", "bogus": 1}, 400, "bogus"),
        (
            {"model": "adaptery-demo", "training_file": "FILE", "requirements": {"accelerator": "tpu"}},
            400,
            "requirements.accelerator",
        ),
        (
            {"model": "adaptery-demo", "training_file": "FILE", "requirements": {"memory_gb": -4}},
            400,
            "requirements.memory_gb",
        ),
        (  # the batch is the global batch, split evenly among the processes
            {"model": "adaptery-demo", "training_file": "FILE", "hyperparameters": {"batch_size": 3, "processes": 2}},
            400,
            "hyperparameters.batch_size",
        ),
    ],
)
def test_bad_job_requests_get_openai_errors_naming_the_param(running, body, status, param):
    file = upload_sample(running.client, running.auth())
    body = {k: (file["id"] if v == "FILE" else v) for k, v in body.items()}
    response = running.client.post("/v1/fine_tuning/jobs", headers=running.auth(), json=body)
    assert response.status_code == status, response.text
    assert_matches("ErrorResponse", response.json())
    assert response.json()["error"]["param"] == param
    assert running.client.get("/v1/fine_tuning/jobs", headers=running.auth()).json()["data"] == []


def test_jobs_with_requirements_wait_for_an_agent_that_meets_them(running):
    """The embedded agent is platform-wide and says it trains on the CPU: it skips a job that asks for the tenant's
    own island (which waits, saying why) and takes the one behind it that asks for a CPU."""
    client, headers = running.client, running.auth()
    file = upload_sample(client, headers)
    island = create_job(running, model="adaptery-demo", training_file=file["id"], requirements={"island": "tenant"})
    assert_matches("FineTuningJob", island)
    assert island["requirements"] == {"island": "tenant"} and "requirements" not in island["method"]
    on_cpu = create_job(
        running,
        model="adaptery-demo",
        training_file=file["id"],
        hyperparameters={"n_epochs": 50},
        requirements={"accelerator": "cpu", "memory_gb": 0.5},
    )
    assert on_cpu["requirements"] == {"accelerator": "cpu", "memory_gb": 0.5}
    wait_for_job(client, headers, on_cpu["id"], ("running",), timeout=60)
    client.post(f"/v1/fine_tuning/jobs/{on_cpu['id']}/cancel", headers=headers)
    waiting = "Waiting for an agent of your own island (a platform-wide agent may not run it)"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = client.get(f"/v1/fine_tuning/jobs/{island['id']}/events", headers=headers).json()["data"]
        if any(e["message"] == waiting for e in events):
            break
        time.sleep(0.3)
    assert [e["message"] for e in events].count(waiting) == 1
    assert client.get(f"/v1/fine_tuning/jobs/{island['id']}", headers=headers).json()["status"] == "queued"
    client.post(f"/v1/fine_tuning/jobs/{island['id']}/cancel", headers=headers)


def test_a_file_of_another_purpose_cannot_train(running):
    response = running.client.post(
        "/v1/files", headers=running.auth(), files={"file": ("x.txt", b"notes")}, data={"purpose": "user_data"}
    )
    bad = running.client.post(
        "/v1/fine_tuning/jobs",
        headers=running.auth(),
        json={"model": "adaptery-demo", "training_file": response.json()["id"]},
    )
    assert bad.status_code == 400 and "purpose 'user_data'" in bad.json()["error"]["message"]


def test_method_supervised_hyperparameters_are_used(running):
    file = upload_sample(running.client, running.auth())
    job = create_job(
        running,
        model="adaptery-demo",
        training_file=file["id"],
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
    )
    assert job["method"]["supervised"]["hyperparameters"]["n_epochs"] == 3
    assert job["hyperparameters"]["n_epochs"] == 3
    running.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=running.auth())


def test_other_tenant_gets_404_for_job_events_checkpoints_cancel_and_model(running):
    file = upload_sample(running.client, running.auth())
    job = create_job(running, model="adaptery-demo", training_file=file["id"], hyperparameters={"n_epochs": 1})
    done = wait_for_job(running.client, running.auth(), job["id"], ("succeeded", "failed"))
    other = running.auth(running.new_tenant("other", "mallory").api_key)
    for method, path in [
        ("get", f"/v1/fine_tuning/jobs/{job['id']}"),
        ("get", f"/v1/fine_tuning/jobs/{job['id']}/events"),
        ("get", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"),
        ("post", f"/v1/fine_tuning/jobs/{job['id']}/cancel"),
        ("get", f"/v1/models/{done['fine_tuned_model']}"),
        ("delete", f"/v1/models/{done['fine_tuned_model']}"),
    ]:
        response = getattr(running.client, method)(path, headers=other)
        assert response.status_code == 404, (path, response.text)
    chat = running.client.post(
        "/v1/chat/completions",
        headers=other,
        json={"model": done["fine_tuned_model"], "messages": [{"role": "user", "content": "hi"}]},
    )
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found"
    models = running.client.get("/v1/models", headers=other).json()["data"]
    assert done["fine_tuned_model"] not in [m["id"] for m in models]
    assert running.client.get("/v1/fine_tuning/jobs", headers=other).json()["data"] == []
    cannot_train = running.client.post(
        "/v1/fine_tuning/jobs", headers=other, json={"model": "adaptery-demo", "training_file": file["id"]}
    )
    assert cannot_train.status_code == 400 and cannot_train.json()["error"]["param"] == "training_file"
