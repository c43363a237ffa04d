"""`adaptery keys rotate-master` against a running server: it keeps serving, and new tenants get keys under the new
master key (that the old key is not needed afterwards: tests/integration/test_encryption_at_rest.py)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import SAMPLE_CHAT


def upload(server, key: str) -> str:
    response = httpx.post(
        f"{server.url}/v1/files",
        headers={"Authorization": f"Bearer {key}"},
        files={"file": ("train.jsonl", SAMPLE_CHAT.read_bytes())},
        data={"purpose": "fine-tune"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def content(server, key: str, file_id: str) -> bytes:
    response = httpx.get(f"{server.url}/v1/files/{file_id}/content", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.content


def new_tenant(server, name: str) -> str:
    made = server.cli("tenants", "create", name, "--owner", f"{name}-owner")
    assert made.returncode == 0, made.stderr
    return next(line.split("=", 1)[1] for line in made.stdout.splitlines() if line.startswith("ADAPTERY_API_KEY="))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_rotate_master_key_without_downtime(server, monkeypatch):
    monkeypatch.delenv("ADAPTERY_MASTER_KEY", raising=False)
    key_file = server.data_dir / "keys" / "master.key"
    old = key_file.read_text()
    before = upload(server, server.api_key)

    rotated = server.cli("keys", "rotate-master")
    assert rotated.returncode == 0, rotated.stderr
    assert "1 tenant data keys re-wrapped" in rotated.stdout
    assert key_file.read_text() != old and (key_file.stat().st_mode & 0o777) == 0o600

    # The server never stopped: old data reads, and a tenant made afterwards works.
    assert content(server, server.api_key, before) == SAMPLE_CHAT.read_bytes()
    other = new_tenant(server, "after-rotation")
    after = upload(server, other)
    assert content(server, other, after) == SAMPLE_CHAT.read_bytes()
