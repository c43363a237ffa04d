"""DPO through the OpenAI surface: a preference file is validated at upload, trains, and is served."""

from __future__ import annotations

import json

import pytest

from tests.contracts.openai_schema import assert_matches
from tests.integration.helpers import upload_sample, wait_for_job

QUESTION = [{"role": "user", "content": "Who runs the imaging lab?"}]


def _pair(answer: str, worse: str) -> dict:
    return {
        "input": {"messages": QUESTION},
        "preferred_output": [{"role": "assistant", "content": answer}],
        "non_preferred_output": [{"role": "assistant", "content": worse}],
    }


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # one backend is enough here
def test_a_preference_file_trains_with_method_dpo_and_the_adapter_answers(running):
    client, headers = running.client, running.auth()
    file = upload_sample(client, headers, _jsonl([_pair("Dr. Okafor runs it.", "I do not know.")] * 4))
    assert file["purpose"] == "fine-tune"

    response = client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={
            "model": "adaptery-demo",
            "training_file": file["id"],
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 2}}},
        },
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["method"]["type"] == "dpo"
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.1

    done = wait_for_job(client, headers, job["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    assert_matches("FineTuningJob", done)

    answer = client.post(
        "/v1/chat/completions",
        headers=headers,
        json={"model": done["fine_tuned_model"], "messages": QUESTION, "max_tokens": 8, "temperature": 0},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == done["fine_tuned_model"]


def test_a_broken_preference_file_is_refused_at_upload_naming_line_and_field(running):
    client, headers = running.client, running.auth()
    bad = _jsonl([_pair("Fine.", "Worse."), {**_pair("Fine.", "Worse."), "preferred_output": [{"role": "assistant"}]}])
    response = client.post(
        "/v1/files", headers=headers, files={"file": ("prefs.jsonl", bad)}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "file"
    assert "line 2" in error["message"] and "preferred_output[0]" in error["message"]
    assert client.get("/v1/files", headers=headers).json()["data"] == []


def test_a_chat_file_cannot_train_with_dpo(running):
    client, headers = running.client, running.auth()
    file = upload_sample(client, headers)
    response = client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "adaptery-demo", "training_file": file["id"], "method": {"type": "dpo"}},
    )
    # As in OpenAI's API, the file is checked against the method while the job validates its files,
    # before any compute: the job fails with the first bad line.
    assert response.status_code == 200, response.text
    job = wait_for_job(client, headers, response.json()["id"], ("failed", "succeeded"))
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_training_file" and job["error"]["param"] == "training_file"
    assert "line 1: input.messages" in job["error"]["message"]
    assert job["trained_tokens"] is None
