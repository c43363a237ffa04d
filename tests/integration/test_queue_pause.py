"""Pause and resume as in OpenAI's API: a running job stops at a checkpoint and continues from it."""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import SAMPLE_CHAT


def wait_for_status(running, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = running.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=running.auth()).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {statuses}")


def messages_of(running, job_id: str) -> list[str]:
    events = running.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000", headers=running.auth()).json()
    return [e["message"] for e in reversed(events["data"])]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # one backend is enough here
def test_a_paused_job_resumes_from_its_checkpoint_and_finishes(running):
    headers = running.auth()
    file = running.client.post(
        "/v1/files", headers=headers, files={"file": SAMPLE_CHAT.open("rb")}, data={"purpose": "fine-tune"}
    ).json()
    job = running.client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "adaptery-demo", "training_file": file["id"], "hyperparameters": {"n_epochs": 20}},
    ).json()
    refused = running.client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume", headers=headers)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "fine_tuning_job_id"

    deadline = time.monotonic() + 120
    while not any(m.startswith("Checkpoint saved") for m in messages_of(running, job["id"])):
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.2)
    pausing = running.client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause", headers=headers)
    assert pausing.status_code == 200 and pausing.json()["status"] in ("running", "paused")
    paused = wait_for_status(running, job["id"], ("paused", "succeeded", "failed"), timeout=30)
    assert paused["status"] == "paused", paused["error"]
    step = int(re.search(r"Job paused at step (\d+)", " ".join(messages_of(running, job["id"]))).group(1))
    assert step > 0
    checkpoints = running.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=headers).json()["data"]
    assert checkpoints[0]["step_number"] == step and checkpoints[0]["metrics"]["step"] == step

    assert running.platform.queue.lease("another-agent") is None  # a paused job stays put: nobody leases it
    assert wait_for_status(running, job["id"], ("paused",))["status"] == "paused"
    resumed = running.client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume", headers=headers).json()
    assert resumed["status"] == "queued"
    done = wait_for_status(running, job["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    messages = messages_of(running, job["id"])
    assert any(f"resuming from step {step}" in m for m in messages)
    assert any(f"resuming at step {step}" in m for m in messages)  # the trainer continued, not from zero
    again = running.client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause", headers=headers)
    assert again.status_code == 400
