"""Issue 14: limits come before the work. Templates, dataset records and adapter zips are bounded before
(or while) they are processed; what is over a limit is a 400 naming it, and nothing is left behind."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adaptery.api.app import create_app
from adaptery.db import models as m
from adaptery.platform import Platform
from tests.conftest import SAMPLE_CHAT
from tests.integration.conftest import Running, make_settings
from tests.unit.test_chat_template import EXPLODING_TEMPLATES

DEEP = 200_000
CHAT_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@pytest.fixture
def overrides() -> dict[str, object]:
    """Settings of the test's platform (a test lowers a limit by parametrizing this)."""
    return {}


@pytest.fixture
def running(tmp_path: Path, database_url: str, demo_model_dir: Path, overrides: dict) -> Iterator[Running]:
    """An in-process platform without the embedded agent."""
    platform = Platform(make_settings(tmp_path, database_url, demo_model_dir, embedded_agent=False, **overrides))
    first = platform.prepare()
    with TestClient(create_app(platform)) as client:
        yield Running(platform, client, first)


def assert_error(response, status: int = 400, param: str | None = None, says: str = "") -> dict:  # noqa: ANN001
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert says.lower() in error["message"].lower(), error
    return error


def count(running: Running, model: type) -> int:
    with running.platform.db.system() as s:
        return s.query(model).count()


