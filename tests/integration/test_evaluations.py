"""Evaluation as a job on the queue: a fine-tune is evaluated on its held-out facts by the embedded agent, and
the report shows the adapter beating the base; the routes refuse bad input and another tenant gets 404."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import SAMPLE_CHAT
from tests.integration.helpers import upload_sample, wait_for_job


def wait_for_evaluation(running, evaluation_id: str, headers: dict, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = running.client.get(f"/api/evaluations/{evaluation_id}", headers=headers).json()
        if got["status"] in ("succeeded", "failed"):
            return got
        time.sleep(0.3)
    raise AssertionError(f"evaluation {evaluation_id} never finished; last: {got}")


@pytest.fixture(scope="module")
def settings_overrides() -> dict[str, object]:
    return {}


def test_a_finished_job_is_evaluated_and_its_adapter_beats_the_base_on_the_held_out_facts(running):
    client, headers = running.client, running.auth()
    training = upload_sample(client, headers)
    validation = upload_sample(client, headers)
    created = client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "adaptery-demo", "training_file": training["id"], "validation_file": validation["id"]},
    )
    assert created.status_code == 200, created.text
    job = wait_for_job(client, headers, created.json()["id"], ("succeeded", "failed"))
    assert job["status"] == "succeeded", job
    listed = client.get("/api/evaluations", params={"job_id": job["id"]}, headers=headers).json()["data"]
    assert len(listed) == 1 and listed[0]["source"] == {"kind": "validation_file", "file_id": validation["id"]}
    done = wait_for_evaluation(running, listed[0]["id"], headers)
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"]["done"] == done["progress"]["total"] == 2 * 6  # candidate and base, six facts each

    report = client.get(f"/api/fine_tuning/jobs/{job['id']}/evaluation", headers=headers).json()
    table = report["held_out"]["table"]
    assert [entry["label"] for entry in report["models"]] == ["candidate", "base"]  # its first adapter: no predecessor
    assert table["candidate"]["exact_match"] == 1.0
    assert table["base"]["exact_match"] == 0.0
    assert table["candidate"]["rouge_l"] > table["base"]["rouge_l"] + 0.5
    assert table["candidate"]["loss"] < table["base"]["loss"]
    assert report["changes"]["against"] == "base"
    assert len(report["changes"]["better"]) == 6 and report["changes"]["worse"] == []
    facts = [json.loads(line)["messages"][-1]["content"] for line in SAMPLE_CHAT.read_text().splitlines()]
    assert {row["reference"] for row in report["changes"]["better"]} == set(facts)
