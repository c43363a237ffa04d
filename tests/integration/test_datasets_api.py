"""/api/datasets: upload any format, see the report, curate into versions with lineage."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from tests.conftest import SAMPLE_CHAT
from tests.integration.helpers import wait_for_job


def upload(running, content: bytes, headers=None, **params) -> tuple[int, dict]:
    response = running.client.post("/api/datasets", params=params, content=content, headers=headers or running.auth())
    return response.status_code, response.json()


def wait_version(running, dataset_id: str, number: int, headers=None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        version = running.client.get(
            f"/api/datasets/{dataset_id}/versions/{number}", headers=headers or running.auth()
        ).json()
        if version["status"] != "processing":
            return version
        time.sleep(0.1)
    raise AssertionError(f"version {number} still processing")


def ready(running, content: bytes, **params) -> tuple[dict, dict]:
    status, body = upload(running, content, **params)
    assert status == 202, body
    version = wait_version(running, body["id"], 1)
    assert version["status"] == "ready", version
    return body, version


def chat_line(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})


def test_upload_openai_chat_then_preview_content_and_stats(running):
    body, version = ready(running, SAMPLE_CHAT.read_bytes(), name="lab-facts", filename="demo-chat.jsonl")
    assert body["name"] == "lab-facts" and body["versions"][0]["status"] == "ready"  # read before the answer
    assert version["format"] == "openai-chat" and version["records"] == 6 and version["operation"] == "upload"
    assert version["report"]["validation"]["records_invalid"] == 0
    assert version["stats"]["records"] == 6 and version["stats"]["tokens"]["max"] > 0
    content = running.client.get(f"/api/datasets/{body['id']}/versions/1/content", headers=running.auth()).content
    assert hashlib.sha256(content).hexdigest() == version["sha256"]
    preview = running.client.get(
        f"/api/datasets/{body['id']}/versions/1/records?limit=2&offset=1", headers=running.auth()
    ).json()
    assert preview["total"] == 6 and len(preview["data"]) == 2
    assert preview["data"][0] == json.loads(SAMPLE_CHAT.read_text().splitlines()[1])


@pytest.mark.parametrize(
    ("content", "params", "records", "first"),
    [
        (
            json.dumps(
                [
                    {"instruction": "Add", "input": "2 and 3", "output": "5"},
                    {"instruction": "Greet", "output": "Hello!"},
                ]
            ).encode(),
            {"filename": "a.json"},
            2,
            {"messages": [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]},
        ),
        (
            b'{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}\n',
            {"filename": "s.jsonl"},
            1,
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        ),
        (
            b"question,answer\nWhat is 2+2?,4\nCapital of France?,Paris\n",
            {"filename": "qa.csv", "mapping": "prompt=question,response=answer"},
            2,
            {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
        ),
        (
            b"first document\nsecond document\n",
            {"filename": "notes.txt", "format": "text-lines"},
            2,
            {"messages": [{"role": "assistant", "content": "first document"}]},
        ),
    ],
)
def test_every_format_is_normalised_to_chat(running, content, params, records, first):
    body, version = ready(running, content, **params)
    assert version["records"] == records
    preview = running.client.get(f"/api/datasets/{body['id']}/versions/1/records", headers=running.auth()).json()
    assert preview["data"][0] == first


def test_invalid_records_are_all_reported_and_block_training_until_allowed(running):
    lines = [
        chat_line("q1", "a1"),
        '{"messages": [}',
        chat_line("q3", "a3"),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
    ]
    body, version = ready(running, "\n".join(lines).encode(), filename="mixed.jsonl")
    validation = version["report"]["validation"]
    assert (validation["records_valid"], validation["records_invalid"]) == (2, 2)
    assert [e["line"] for e in validation["errors"]] == [2, 4]
    assert "unknown role 'robot'" in validation["errors"][1]["message"]
    assert validation["errors"][1]["field"] == "messages[0].role"
    refused = running.client.post(f"/api/datasets/{body['id']}/versions/1/export", json={}, headers=running.auth())
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "allow_invalid"
    exported = running.client.post(
        f"/api/datasets/{body['id']}/versions/1/export", json={"allow_invalid": True}, headers=running.auth()
    ).json()
    assert exported["object"] == "file" and exported["purpose"] == "fine-tune"
    job = running.client.post(
        "/v1/fine_tuning/jobs",
        headers=running.auth(),
        json={"model": "adaptery-demo", "training_file": exported["id"], "hyperparameters": {"n_epochs": 1}},
    ).json()
    assert wait_for_job(running.client, running.auth(), job["id"], ("succeeded", "failed"))["status"] == "succeeded"


def test_a_version_exported_twice_is_one_training_file_that_the_version_names(running):
    body, _ = ready(running, SAMPLE_CHAT.read_bytes(), name="twice", filename="t.jsonl")
    export = f"/api/datasets/{body['id']}/versions/1/export"
    first = running.client.post(export, json={}, headers=running.auth()).json()
    again = running.client.post(export, json={}, headers=running.auth()).json()
    assert again["id"] == first["id"]
    files = running.client.get("/v1/files", headers=running.auth()).json()["data"]
    assert [f["id"] for f in files if f["filename"] == "twice-v1.jsonl"] == [first["id"]]
    dataset = running.client.get(f"/api/datasets/{body['id']}", headers=running.auth()).json()
    assert dataset["versions"][0]["training_file"] == first["id"]


def _nothing_kept(running) -> None:
    assert running.client.get("/api/datasets", headers=running.auth()).json()["data"] == []
    assert not any(p.is_file() for p in (running.platform.settings.blobs_dir / "tenants").rglob("*"))


def test_an_unrecognisable_file_is_refused_with_a_clear_message_and_leaves_no_dataset(running):
    status, body = upload(running, b"\x00\x01\x02binary\xff\xfe", filename="blob.bin")
    assert status == 400 and body["error"]["param"] == "file"
    assert "Nothing was kept of 'blob.bin'" in body["error"]["message"] and "binary" in body["error"]["message"]
    _nothing_kept(running)


def test_a_file_whose_every_record_is_invalid_names_its_lines_and_leaves_no_dataset(running):
    lines = (
        b'{"messages": [{"role": "user", "content": "q"}]}\n{"messages": [oops\n'
        b'{"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    )
    status, body = upload(running, lines, filename="bad.jsonl", name="bad")
    assert status == 400 and body["error"]["param"] == "file"
    assert "none of its 3 record(s) is valid" in body["error"]["message"]
    assert "line 1: " in body["error"]["message"] and "line 2: invalid JSON" in body["error"]["message"]
    assert "line 3: messages[0].role: unknown role 'wizard'" in body["error"]["message"]  # line, field, message
    _nothing_kept(running)
    status, body = upload(running, SAMPLE_CHAT.read_bytes(), filename="good.jsonl", name="bad")
    assert status == 202 and body["versions"][0]["status"] == "ready"  # the name was not taken by the failure


def test_dedup_scrub_split_make_versions_with_lineage(running):
    answer = (
        "The cluster named Heron has twelve nodes with two GPUs each and it is booked through the "
        "scheduler every Monday morning by the lab manager who keeps the calendar up to date"
    )
    lines = [
        chat_line("Tell me about the cluster", answer),
        chat_line("Tell me about the cluster", answer),  # exact duplicate
        chat_line("Tell me about the cluster", answer.replace("twelve", "twelve big")),  # near duplicate
        chat_line("Write to me", "Mail ada@example.org or call +44 20 7946 0958 from 10.0.0.7"),
        chat_line("Card?", "It is 4111 1111 1111 1111, not 1234 5678 9012 3456."),
        chat_line("Weather", "Sunny with light winds in the afternoon"),
    ]
    body, _ = ready(running, "\n".join(lines).encode(), filename="curate.jsonl", name="curate")
    ds = body["id"]

    made = running.client.post(f"/api/datasets/{ds}/versions/1/dedup", json={"threshold": 0.7}, headers=running.auth())
    assert made.status_code == 202
    v2 = wait_version(running, ds, made.json()["data"][0]["version"])
    assert (v2["version"], v2["parent_version"], v2["operation"]) == (2, 1, "dedup")
    report = v2["report"]["dedup"]
    assert (report["records_in"], report["records_out"]) == (6, 4)
    assert (report["exact_duplicates"], report["near_duplicates"]) == (1, 1)
    assert {c["kind"] for c in report["clusters"]} == {"exact", "near"}
    assert all(c["kept"] == 0 for c in report["clusters"])

    made = running.client.post(f"/api/datasets/{ds}/versions/2/scrub", json={}, headers=running.auth()).json()
    v3 = wait_version(running, ds, made["data"][0]["version"])
    counts = v3["report"]["pii"]["counts_by_kind"]
    assert counts["email"] == 1 and counts["phone"] == 1 and counts["card_number"] == 1
    content = running.client.get(f"/api/datasets/{ds}/versions/3/content", headers=running.auth()).text
    assert "ada@example.org" not in content and "4111 1111 1111 1111" not in content
    assert "1234 5678 9012 3456" in content  # fails the Luhn check: not a card

    made = running.client.post(
        f"/api/datasets/{ds}/versions/3/split", json={"validation_fraction": 0.25, "seed": 1}, headers=running.auth()
    ).json()
    train, validation = (wait_version(running, ds, v["version"]) for v in made["data"])
    assert (train["operation"], validation["operation"]) == ("split-train", "split-validation")
    assert train["records"] + validation["records"] == 4 and validation["records"] >= 1
    assert train["parent_version"] == validation["parent_version"] == 3
    again = running.client.post(
        f"/api/datasets/{ds}/versions/3/split", json={"validation_fraction": 0.25, "seed": 1}, headers=running.auth()
    ).json()
    assert wait_version(running, ds, again["data"][0]["version"])["sha256"] == train["sha256"]  # seeded

    versions = running.client.get(f"/api/datasets/{ds}", headers=running.auth()).json()["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("dedup", {"threshold": 1.5}, "threshold"),
        ("dedup", {"num_perm": 4}, "num_perm"),
        ("scrub", {"kinds": ["email", "shoe_size"]}, "kinds"),
        ("split", {"validation_fraction": 0.9}, "validation_fraction"),
        ("dedup", {"bogus": 1}, "bogus"),
    ],
)
def test_bad_operation_parameters_are_400_before_any_work(running, path, body, param):
    dataset, _ = ready(running, SAMPLE_CHAT.read_bytes(), filename="x.jsonl")
    response = running.client.post(
        f"/api/datasets/{dataset['id']}/versions/1/{path}", json=body, headers=running.auth()
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert len(running.client.get(f"/api/datasets/{dataset['id']}", headers=running.auth()).json()["versions"]) == 1


def test_card_is_editable_and_names_are_unique(running):
    dataset, _ = ready(running, SAMPLE_CHAT.read_bytes(), name="card-test", filename="x.jsonl")
    updated = running.client.patch(
        f"/api/datasets/{dataset['id']}",
        headers=running.auth(),
        json={
            "description": "Lab facts",
            "source": "written by hand",
            "license": "CC-BY-4.0",
            "contains_protected_data": True,
        },
    ).json()
    assert updated["license"] == "CC-BY-4.0" and updated["contains_protected_data"] is True
    status, body = upload(running, SAMPLE_CHAT.read_bytes(), name="card-test")
    assert status == 409 and body["error"]["param"] == "name"
    by_name = running.client.get("/api/datasets/card-test", headers=running.auth()).json()
    assert by_name["id"] == dataset["id"]


def test_new_version_by_upload_to_an_existing_dataset(running):
    dataset, _ = ready(running, SAMPLE_CHAT.read_bytes(), filename="x.jsonl")
    response = running.client.post(
        f"/api/datasets/{dataset['id']}/versions",
        params={"filename": "y.jsonl"},
        content=chat_line("new", "record").encode(),
        headers=running.auth(),
    )
    assert response.status_code == 202
    v2 = wait_version(running, dataset["id"], 2)
    assert (v2["operation"], v2["records"], v2["parent_version"]) == ("upload", 1, None)


@pytest.mark.parametrize("settings_overrides", [{"max_upload_bytes": 2000}])
def test_upload_over_the_limit_is_413_and_leaves_nothing(running):
    status, body = upload(running, b"x" * 5000, filename="big.txt")
    assert status == 413 and body["error"]["param"] == "file"
    assert running.client.get("/api/datasets", headers=running.auth()).json()["data"] == []
    blobs = running.platform.settings.blobs_dir
    assert not any(p.is_file() for p in (blobs / "tenants").rglob("*"))
    assert list((blobs / "tmp").iterdir()) == []


def test_delete_removes_the_dataset_and_its_blobs(running):
    dataset, version = ready(running, SAMPLE_CHAT.read_bytes(), filename="x.jsonl")
    assert running.client.delete(f"/api/datasets/{dataset['id']}", headers=running.auth()).json()["deleted"]
    assert running.client.get(f"/api/datasets/{dataset['id']}", headers=running.auth()).status_code == 404
    tenant_id = running.tenant_id
    assert not running.platform.blobs.exists(tenant_id, version["sha256"])
    assert not running.platform.blobs.exists(tenant_id, version["source_sha256"])


def test_other_tenant_gets_404_on_every_dataset_route(running):
    dataset, _ = ready(running, SAMPLE_CHAT.read_bytes(), name="mine", filename="x.jsonl")
    other = running.auth(running.new_tenant("other", "mallory").api_key)
    ds = dataset["id"]
    for method, path, kwargs in [
        ("get", f"/api/datasets/{ds}", {}),
        ("get", "/api/datasets/mine", {}),
        ("patch", f"/api/datasets/{ds}", {"json": {"description": "x"}}),
        ("delete", f"/api/datasets/{ds}", {}),
        ("get", f"/api/datasets/{ds}/versions/1", {}),
        ("get", f"/api/datasets/{ds}/versions/1/records", {}),
        ("get", f"/api/datasets/{ds}/versions/1/content", {}),
        ("post", f"/api/datasets/{ds}/versions", {"content": b"x"}),
        ("post", f"/api/datasets/{ds}/versions/1/dedup", {"json": {}}),
        ("post", f"/api/datasets/{ds}/versions/1/scrub", {"json": {}}),
        ("post", f"/api/datasets/{ds}/versions/1/split", {"json": {}}),
        ("post", f"/api/datasets/{ds}/versions/1/validate", {}),
        ("post", f"/api/datasets/{ds}/versions/1/export", {"json": {}}),
    ]:
        response = getattr(running.client, method)(path, headers=other, **kwargs)
        assert response.status_code == 404, (method, path, response.text)
    assert running.client.get("/api/datasets", headers=other).json()["data"] == []


def test_a_job_whose_records_exceed_the_context_fails_with_the_reason(running):
    long_answer = " ".join(["tortoise"] * 3000)
    content = (chat_line("short", "fine") + "\n" + chat_line("long", long_answer) + "\n").encode()
    file = running.client.post(
        "/v1/files", headers=running.auth(), files={"file": ("t.jsonl", content)}, data={"purpose": "fine-tune"}
    ).json()
    job = running.client.post(
        "/v1/fine_tuning/jobs", headers=running.auth(), json={"model": "adaptery-demo", "training_file": file["id"]}
    ).json()
    failed = wait_for_job(running.client, running.auth(), job["id"], ("failed", "queued", "running", "succeeded"))
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "invalid_training_file" and failed["error"]["param"] == "training_file"
    assert "line 2" in failed["error"]["message"] and "context" in failed["error"]["message"]


def test_public_tool_calling_and_parquet_datasets_upload_as_openai_records(running, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    glaive = (SAMPLE_CHAT.parents[2] / "tests" / "data" / "llamafactory" / "glaive_toolcall_en_demo.json").read_bytes()
    _, version = ready(running, glaive, name="glaive", filename="glaive_toolcall_en_demo.json")
    validation = version["report"]["validation"]
    assert version["format"] == "sharegpt" and validation["records_total"] == 12
    # every record is read; those longer than the tiny demo model's 1024-token context are refused as such
    assert all("the base model's context is 1024 tokens" in e["message"] for e in validation["errors"])

    tools = json.dumps([{"name": "get_weather", "parameters": {"type": "object"}}])
    turns = [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {}}'},
        {"from": "observation", "value": "21"},
        {"from": "gpt", "value": "21 degrees."},
    ]
    body, version = ready(running, json.dumps({"conversations": turns, "tools": tools}).encode(), filename="t.jsonl")
    assert version["stats"]["role_counts"]["tool"] == 1
    (record,) = running.client.get(f"/api/datasets/{body['id']}/versions/1/records", headers=running.auth()).json()[
        "data"
    ]
    assert record["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": "{}"}
    assert record["messages"][2] == {"role": "tool", "tool_call_id": "call_0", "content": "21"}

    table = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["first document", "second document"]}), table, row_group_size=1)
    body, version = ready(running, table.read_bytes(), name="docs", filename="docs.parquet")
    assert version["format"] == "parquet" and version["records"] == 2


def test_a_dataset_whose_creating_upload_a_restart_cut_short_is_made_whole_or_not_at_all(running, monkeypatch):
    """The server stopped while the uploads that created two datasets were being read (their versions still
    processing): at its next start their work runs again, the one that gave no record leaves no dataset behind,
    and the other is kept, as if each upload had answered."""
    platform = running.platform
    monkeypatch.setattr(platform.dataset_tasks, "submit", lambda *_: False)  # the server is shutting down
    hopeless = b'{"messages": [{"role": "user", "content": "q"}]}\n{"messages": [oops\n'
    for content, filename in ((hopeless, "bad.jsonl"), (SAMPLE_CHAT.read_bytes(), "good.jsonl")):
        with pytest.raises(RuntimeError, match="processed at its next start"):
            upload(running, content, filename=filename)
    listed = running.client.get("/api/datasets", headers=running.auth()).json()["data"]
    assert sorted(d["name"] for d in listed) == ["bad.jsonl", "good.jsonl"]  # left as a stopped server leaves them
    monkeypatch.undo()

    outcomes = [done.result(timeout=60) for done in platform.resume_dataset_work()]  # what the next start does
    assert len(outcomes) == 2 and None in outcomes
    (removed,) = [reason for reason in outcomes if reason is not None]
    assert removed.startswith("Nothing was kept of 'bad.jsonl': none of its 2 record(s) is valid")
    (kept,) = running.client.get("/api/datasets", headers=running.auth()).json()["data"]
    assert kept["name"] == "good.jsonl"
    assert wait_version(running, kept["id"], 1)["status"] == "ready"
    assert platform.resume_dataset_work() == []  # nothing is left processing