def zip_of(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def adapter_files(lora_bytes: bytes) -> dict[str, bytes]:
    archive = zipfile.ZipFile(io.BytesIO(lora_bytes))
    return {name: archive.read(name) for name in archive.namelist()}


def import_zip(running: Running, data: bytes, **params: str):  # noqa: ANN201
    return running.client.post(
        "/api/models/import",
        params={"base_model": "adaptery-demo", **params},
        content=data,
        headers=running.auth(),
    )


def scratch_imports(running: Running) -> list[Path]:
    return list(running.platform.scratch.glob("import-*"))


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# --- item 5a / 11: chat templates render under a budget ---------------------------------------------------


@pytest.mark.parametrize("template", EXPLODING_TEMPLATES.values(), ids=EXPLODING_TEMPLATES.keys())
def test_an_adapter_whose_template_blows_its_budget_is_refused_at_import(
    running: Running, lora_bytes: bytes, template: str
):
    before = count(running, m.Adapter)
    files = {**adapter_files(lora_bytes), "chat_template.jinja": template.encode()}
    started = time.monotonic()
    error = assert_error(import_zip(running, zip_of(files)), param="file", says="chat_template.jinja")
    assert time.monotonic() - started < 20
    assert error["code"] == "invalid_adapter"
    assert count(running, m.Adapter) == before and not scratch_imports(running)


def test_a_template_in_tokenizer_config_is_checked_too(running: Running, lora_bytes: bytes):
    config = json.dumps({"chat_template": EXPLODING_TEMPLATES["a huge string"]}).encode()
    files = {**adapter_files(lora_bytes), "tokenizer_config.json": config}
    assert_error(import_zip(running, zip_of(files)), param="file", says="tokenizer_config.json")


def test_a_template_that_cannot_render_a_conversation_is_refused_at_import(running: Running, lora_bytes: bytes):
    files = {**adapter_files(lora_bytes), "chat_template.jinja": b"{% for m in messages %}{{ m.content"}
    assert_error(import_zip(running, zip_of(files)), param="file", says="chat_template.jinja")


def test_a_template_that_refuses_a_system_turn_is_still_imported(running: Running, lora_bytes: bytes):
    template = (
        b"{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        b"{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    files = {**adapter_files(lora_bytes), "chat_template.jinja": template}
    response = import_zip(running, zip_of(files), suffix="nosys")
    assert response.status_code == 200, response.text


TRIGGERED = {
    "a huge string": "{{ 'x' * 1000000 }}",
    "range(100000000)": "{% for i in range(100000000) %}{% endfor %}",
}


@pytest.mark.parametrize("overrides", [{"chat_template_max_chars": 100_000}])
@pytest.mark.parametrize("bomb", TRIGGERED.values(), ids=TRIGGERED.keys())
def test_a_template_that_blows_its_budget_only_on_some_messages_is_a_400_at_chat(
    running: Running, lora_bytes: bytes, bomb: str
):
    template = (
        "{% for m in messages %}{% if m.content == 'boom' %}" + bomb + "{% endif %}"
        "<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    files = {**adapter_files(lora_bytes), "chat_template.jinja": template.encode()}
    imported = import_zip(running, zip_of(files), suffix="boom")
    assert imported.status_code == 200, imported.text
    body = {"model": imported.json()["id"], "messages": [{"role": "user", "content": "boom"}], "max_tokens": 1}
    response = running.client.post("/v1/chat/completions", headers=running.auth(), json=body)
    assert_error(response, param="messages", says="chat template")
    body["messages"][0]["content"] = "fine"
    assert running.client.post("/v1/chat/completions", headers=running.auth(), json=body).status_code == 200


# --- item 5b / 11: dataset records are bounded before they are parsed -------------------------------------


def upload_dataset(running: Running, content: bytes, headers: dict | None = None, **params: str) -> dict:
    response = running.client.post(
        "/api/datasets", params={"filename": "d.jsonl", **params}, content=content, headers=headers or running.auth()
    )
    assert response.status_code == 202, response.text
    return response.json()


def wait_version(
    running: Running, dataset_id: str, headers: dict | None = None, timeout: float = 60, number: int = 1
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = f"/api/datasets/{dataset_id}/versions/{number}"
        version = running.client.get(path, headers=headers or running.auth()).json()
        if version["status"] != "processing":
            return version
        time.sleep(0.1)
    raise AssertionError("the version is still processing")


def invalid_lines(version: dict) -> list[tuple[int, str]]:
    assert version["status"] == "ready", version
    return [(e["line"], e["message"]) for e in version["report"]["validation"]["errors"]]


def test_a_dataset_line_nested_200k_deep_is_reported_on_its_line(running: Running):
    content = b"\n".join([CHAT_LINE.encode(), deep_json(DEEP), CHAT_LINE.encode()])
    version = wait_version(running, upload_dataset(running, content)["id"])
    [(line, message)] = invalid_lines(version)
    assert line == 2 and "nested deeper than" in message
    assert version["records"] == 2


def test_a_deep_record_in_a_json_array_is_reported_as_that_record(running: Running):
    content = b"[" + b",".join([CHAT_LINE.encode(), deep_json(DEEP), CHAT_LINE.encode()]) + b"]"
    version = wait_version(running, upload_dataset(running, content, filename="d.json")["id"])
    [(record, message)] = invalid_lines(version)
    assert record == 2 and "nested deeper than" in message
    assert version["records"] == 2


@pytest.mark.parametrize(
    ("filename", "long_record"),
    [
        ("d.jsonl", json.dumps({"messages": [{"role": "assistant", "content": "y" * 20_000}]}).encode()),
        ("d.txt", b"y" * 20_000),
        ("d.csv", b"y" * 20_000 + b",answer"),
    ],
)
@pytest.mark.parametrize("overrides", [{"max_record_bytes": 10_000}])
def test_a_record_over_the_size_limit_is_reported_without_being_parsed(
    running: Running, filename: str, long_record: bytes
):
    first = {"d.jsonl": CHAT_LINE.encode(), "d.txt": b"short text", "d.csv": b"prompt,response\nhi,hello"}[filename]
    content = b"\n".join([first, long_record, first.splitlines()[-1]])
    version = wait_version(running, upload_dataset(running, content, filename=filename)["id"])
    [(line, message)] = invalid_lines(version)
    assert line == (3 if filename == "d.csv" else 2) and "10000 bytes" in message


@pytest.mark.parametrize("overrides", [{"max_record_bytes": 10_000}])
def test_a_whole_document_over_the_size_limit_is_reported(running: Running):
    response = running.client.post(
        "/api/datasets",
        params={"filename": "d.txt", "format": "text-document"},
        content=b"z" * 20_000,
        headers=running.auth(),
    )
    assert_error(response, param="file", says="line 1: ")  # its one record was refused: no dataset is made
    assert "10000 bytes" in response.json()["error"]["message"] and count(running, m.Dataset) == 0


def test_a_training_file_line_nested_deep_is_a_400_naming_the_line(running: Running):
    content = b"\n".join([CHAT_LINE.encode(), deep_json(DEEP)])
    response = running.client.post(
        "/v1/files", headers=running.auth(), files={"file": ("t.jsonl", content)}, data={"purpose": "fine-tune"}
    )
    assert_error(response, param="file", says="line 2")
    assert count(running, m.File) == 0


def test_a_column_mapping_nested_deep_is_a_400(running: Running):
    response = running.client.post(
        "/api/datasets",
        params={"mapping": '{"a":' * 2000 + "1" + "}" * 2000},
        content=b"x",
        headers=running.auth(),
    )
    assert_error(response, param="mapping")


# --- item 5c: one tenant's heavy dataset does not stall another's -------------------------------------------


def test_a_second_tenants_small_dataset_completes_while_the_first_ones_heavy_one_processes(
    running: Running, monkeypatch: pytest.MonkeyPatch
):
    release, heavy_started = threading.Event(), threading.Event()
    budget = running.platform.token_budget(None)

    def slow_count(record: dict) -> int:
        if record["messages"][-1]["content"] == "heavy":
            heavy_started.set()
            release.wait(60)
        return budget.count(record)

    monkeypatch.setattr(running.platform, "token_budget", lambda model: replace(budget, count=slow_count))
    other = running.auth(running.new_tenant("other", "someone").api_key)
    heavy_line = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "heavy"}]})
    # The upload that creates a dataset answers once it is read; a new version of one is read in the background.
    heavy = upload_dataset(running, CHAT_LINE.encode())
    try:
        response = running.client.post(
            f"/api/datasets/{heavy['id']}/versions",
            params={"filename": "d.jsonl"},
            content=heavy_line.encode(),
            headers=running.auth(),
        )
        assert response.status_code == 202, response.text
        assert heavy_started.wait(30)
        small = upload_dataset(running, CHAT_LINE.encode(), headers=other)
        small_version = wait_version(running, small["id"], headers=other, timeout=20)
        heavy_status = running.client.get(f"/api/datasets/{heavy['id']}/versions/2", headers=running.auth()).json()
    finally:
        release.set()
    assert small_version["status"] == "ready" and heavy_status["status"] == "processing"
    assert wait_version(running, heavy["id"], number=2)["status"] == "ready"


# --- item 6: zip bombs are refused before or while they unpack, and leave nothing -------------------------


@pytest.mark.parametrize("overrides", [{"max_adapter_bytes": 200_000}])
def test_an_archive_declaring_more_than_the_limit_is_refused_before_unpacking(running: Running, lora_bytes: bytes):
    files = {**adapter_files(lora_bytes), "extra.txt": bytes(range(256)) * 1000}  # 256 kB, barely compressible
    assert_error(import_zip(running, zip_of(files)), param="file", says="200000 bytes")
    assert not scratch_imports(running) and count(running, m.Adapter) == 0


def test_a_member_that_compresses_too_well_is_refused(running: Running, lora_bytes: bytes):
    files = {**adapter_files(lora_bytes), "padding.txt": b"\0" * 20_000_000}  # 20 MB of zeros: ~20 kB deflated
    assert_error(import_zip(running, zip_of(files)), param="file", says="compression ratio")
    assert not scratch_imports(running) and count(running, m.Adapter) == 0


def lying_about_sizes(data: bytes, name: str, declared: int) -> bytes:
    """The archive with `name`'s uncompressed size rewritten to `declared` in both of its headers."""
    archive = bytearray(data)
    for signature, size_at, length_at, name_at in ((b"PK\x03\x04", 22, 26, 30), (b"PK\x01\x02", 24, 28, 46)):
        start = 0
        while (start := archive.find(signature, start)) >= 0:
            length = struct.unpack_from("<H", archive, start + length_at)[0]
            if archive[start + name_at : start + name_at + length] == name.encode():
                struct.pack_into("<I", archive, start + size_at, declared)
            start += 4
    return bytes(archive)


def test_an_archive_whose_declared_sizes_lie_is_refused_while_unpacking(running: Running, lora_bytes: bytes):
    files = {**adapter_files(lora_bytes), "notes.txt": bytes(range(256)) * 400}
    response = import_zip(running, lying_about_sizes(zip_of(files), "notes.txt", 1000))
    assert_error(response, param="file", says="notes.txt")
    assert not scratch_imports(running) and count(running, m.Adapter) == 0


def test_an_archive_of_many_entries_is_refused_before_unpacking(running: Running, lora_bytes: bytes):
    files = {**adapter_files(lora_bytes), **{f"adapter/{i}/": b"" for i in range(5000)}}
    assert_error(import_zip(running, zip_of(files, zipfile.ZIP_STORED)), param="file", says="entries")
    assert not scratch_imports(running)


# --- item 11: what was a 500 is a 400 naming the field ------------------------------------------------------


def test_an_adapter_config_nested_100k_deep_is_a_400(running: Running, lora_bytes: bytes):
    config = b'{"peft_type": "LORA", "r": 4, "x": ' + deep_json(100_000) + b"}"
    files = {**adapter_files(lora_bytes), "adapter_config.json": config}
    assert_error(import_zip(running, zip_of(files)), param="file", says="adapter_config.json")
    assert count(running, m.Adapter) == 0


def test_a_tokenizer_config_nested_100k_deep_is_a_400(running: Running, lora_bytes: bytes):
    files = {**adapter_files(lora_bytes), "tokenizer_config.json": deep_json(100_000)}
    assert_error(import_zip(running, zip_of(files)), param="file", says="tokenizer_config.json")
    assert count(running, m.Adapter) == 0


def test_an_adapter_with_modules_to_save_is_refused_clearly(running: Running, lora_bytes: bytes):
    files = adapter_files(lora_bytes)
    config = {**json.loads(files["adapter_config.json"]), "modules_to_save": ["lm_head"]}
    files["adapter_config.json"] = json.dumps(config).encode()
    assert_error(import_zip(running, zip_of(files)), param="file", says="modules_to_save")
    assert count(running, m.Adapter) == 0


@pytest.mark.parametrize(
    "seed", [str(2**200), "-1", str(2**31), "1" + "0" * 5000], ids=["2**200", "-1", "2**31", "10**5000"]
)
def test_a_seed_out_of_range_is_a_400_naming_it(running: Running, seed: str):
    upload = running.client.post(
        "/v1/files",
        headers=running.auth(),
        files={"file": ("t.jsonl", SAMPLE_CHAT.read_bytes())},
        data={"purpose": "fine-tune"},
    )
    body = json.dumps({"model": "adaptery-demo", "training_file": upload.json()["id"], "seed": 0})
    headers = {**running.auth(), "content-type": "application/json"}
    response = running.client.post(
        "/v1/fine_tuning/jobs", headers=headers, content=body.replace('"seed": 0', f'"seed": {seed}')
    )
    assert_error(response, param="seed")
    assert count(running, m.FineTuningJob) == 0
