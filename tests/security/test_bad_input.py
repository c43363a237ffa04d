"""Bad input gets a clear error in OpenAI's shape and leaves nothing behind."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from pathlib import Path

import pytest

from adaptery.api.guards import RequestGuard, json_depth
from adaptery.db import models as m
from adaptery.engine.loading import ModelNotAvailable, load_causal_lm
from adaptery.settings import Settings
from tests.conftest import SAMPLE_CHAT
from tests.security.conftest import World

CHAT = {"model": "adaptery-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def count(world: World, model: type) -> int:
    with world.platform.db.system() as s:
        return s.query(model).count()


def assert_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:  # noqa: ANN001
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_json_nested_too_deep_is_refused_before_any_handler(world: World):
    deep = {"model": "adaptery-demo", "messages": [{"role": "user", "content": "x"}], "metadata": {}}
    node = deep["metadata"]
    for _ in range(200):
        node["a"] = {}
        node = node["a"]
    before = count(world, m.FineTuningJob)
    headers = {**world.auth("owner"), "content-type": "application/json"}
    response = world.client.post("/v1/fine_tuning/jobs", headers=headers, content=json.dumps(deep))
    assert_error(response, 400, code="json_too_deep")
    assert count(world, m.FineTuningJob) == before


def test_json_depth_ignores_brackets_inside_strings():
    assert json_depth(b'{"a": "[[[[{{{{", "b": [1, [2]]}') == 3
    assert json_depth(b'{"a": "\\"[[[["}') == 1


def test_an_oversized_json_body_is_413_without_reading_it_all(world: World, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(world.platform.settings, "max_json_bytes", 1000)
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_error(world.client.post("/v1/chat/completions", headers=world.auth("owner"), json=body), 413)

    # Chunked, with no Content-Length to refuse on (the test client hands the app its body in one piece, so the
    # guard is driven directly): reading stops at the first chunk past the limit, and the app never runs.
    chunk, chunks, read = b" " * 256, 400, []
    reached_app: list[dict] = []
    sent: list[dict] = []

    async def receive() -> dict:
        read.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": len(read) < chunks}

    async def send(message: dict) -> None:
        sent.append(message)

    async def app(scope, receive, send):  # noqa: ANN001, ANN202
        reached_app.append(scope)

    guard = RequestGuard(app, Settings(max_json_bytes=1000))
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]}  # fmt: skip
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert not reached_app
    assert 1000 < sum(read) <= 1000 + len(chunk) < chunks * len(chunk)  # more than the limit was offered


def test_json_routes_take_only_json(world: World):
    response = world.client.post(
        "/v1/chat/completions",
        headers={**world.auth("owner"), "content-type": "text/plain"},
        content=json.dumps(CHAT),
    )
    assert_error(response, 415)
    before = count(world, m.ApiKey)
    form = world.client.post("/api/keys", headers=world.auth("owner"), data={"name": "x"})
    assert_error(form, 415)
    assert count(world, m.ApiKey) == before


def test_a_stalled_body_is_cut_off_as_a_disconnect():
    seen: list[dict] = []

    async def app(scope, receive, send):  # noqa: ANN001, ANN202
        seen.append(await receive())

    async def stalled():  # noqa: ANN202
        await asyncio.sleep(10)

    guard = RequestGuard(app, Settings(request_body_timeout_seconds=0.05))
    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", b"application/octet-stream")]}
    asyncio.run(guard(scope, stalled, None))
    assert seen == [{"type": "http.disconnect"}]


@pytest.mark.parametrize("name", ["../../etc/passwd", "..\\..\\windows\\win.ini", "/abs/path/x.jsonl"])
def test_upload_filenames_are_labels_never_paths(world: World, name: str):
    response = world.client.post(
        "/v1/files",
        headers=world.auth("owner"),
        files={"file": (name, SAMPLE_CHAT.read_bytes())},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    stored = response.json()["filename"]
    assert "/" not in stored and "\\" not in stored and ".." not in stored
    data_dir = world.platform.settings.data_dir.resolve()
    assert not (data_dir.parent / "etc").exists() and not Path("/abs/path").exists()


def test_dataset_filenames_are_sanitised_too(world: World):
    response = world.client.post(
        "/api/datasets",
        params={"filename": "../../../tmp/evil.jsonl"},
        headers=world.auth("owner"),
        content=SAMPLE_CHAT.read_bytes(),
    )
    assert response.status_code == 202, response.text
    assert response.json()["versions"][0]["source_filename"] == "evil.jsonl"


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("weights", ["adapter_model.bin", "adapter_model.pt", "weights.pkl"])
def test_pickled_adapter_uploads_are_refused_and_nothing_is_registered(world: World, weights: str):
    before = count(world, m.Adapter)
    config = json.dumps({"peft_type": "LORA", "r": 4, "base_model_name_or_path": "adaptery-demo"}).encode()
    response = world.client.post(
        "/api/models/import",
        params={"base_model": "adaptery-demo"},
        headers=world.auth("owner"),
        content=_zip({"adapter_config.json": config, weights: b"\x80\x04pickle"}),
    )
    error = assert_error(response, 400)
    assert "pickle" in error["message"]
    assert count(world, m.Adapter) == before


def test_a_pickled_base_model_is_never_loaded(tmp_path: Path, demo_model_dir: Path):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    for path in demo_model_dir.iterdir():
        if path.suffix != ".safetensors":
            (model_dir / path.name).write_bytes(path.read_bytes())
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelNotAvailable, match="refused"):
        load_causal_lm(str(model_dir))


def test_max_tokens_and_prompt_are_checked_against_the_model(world: World):
    too_many = world.client.post(
        "/v1/chat/completions", headers=world.auth("owner"), json={**CHAT, "max_tokens": 10**6}
    )
    assert_error(too_many, 400, param="max_tokens")
    long_prompt = {**CHAT, "messages": [{"role": "user", "content": "word " * 20000}]}
    response = world.client.post("/v1/chat/completions", headers=world.auth("owner"), json=long_prompt)
    assert_error(response, 400, code="context_length_exceeded")


def test_a_version_number_beyond_what_the_database_holds_is_a_400_not_a_500(world: World):
    dataset = world.ids["dataset_id"]
    for suffix in ("", "/records", "/content"):
        response = world.client.get(f"/api/datasets/{dataset}/versions/{2**63}{suffix}", headers=world.auth("owner"))
        assert response.status_code == 400 and response.json()["error"]["param"] == "number", suffix
    for operation in ("dedup", "validate", "split", "export"):
        response = world.client.post(
            f"/api/datasets/{dataset}/versions/{2**63}/{operation}", headers=world.auth("owner"), json={}
        )
        assert response.status_code == 400, operation


def test_a_lone_surrogate_anywhere_in_a_json_body_is_a_400_naming_its_field(world: World):
    owner = {**world.auth("owner"), "content-type": "application/json"}
    for path, body, param in (
        ("/v1/fine_tuning/jobs", '{"model": "\\ud800", "training_file": "file-x"}', "model"),
        ("/v1/embeddings", '{"model": "all-MiniLM-L6-v2", "input": ["ok", "x\\udfff"]}', "input[1]"),
        ("/v1/chat/completions", '{"model": "\\ud800", "messages": []}', "model"),
    ):
        response = world.client.post(path, headers=owner, content=body)
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["param"] == param
    pair = world.client.post(
        "/v1/embeddings", headers=owner, content='{"model": "all-MiniLM-L6-v2", "input": "smile \\ud83d\\ude00"}'
    )
    assert pair.status_code == 200  # a surrogate pair is an ordinary character


def test_audit_paging_beyond_what_the_database_holds_is_a_400(world: World):
    response = world.client.get("/api/admin/audit", headers=world.auth("owner"), params={"after": 2**63})
    assert response.status_code == 400 and response.json()["error"]["param"] == "after"


def test_integers_beyond_what_the_database_holds_are_a_400_naming_the_field(world: World):
    """FINDINGS L1: each of these was a 500 (SQLite OverflowError) for an integer of 2**63 or more."""
    member, owner, huge = world.auth("member"), world.auth("owner"), 2**70
    made = world.client.post("/api/model_names", headers=member, json={"name": "big", "version": world.ids["model_id"]})
    assert made.status_code in (200, 201), made.text
    key_id = world.client.post("/api/keys", headers=owner, json={"name": "bounded"}).json()["id"]
    for method, path, body, param in (
        ("POST", "/api/model_names/big/promote", {"version": huge}, "version"),
        ("PUT", "/api/model_names/big/canary", {"version": huge, "share": 1}, "version"),
        (
            "POST",
            "/api/model_names/big/fine_tune",
            {"dataset": world.ids["dataset_id"], "dataset_version": huge},
            "dataset_version",
        ),
        ("POST", "/api/keys", {"limits": {"monthly_tokens": huge}}, "limits.monthly_tokens"),
        ("POST", "/api/keys", {"limits": {"concurrent_streams": 2**63}}, "limits.concurrent_streams"),
        ("PATCH", f"/api/keys/{key_id}", {"limits": {"requests_per_minute": huge}}, "limits.requests_per_minute"),
    ):
        caller = member if path.startswith("/api/model_names") else owner
        response = world.client.request(method, path, headers=caller, json=body)
        assert response.status_code == 400, (path, body, response.text)
        assert response.json()["error"]["param"].startswith(param.split(".")[0]), (path, response.text)
