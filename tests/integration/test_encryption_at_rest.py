"""Encryption at rest: after a dataset, a fine-tune file, a trained and an imported adapter and a saved chat, no
file under the data directory holds a byte of their plaintext; master key rotation keeps everything readable."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from adaptery.db import models as m
from adaptery.storage.blobs import BlobStore
from adaptery.storage.crypto import LocalKeyProvider, TamperedError
from adaptery.storage.keys import Keyring, rotate_master_key
from tests.conftest import SAMPLE_CHAT
from tests.integration.helpers import upload_sample, wait_for_job
from tests.integration.test_datasets_api import ready, wait_version
from tests.unit.test_crypto import seal_v1

DATASET_SECRETS = ("Quokka-Zanzibar-4471 ledger", "vermilion-oboe-20931", "zyx.secretary@hospital-7731.example")
TRAINING_SECRET = "Aubergine-protocol-88120 dosage"
CHAT_SECRETS = ("Marmalade-cipher-5531 diagnosis", "Pangolin-title-0042", "System prompt Heliotrope-7719")


def chat_line(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def leaks(files: list[Path], needles: list[bytes]) -> list[tuple[str, str]]:
    found = []
    for path in files:
        data = path.read_bytes()
        found += [(str(path), n[:40].decode(errors="replace")) for n in needles if n in data]
    return found


def safetensors_run(archive_bytes: bytes) -> bytes:
    """64 bytes from the middle of the adapter's tensor data (past the JSON header): content, not format."""
    data = zipfile.ZipFile(io.BytesIO(archive_bytes)).read("adapter_model.safetensors")
    header = 8 + int.from_bytes(data[:8], "little")
    middle = header + (len(data) - header) // 2
    run = data[middle : middle + 64]
    assert len(set(run)) > 16  # varied bytes, not padding
    return run


