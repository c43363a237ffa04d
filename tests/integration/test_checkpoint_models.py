"""A job's checkpoints answer chat like its final model (OpenAI's `fine_tuned_model_checkpoint` ids), for whoever
may use the job's adapter and nobody else."""

from __future__ import annotations

import pytest

from tests.integration.helpers import upload_sample, wait_for_job


@pytest.fixture
def settings_overrides() -> dict[str, object]:
    return {"job_checkpoint_every_steps": 1}


def test_a_checkpoint_answers_chat_and_another_tenant_gets_404(running):
    client, headers = running.client, running.auth()
    file = upload_sample(client, headers)
    job = client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "adaptery-demo", "training_file": file["id"], "hyperparameters": {"n_epochs": 2}},
    ).json()
    done = wait_for_job(client, headers, job["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    listed = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=headers).json()["data"]
    steps = [c["fine_tuned_model_checkpoint"] for c in listed if ":ckpt-step-" in c["fine_tuned_model_checkpoint"]]
    assert steps, listed
    body = {"messages": [{"role": "user", "content": "Where is the lab?"}], "max_tokens": 4, "temperature": 0}
    answered = client.post("/v1/chat/completions", headers=headers, json={**body, "model": steps[-1]})
    assert answered.status_code == 200, answered.text
    assert answered.json()["model"] == steps[-1] and answered.json()["choices"][0]["message"]["content"] is not None

    other = running.new_tenant("other", "mallory")
    refused = client.post(
        "/v1/chat/completions", headers=running.auth(other.api_key), json={**body, "model": steps[-1]}
    )
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    # A checkpoint answers; it is not a model to manage: not listed, not deletable, not a base to fine-tune.
    assert steps[-1] not in [model["id"] for model in client.get("/v1/models", headers=headers).json()["data"]]
    assert client.delete(f"/v1/models/{steps[-1]}", headers=headers).status_code == 404
    missing = client.post("/v1/chat/completions", headers=headers, json={**body, "model": steps[-1] + "0"})
    assert missing.status_code == 404
