"""Extend, continue from a checkpoint, fork: new jobs that start from the parent's weights, with lineage."""

from __future__ import annotations

import time

import pytest

from tests.conftest import SAMPLE_CHAT


def finished(running, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = running.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=running.auth()).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def first_loss(running, job_id: str) -> float:
    events = running.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000", headers=running.auth()).json()
    metrics = [e["data"] for e in events["data"] if e["type"] == "metrics" and "train_loss" in e["data"]]
    return min(metrics, key=lambda d: d["step"])["train_loss"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # service logic: one backend is enough
def test_extend_continue_and_fork_start_from_the_parents_weights(running):
    headers = running.auth()
    file = running.client.post(
        "/v1/files", headers=headers, files={"file": SAMPLE_CHAT.open("rb")}, data={"purpose": "fine-tune"}
    ).json()
    parent = running.client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "adaptery-demo", "training_file": file["id"], "hyperparameters": {"n_epochs": 6}},
    ).json()
    refused = running.client.post(f"/api/fine_tuning/jobs/{parent['id']}/extend", headers=headers, json={"n_epochs": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "fine_tuning_job_id"  # not finished
    parent = finished(running, parent["id"])
    assert parent["status"] == "succeeded", parent["error"]

    extended = running.client.post(
        f"/api/fine_tuning/jobs/{parent['id']}/extend", headers=headers, json={"n_epochs": 1}
    )
    assert extended.status_code == 200, extended.text
    extended = extended.json()
    assert extended["lineage"] == {"kind": "extend", "parent_job": parent["id"], "checkpoint": None}
    assert extended["hyperparameters"]["n_epochs"] == 1

    checkpoints = running.client.get(f"/v1/fine_tuning/jobs/{parent['id']}/checkpoints", headers=headers).json()
    early = checkpoints["data"][-1]  # the first epoch's
    continued = running.client.post(
        f"/api/fine_tuning/jobs/{parent['id']}/continue", headers=headers, json={"checkpoint": early["id"]}
    ).json()
    assert continued["lineage"]["checkpoint"] == early["id"]
    forked = running.client.post(
        f"/api/fine_tuning/jobs/{parent['id']}/fork", headers=headers, json={"training_file": file["id"], "n_epochs": 1}
    ).json()
    assert forked["lineage"]["kind"] == "fork"

    for child in (extended, continued, forked):
        done = finished(running, child["id"])
        assert done["status"] == "succeeded", done["error"]
        assert done["fine_tuned_model"] != parent["fine_tuned_model"]
    # Trained further, not from scratch: the extension starts where the parent ended, far below its start.
    assert first_loss(running, extended["id"]) < first_loss(running, parent["id"]) / 2

    bad = running.client.post(
        f"/api/fine_tuning/jobs/{parent['id']}/continue", headers=headers, json={"checkpoint": "x"}
    )
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "checkpoint"
    bad = running.client.post(f"/api/fine_tuning/jobs/{parent['id']}/extend", headers=headers, json={"n_epochs": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n_epochs"
    bad = running.client.post(
        f"/api/fine_tuning/jobs/{parent['id']}/fork", headers=headers, json={"training_file": "file-nope"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "training_file"
    other = running.new_tenant("other", "other-owner")
    hidden = running.client.post(
        f"/api/fine_tuning/jobs/{parent['id']}/extend", headers=running.auth(other.api_key), json={"n_epochs": 1}
    )
    assert hidden.status_code == 404
