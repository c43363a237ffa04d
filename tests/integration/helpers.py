"""Small helpers the integration tests share."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from tests.conftest import SAMPLE_CHAT


def upload_sample(client: TestClient, headers: dict[str, str], content: bytes | None = None) -> dict:
    data = SAMPLE_CHAT.read_bytes() if content is None else content
    response = client.post(
        "/v1/files", headers=headers, files={"file": ("train.jsonl", data)}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_job(
    client: TestClient, headers: dict[str, str], job_id: str, statuses: tuple[str, ...], timeout: float = 180
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached {statuses}; last: {job}")