def test_nothing_under_the_data_dir_is_plaintext(running):
    client, headers, p = running.client, running.auth(), running.platform
    # A dataset (its upload, normalised version, a scrubbed version and a report quoting PII snippets).
    lines = [chat_line(f"What is {s}?", f"It is {s}, noted.") for s in DATASET_SECRETS] * 2
    dataset, _ = ready(running, "\n".join(lines).encode(), name="clinic", filename="notes.jsonl")
    made = client.post(f"/api/datasets/{dataset['id']}/versions/1/scrub", json={}, headers=headers).json()
    scrubbed = wait_version(running, dataset["id"], made["data"][0]["version"])
    assert scrubbed["status"] == "ready" and scrubbed["report"]["pii"]["examples"]  # opened for its owner
    # A fine-tune file and the adapter trained on it.
    training = SAMPLE_CHAT.read_text() + chat_line(f"Remember {TRAINING_SECRET}", TRAINING_SECRET) + "\n"
    file = upload_sample(client, headers, training.encode())
    job = client.post(
        "/v1/fine_tuning/jobs", headers=headers, json={"model": "adaptery-demo", "training_file": file["id"]}
    ).json()
    done = wait_for_job(client, headers, job["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]
    download = client.get(f"/api/models/{done['fine_tuned_model']}/download", headers=headers)
    assert download.status_code == 200
    # An imported adapter (another one: the trained weights scaled).
    from safetensors.torch import load, save

    archive = zipfile.ZipFile(io.BytesIO(download.content))
    tensors = {name: t * 1.5 for name, t in load(archive.read("adapter_model.safetensors")).items()}
    imported_zip = io.BytesIO()
    with zipfile.ZipFile(imported_zip, "w") as out:
        out.writestr("adapter_config.json", archive.read("adapter_config.json"))
        out.writestr("adapter_model.safetensors", save(tensors))
    imported = client.post(
        "/api/models/import", params={"base_model": "adaptery-demo"}, content=imported_zip.getvalue(), headers=headers
    )
    assert imported.status_code == 200, imported.text
    # The served adapters still answer (unpacked into the process's scratch space, outside the data dir).
    for model in (done["fine_tuned_model"], imported.json()["id"]):
        answer = client.post(
            "/v1/chat/completions",
            headers=headers,
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert answer.status_code == 200, answer.text
    # A saved chat.
    conversation = client.post(
        "/api/conversations", headers=headers, json={"title": CHAT_SECRETS[1], "system_prompt": CHAT_SECRETS[2]}
    ).json()
    sent = client.post(
        f"/api/conversations/{conversation['id']}/messages",
        headers=headers,
        json={"role": "user", "content": CHAT_SECRETS[0]},
    )
    assert sent.status_code == 201, sent.text
    again = client.get(f"/api/conversations/{conversation['id']}", headers=headers).json()
    assert (again["title"], again["system_prompt"], again["messages"][0]["content"]) == (
        CHAT_SECRETS[1],
        CHAT_SECRETS[2],
        CHAT_SECRETS[0],
    )

    needles = [s.encode() for s in (*DATASET_SECRETS, TRAINING_SECRET, *CHAT_SECRETS)]
    needles += [safetensors_run(download.content), safetensors_run(imported_zip.getvalue())]
    data_dir = p.settings.data_dir.resolve()
    stored = files_under(data_dir)
    if p.db.url.startswith("sqlite"):  # the database file and its log (here beside the data dir, by default in it)
        database = Path(p.db.url.removeprefix("sqlite:///"))
        stored += [f for f in database.parent.iterdir() if f.name.startswith(database.name)]
        assert leaks(stored, [b"notes.jsonl"])  # the scan does read the database: plaintext metadata is found
    assert len(stored) > 10 and leaks(stored, needles) == []
    with p.db.system() as s:  # nor does any row of any table hold the text (PostgreSQL is not under the data dir)
        rows = repr([s.execute(select(table)).all() for table in m.Base.metadata.sorted_tables])
    assert "notes.jsonl" in rows and not [n for n in (*DATASET_SECRETS, TRAINING_SECRET, *CHAT_SECRETS) if n in rows]
    assert not p.scratch.resolve().is_relative_to(data_dir)
    # The content is really there, sealed: the data dir holds the tenant's blobs, and they open with its key.
    with p.db.system() as s:
        version = s.query(m.DatasetVersion).filter_by(dataset_id=dataset["id"], number=1).one()
        tenant_id, sha = version.tenant_id, version.sha256
    assert DATASET_SECRETS[0].encode() in b"".join(p.blobs.iter_bytes(tenant_id, sha))
    blob_file = p.blobs.path(tenant_id, sha)
    assert blob_file.is_relative_to(data_dir) and sha not in str(blob_file)  # not even the name says what it holds


def test_same_content_of_two_tenants_is_two_unrelated_files(running):
    other = running.new_tenant("other", "olga")
    first = upload_sample(running.client, running.auth())
    second = upload_sample(running.client, running.auth(other.api_key))
    assert first["id"] != second["id"]
    blobs = running.platform.blobs
    with running.platform.db.system() as s:
        rows = [s.get(m.File, f["id"]) for f in (first, second)]
        (a, sha), (b, sha_b) = [(r.tenant_id, r.sha256) for r in rows]
    assert sha == sha_b  # the same plaintext...
    path_a, path_b = blobs.path(a, sha), blobs.path(b, sha)
    assert path_a.name != path_b.name and path_a.read_bytes() != path_b.read_bytes()  # ...nothing alike on disk
    # Deleting one tenant's file removes its blob only.
    assert running.client.delete(f"/v1/files/{second['id']}", headers=running.auth(other.api_key)).status_code == 200
    assert not path_b.exists() and path_a.exists()
    # A tenant's blob does not open with another tenant's key, even copied into its place.
    path_b.parent.mkdir(parents=True, exist_ok=True)
    path_b.write_bytes(path_a.read_bytes())
    try:
        b"".join(blobs.iter_bytes(b, sha))
    except TamperedError:
        pass
    else:
        raise AssertionError("another tenant's ciphertext opened")


def test_a_tampered_blob_fails_loudly_and_is_not_served(running):
    file = upload_sample(running.client, running.auth())
    url = f"/v1/files/{file['id']}/content"
    assert running.client.get(url, headers=running.auth()).content == SAMPLE_CHAT.read_bytes()
    path = running.platform.blobs.path(running.tenant_id, file_sha(running, file["id"]))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    # What a client of the server sees (the test client re-raises server errors; this one does not).
    quiet = TestClient(running.client.app, raise_server_exceptions=False)
    for damaged, says in [(bytes(data), "does not authenticate"), (bytes(data[: len(data) - 20]), "truncated")]:
        path.write_bytes(damaged)
        with pytest.raises(TamperedError, match=says):  # loudly: the request fails in the server
            running.client.get(url, headers=running.auth())
        served = quiet.get(url, headers=running.auth())
        assert not served.content  # and not one byte of the file goes out


def test_blobs_are_written_in_format_2_and_format_1_blobs_are_still_served(running):
    file = upload_sample(running.client, running.auth())
    p, tenant_id, sha = running.platform, running.tenant_id, file_sha(running, file["id"])
    assert p.blobs.path(tenant_id, sha).read_bytes()[:5] == b"ADPB\x02"  # a key of its own (crypto's docstring)
    # The same file as the code before format 2 sealed it: under the tenant's data key itself.
    p.blobs.path(tenant_id, sha).write_bytes(seal_v1(p.keyring.data_key(tenant_id), SAMPLE_CHAT.read_bytes()))
    served = running.client.get(f"/v1/files/{file['id']}/content", headers=running.auth())
    assert served.status_code == 200 and served.content == SAMPLE_CHAT.read_bytes()
    assert p.blobs.size(tenant_id, sha) == len(SAMPLE_CHAT.read_bytes())


def file_sha(running, file_id: str) -> str:
    with running.platform.db.system() as s:
        return s.get(m.File, file_id).sha256


def test_master_key_rotation_keeps_a_running_platform_working(running, tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPTERY_MASTER_KEY", raising=False)
    p, key_file = running.platform, running.platform.settings.master_key_file
    old_key = key_file.read_text()
    first = upload_sample(running.client, running.auth())  # the first tenant's key: cached by the platform
    # A second tenant whose data key another process made: the running platform has never unwrapped it.
    other = running.new_tenant("other", "olga")
    with p.db.system() as s:
        other_id = s.query(m.Tenant).filter_by(name="other").one().id
    elsewhere = BlobStore(p.settings.blobs_dir, Keyring(p.db, LocalKeyProvider(key_file)), tmp_path / "scratch")
    elsewhere.put_stream(other_id, [b"made by another process"])

    result = rotate_master_key(p.db, LocalKeyProvider.from_settings(p.settings))  # what the CLI runs
    assert result.rewrapped == 2 and result.old_key_id != result.new_key_id
    assert key_file.read_text() != old_key and not key_file.with_name("master.key.new").exists()
    with p.db.system() as s:
        assert {k.master_key_id for k in s.query(m.TenantKey)} == {result.new_key_id}
    assert os.stat(key_file).st_mode & 0o777 == 0o600

    # The running platform goes on: a cached key, a key it now unwraps under the new master key, a new tenant.
    headers = running.auth()
    assert running.client.get(f"/v1/files/{first['id']}/content", headers=headers).content == SAMPLE_CHAT.read_bytes()
    second = upload_sample(running.client, running.auth(other.api_key))
    assert running.client.get(f"/v1/files/{second['id']}/content", headers=running.auth(other.api_key)).status_code
    third = running.new_tenant("third", "tom")
    upload_sample(running.client, running.auth(third.api_key))
    with p.db.system() as s:
        assert {k.master_key_id for k in s.query(m.TenantKey)} == {result.new_key_id}

    # The old master key is not needed any more: a process that only has the new key file reads everything.
    fresh = BlobStore(p.settings.blobs_dir, Keyring(p.db, LocalKeyProvider(key_file)), tmp_path / "scratch2")
    assert b"".join(fresh.iter_bytes(running.tenant_id, file_sha(running, first["id"]))) == SAMPLE_CHAT.read_bytes()
    assert b"".join(fresh.iter_bytes(other_id, file_sha(running, second["id"]))) == SAMPLE_CHAT.read_bytes()
    # ...and one that only has the old key cannot open the rewrapped data keys.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "master.key").write_text(old_key)
    stale = Keyring(p.db, LocalKeyProvider(tmp_path / "old" / "master.key"))
    try:
        stale.data_key(running.tenant_id)
    except TamperedError:
        pass
    else:
        raise AssertionError("the old master key still opens the data keys")
