"""/v1/files: uploads are validated, complete or absent, and private to their tenant."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SAMPLE_CHAT
from tests.contracts.openai_schema import assert_matches
from tests.integration.helpers import upload_sample


def blob_files(running) -> list:
    return [p for p in (running.platform.settings.blobs_dir / "tenants").rglob("*") if p.is_file()]


def test_upload_list_retrieve_download_delete(running):
    client, headers = running.client, running.auth()
    created = upload_sample(client, headers)
    assert_matches("OpenAIFile", created)
    assert created["purpose"] == "fine-tune" and created["filename"] == "train.jsonl"

    listed = client.get("/v1/files", headers=headers).json()
    assert_matches("ListFilesResponse", listed)
    assert [f["id"] for f in listed["data"]] == [created["id"]]

    assert client.get(f"/v1/files/{created['id']}", headers=headers).json() == created
    content = client.get(f"/v1/files/{created['id']}/content", headers=headers)
    assert content.content == SAMPLE_CHAT.read_bytes()

    deleted = client.delete(f"/v1/files/{created['id']}", headers=headers).json()
    assert_matches("DeleteFileResponse", deleted)
    assert client.get(f"/v1/files/{created['id']}", headers=headers).status_code == 404
    assert blob_files(running) == []


def test_downloaded_content_is_the_uploaded_bytes(running):
    payload = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    created = upload_sample(running.client, running.auth(), payload)
    assert running.client.get(f"/v1/files/{created['id']}/content", headers=running.auth()).content == payload


def test_openai_function_calling_training_file_is_accepted(running):
    """OpenAI's documented function-calling fine-tuning format, content parts included."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Rome?"}]},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
            {"role": "assistant", "content": "18 degrees."},
        ],
        "tools": [weather],
    }
    created = upload_sample(running.client, running.auth(), json.dumps(record).encode() + b"\n")
    assert created["status"] == "processed"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"messages": [}\n', "line 1: invalid JSON"),
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "c", '
            b'"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}\n',
            "line 1: messages[1].tool_calls[0].function.name: calls 'f', which is not in tools",
        ),
        (
            b'{"messages": [{"role": "bot", "content": "x"}]}\n',
            "line 1: messages[0].role: unknown role 'bot' (expected system, user, assistant or tool)",
        ),
        (
            b'{"messages": [{"role": "user", "content": "only a question"}]}\n',
            "line 1: messages: has no assistant message to learn from",
        ),
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}\n',
            "line 1: messages[1].content: is empty",
        ),
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n[1, 2]\n',
            "line 2: each line must be a JSON object",
        ),
        (b"", "the file has no records"),
    ],
)
def test_invalid_training_file_is_refused_with_line_and_field_and_nothing_is_kept(running, content, expected):
    response = running.client.post(
        "/v1/files", headers=running.auth(), files={"file": ("bad.jsonl", content)}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 400
    body = response.json()
    assert_matches("ErrorResponse", body)
    assert expected in body["error"]["message"]
    assert body["error"]["param"] == "file"
    assert running.client.get("/v1/files", headers=running.auth()).json()["data"] == []
    assert blob_files(running) == []


def test_every_bad_line_is_reported_not_just_the_first(running):
    lines = [json.dumps({"messages": [{"role": "user", "content": "q"}]}) for _ in range(3)]
    response = running.client.post(
        "/v1/files",
        headers=running.auth(),
        files={"file": ("bad.jsonl", "\n".join(lines).encode())},
        data={"purpose": "fine-tune"},
    )
    message = response.json()["error"]["message"]
    assert "3 invalid line(s) of 3" in message
    assert "line 1" in message and "line 2" in message and "line 3" in message


def test_unknown_purpose_is_a_400_naming_the_param(running):
    response = running.client.post(
        "/v1/files", headers=running.auth(), files={"file": ("x.txt", b"hi")}, data={"purpose": "nonsense"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "purpose"


def test_filename_is_a_label_never_a_path(running):
    response = running.client.post(
        "/v1/files",
        headers=running.auth(),
        files={"file": ("../../etc/passwd", b"hello")},
        data={"purpose": "user_data"},
    )
    assert response.json()["filename"] == "passwd"


@pytest.mark.parametrize("settings_overrides", [{"max_upload_bytes": 1000}])
def test_upload_over_the_limit_is_413_and_leaves_nothing(running):
    response = running.client.post(
        "/v1/files", headers=running.auth(), files={"file": ("big.txt", b"x" * 5000)}, data={"purpose": "user_data"}
    )
    assert response.status_code == 413
    assert_matches("ErrorResponse", response.json())
    assert running.client.get("/v1/files", headers=running.auth()).json()["data"] == []
    assert blob_files(running) == []
    assert list((running.platform.settings.blobs_dir / "tmp").iterdir()) == []


def test_list_pagination_with_after_cursor(running):
    ids = [upload_sample(running.client, running.auth())["id"] for _ in range(3)]
    first = running.client.get("/v1/files?limit=2", headers=running.auth()).json()
    assert first["has_more"] is True and len(first["data"]) == 2
    rest = running.client.get(f"/v1/files?limit=2&after={first['last_id']}", headers=running.auth()).json()
    assert rest["has_more"] is False
    assert {f["id"] for f in first["data"] + rest["data"]} == set(ids)


def test_other_tenant_gets_404_for_file_and_its_content(running):
    created = upload_sample(running.client, running.auth())
    other = running.new_tenant("other", "mallory")
    for method, path in [
        ("get", f"/v1/files/{created['id']}"),
        ("get", f"/v1/files/{created['id']}/content"),
        ("delete", f"/v1/files/{created['id']}"),
    ]:
        response = getattr(running.client, method)(path, headers=running.auth(other.api_key))
        assert response.status_code == 404, path
        assert_matches("ErrorResponse", response.json())
    assert running.client.get("/v1/files", headers=running.auth(other.api_key)).json()["data"] == []
    assert running.client.get(f"/v1/files/{created['id']}", headers=running.auth()).status_code == 200
