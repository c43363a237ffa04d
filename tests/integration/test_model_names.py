"""Stable model names, as an adapter's owner and their clients live with them: clients call one name; version 1
answers; a fine-tune continues from it on corrected data and becomes version 2; promoting it changes the answer
to the same prompt, rolling back restores the old one, and a canary splits requests as configured. Another
tenant finds none of it, and cannot promote across tenants either way.

One platform (with its embedded agent) serves the module, so the steps run in order and build on each other;
the two fine-tunes take ~15 s on the demo model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from adaptery.api.app import create_app
from adaptery.auth.principal import Role
from adaptery.db import models as m
from adaptery.platform import Platform
from adaptery.services import model_names
from adaptery.services import models as model_service
from tests.conftest import BACKENDS, PostgresDatabases
from tests.integration.conftest import Running, make_settings
from tests.integration.helpers import upload_sample, wait_for_job
from tests.security.conftest import add_key, add_user

QUESTION = [{"role": "user", "content": "What is the lab's mascot?"}]
OLD_ANSWER = "The lab mascot is a green tortoise named Pixel."
NEW_ANSWER = "The lab mascot is a purple owl named Byte."
NAME = "lab-assistant"


@pytest.fixture(scope="module", params=BACKENDS)
def lab(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    postgres: PostgresDatabases | None,
    demo_model_dir: Path,
) -> Iterator[Running]:
    tmp_path = tmp_path_factory.mktemp("names")
    url = f"sqlite:///{tmp_path / 'adaptery.db'}" if request.param == "sqlite" else postgres.create()
    platform = Platform(make_settings(tmp_path, url, demo_model_dir))
    first = platform.prepare()
    try:
        with TestClient(create_app(platform)) as client:
            running = Running(platform, client, first)
            running.found = {}  # type: ignore[attr-defined]  # ids made along the way
            yield running
    finally:
        if request.param != "sqlite":
            postgres.drop(url)


def ask(lab: Running, model: str, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    response = lab.client.post(
        "/v1/chat/completions",
        headers=headers or lab.auth(),
        json={"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 16},
    )
    return response.status_code, response.json(), dict(response.headers)


def answer(lab: Running, model: str) -> str:
    status, body, _ = ask(lab, model)
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def wait_until(done: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def facts(answer: str) -> bytes:
    """The one fact the tests ask about, four times (one batch of the demo's defaults: one step per epoch)."""
    record = {"messages": [*QUESTION, {"role": "assistant", "content": answer}]}
    return (json.dumps(record) + "\n").encode() * 4


def train(lab: Running, file_id: str) -> dict:
    job = lab.client.post(
        "/v1/fine_tuning/jobs", headers=lab.auth(), json={"model": "adaptery-demo", "training_file": file_id}
    )
    assert job.status_code == 200, job.text
    done = wait_for_job(lab.client, lab.auth(), job.json()["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    return done


def name_state(lab: Running, headers: dict[str, str] | None = None) -> dict:
    response = lab.client.get(f"/api/model_names/{NAME}", headers=headers or lab.auth())
    assert response.status_code == 200, response.text
    return response.json()


def test_the_name_answers_from_version_1_and_is_listed_as_a_model(lab: Running) -> None:
    trained = train(lab, upload_sample(lab.client, lab.auth(), facts(OLD_ANSWER))["id"])
    v1 = lab.found["v1"] = trained["fine_tuned_model"]
    lab.found["v1_job"] = trained["id"]
    created = lab.client.post("/api/model_names", headers=lab.auth(), json={"name": NAME, "version": v1})
    assert created.status_code == 200, created.text
    name_id = created.json()["id"]
    assert name_id == f"ft:adaptery-demo:{lab.first.tenant}:{NAME}"  # OpenAI's ft: shape, one segment short
    lab.found["name"] = name_id
    assert created.json()["current_version"] == 1 and created.json()["versions"][0]["model"] == v1

    status, body, headers = ask(lab, name_id)
    assert status == 200 and body["model"] == name_id  # what the client asked for, as OpenAI answers
    assert headers["x-adaptery-model-version"] == v1
    assert body["choices"][0]["message"]["content"] == answer(lab, v1) == OLD_ANSWER
    listed = [model["id"] for model in lab.client.get("/v1/models", headers=lab.auth()).json()["data"]]
    assert name_id in listed
    assert lab.client.get(f"/v1/models/{name_id}", headers=lab.auth()).json()["id"] == name_id
    catalog = {x["id"]: x for x in lab.client.get("/api/models", headers=lab.auth()).json()["data"]}
    assert catalog[name_id]["kind"] == "name" and catalog[name_id]["version_model"] == v1


def test_a_fine_tune_from_the_name_continues_its_version_and_becomes_version_2(lab: Running) -> None:
    file_id = upload_sample(lab.client, lab.auth(), facts(NEW_ANSWER))["id"]  # the corrected answer
    body = {
        "training_file": file_id,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 10}}},
    }
    started = lab.client.post(f"/api/model_names/{NAME}/fine_tune", headers=lab.auth(), json=body)
    assert started.status_code == 200, started.text
    job = started.json()
    assert job["lineage"] == {
        "kind": "refine",
        "parent_job": lab.found["v1_job"],
        "checkpoint": None,
        "adapter": lab.found["v1"],  # its predecessor, which an evaluation report compares it with
        "model_name": lab.found["name"],
        "version": 1,
    }
    done = wait_for_job(lab.client, lab.auth(), job["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    v2 = done["fine_tuned_model"]
    lab.found["v2"] = v2
    events = lab.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100", headers=lab.auth()).json()["data"]
    messages = [e["message"] for e in events]
    assert f"Training starts from the weights of {lab.found['v1']}" in messages
    assert any(f"Added as version 2 of {lab.found['name']}" in message for message in messages)
    with lab.platform.db.tenant(lab.tenant_id) as s:
        finished = s.get(m.FineTuningJob, job["id"])
        assert model_service.source_adapter(s, finished.id).id == lab.found["v1"]

    state = name_state(lab)
    assert [(v["version"], v["model"], v["fine_tuning_job"]) for v in state["versions"]][1] == (2, v2, job["id"])
    assert state["current_version"] == 1 and answer(lab, lab.found["name"]) == OLD_ANSWER  # not promoted yet
    assert answer(lab, v2) == NEW_ANSWER  # it learned the correction


def test_promote_changes_the_answer_and_rollback_restores_it(lab: Running) -> None:
    name_id = lab.found["name"]
    promoted = lab.client.post(f"/api/model_names/{NAME}/promote", headers=lab.auth(), json={"version": 2})
    assert promoted.status_code == 200, promoted.text
    status, body, headers = ask(lab, name_id)
    assert body["model"] == name_id and headers["x-adaptery-model-version"] == lab.found["v2"]
    assert body["choices"][0]["message"]["content"] == NEW_ANSWER

    again = lab.client.post(f"/api/model_names/{NAME}/promote", headers=lab.auth(), json={"version": 2})
    assert again.status_code == 400 and "already the current version" in again.json()["error"]["message"]
    rolled = lab.client.post(f"/api/model_names/{NAME}/rollback", headers=lab.auth())
    assert rolled.status_code == 200 and rolled.json()["current_version"] == 1
    assert answer(lab, name_id) == OLD_ANSWER
    nothing = lab.client.post(f"/api/model_names/{NAME}/rollback", headers=lab.auth())
    assert nothing.status_code == 400 and "no earlier promotion" in nothing.json()["error"]["message"]

    # Streaming resolves the same way, and completions too.
    with lab.client.stream(
        "POST",
        "/v1/chat/completions",
        headers=lab.auth(),
        json={"model": name_id, "messages": QUESTION, "temperature": 0, "max_tokens": 16, "stream": True},
    ) as stream:
        assert stream.headers["x-adaptery-model-version"] == lab.found["v1"]
        chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert {chunk["model"] for chunk in chunks} == {name_id}
    completion = lab.client.post(
        "/v1/completions", headers=lab.auth(), json={"model": name_id, "prompt": "Hello", "max_tokens": 2}
    )
    assert completion.status_code == 200 and completion.json()["model"] == name_id

    history = name_state(lab)["history"]
    assert [(e["action"], e["from_version"], e["to_version"]) for e in history] == [
        ("create", None, 1),
        ("promote", 1, 2),
        ("rollback", 2, 1),
    ]
    assert all(e["actor"] == lab.first.username for e in history)
    audit = lab.client.get("/api/admin/audit?limit=50", headers=lab.auth()).json()["data"]
    actions = [(e["action"], e["target"], e["detail"]) for e in audit if e["action"].startswith("model_name.")]
    assert ("model_name.promote", name_id, {"from_version": 1, "to_version": 2}) in actions
    assert ("model_name.rollback", name_id, {"from_version": 2, "to_version": 1}) in actions


def test_a_canary_splits_requests_by_id_as_configured_and_records_the_version(lab: Running) -> None:
    name_id = lab.found["name"]
    bad = lab.client.put(f"/api/model_names/{NAME}/canary", headers=lab.auth(), json={"version": 2, "share": 150})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "share"
    bad = lab.client.put(f"/api/model_names/{NAME}/canary", headers=lab.auth(), json={"version": 2, "share": "half"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "share"
    bad = lab.client.put(f"/api/model_names/{NAME}/canary", headers=lab.auth(), json={"version": 1, "share": 50})
    assert bad.status_code == 400 and "current version already" in bad.json()["error"]["message"]
    set_ = lab.client.put(f"/api/model_names/{NAME}/canary", headers=lab.auth(), json={"version": 2, "share": 50})
    assert set_.status_code == 200 and set_.json()["canary"] == {"version": 2, "share": 50.0}

    answered: dict[str, str] = {}
    for _ in range(12):
        status, body, headers = ask(lab, name_id)
        assert status == 200
        expected = lab.found["v2"] if model_names.in_canary(name_id, body["id"], 50) else lab.found["v1"]
        assert headers["x-adaptery-model-version"] == expected  # deterministic per request id
        assert body["choices"][0]["message"]["content"] == (NEW_ANSWER if expected == lab.found["v2"] else OLD_ANSWER)
        answered[body["id"]] = expected
    with lab.platform.db.tenant(lab.tenant_id) as s:
        for request_id, adapter_id in answered.items():
            record = model_names.answered_by(s, request_id)
            assert (record.name_id, record.adapter_id) == (name_id, adapter_id)
            assert record.canary == (adapter_id == lab.found["v2"])
        ledger = set(s.scalars(select(m.UsageRecord.model).where(m.UsageRecord.kind == "completions")))
    assert {lab.found["v1"], lab.found["v2"]} <= ledger  # usage counted per version
    assert name_id not in ledger

    ended = lab.client.delete(f"/api/model_names/{NAME}/canary", headers=lab.auth())
    assert ended.status_code == 200 and ended.json()["canary"] is None
    assert [e["action"] for e in name_state(lab)["history"]][-2:] == ["canary", "canary_end"]


def test_a_canarys_feedback_and_arena_results_are_counted_apart_from_the_current_versions(lab: Running) -> None:
    """The web chat's answer carries its completion id: a rating given on the page and one sent through the API
    by that id are one row, counted for the version that answered (the canary or the current one)."""
    name_id, v1, v2 = lab.found["name"], lab.found["v1"], lab.found["v2"]
    auth = lab.auth()
    assert lab.client.put("/api/feedback/policy", headers=auth, json={"collect": "all"}).status_code == 200
    assert (
        lab.client.put(f"/api/model_names/{NAME}/canary", headers=auth, json={"version": 2, "share": 50}).status_code
        == 200
    )
    by_version: dict[str, list[str]] = {v1: [], v2: []}
    while not (by_version[v1] and by_version[v2]):
        _, body, headers = ask(lab, name_id)
        by_version[headers["x-adaptery-model-version"]].append(body["id"])
    conversation = lab.client.post("/api/conversations", headers=auth, json={"model": name_id}).json()
    url = f"/api/conversations/{conversation['id']}/messages"
    lab.client.post(url, headers=auth, json={"role": "user", "content": QUESTION[0]["content"]})
    saved = lab.client.post(url, headers=auth, json={"role": "assistant", "content": NEW_ANSWER, "model": name_id,
                                                     "completion_id": by_version[v2][0]})  # fmt: skip
    assert saved.status_code == 201 and saved.json()["completion_id"] == by_version[v2][0]
    again = lab.client.post(url, headers=auth, json={"role": "assistant", "content": "x", "model": name_id,
                                                     "completion_id": by_version[v2][0]})  # fmt: skip
    assert again.status_code == 400 and again.json()["error"]["param"] == "completion_id"  # one message per answer
    other_model = lab.client.post(url, headers=auth, json={"role": "assistant", "content": "x", "model": v1,
                                                           "completion_id": by_version[v1][0]})  # fmt: skip
    assert other_model.status_code == 400  # the request was for the name, not for this adapter
    for bad in ("cmpl-1", "chatcmpl-" + "x" * 60):
        refused = lab.client.post(url, headers=auth, json={"role": "assistant", "content": "x", "completion_id": bad})
        assert refused.status_code == 400
    on_page = lab.client.post(f"{url}/{saved.json()['id']}/feedback", headers=auth, json={"rating": 1})
    assert on_page.status_code == 200 and on_page.json()["model"] == v2  # the canary answered it
    by_api = lab.client.post(f"/api/completions/{by_version[v2][0]}/feedback", headers=auth,
                             json={"rating": 1, "reason": "right"})  # fmt: skip
    assert by_api.status_code == 200 and by_api.json()["id"] == on_page.json()["id"]  # the same answer, one row
    assert by_api.json()["message_id"] == saved.json()["id"]
    down = lab.client.post(f"/api/completions/{by_version[v1][0]}/feedback", headers=auth, json={"rating": -1})
    assert down.status_code == 200 and down.json()["model"] == v1

    ended = lab.client.delete(f"/api/model_names/{NAME}/canary", headers=auth)
    assert ended.status_code == 200  # the name answers from v1 now: both arena sides are one adapter
    requests = {v["version"]: v["feedback"]["requests"] for v in name_state(lab)["versions"]}
    battle = lab.client.post("/api/arena/battles", headers=auth, json={"prompt": "Hi", "models": [name_id, v1]})
    assert battle.status_code == 201, battle.text
    for side in ("a", "b"):
        streamed = lab.client.post(f"/api/arena/battles/{battle.json()['id']}/answers/{side}", headers=auth)
        assert streamed.status_code == 200
        # M2: before the vote, the name's counters must not say which side it answered
        assert {v["version"]: v["feedback"]["requests"] for v in name_state(lab)["versions"]} == requests
    name_side = _side_of(lab, battle.json()["id"], name_id)
    vote = lab.client.post(f"/api/arena/battles/{battle.json()['id']}/vote", headers=auth, json={"winner": name_side})
    assert vote.status_code == 200
    with lab.platform.db.tenant(lab.tenant_id) as s:
        row = s.get(m.ArenaBattle, battle.json()["id"])
        answered = getattr(row, f"answered_{name_side}")
    assert answered == v1
    rated = [
        lab.client.post(f"/api/arena/battles/{battle.json()['id']}/answers/{side}/feedback", headers=auth,
                        json={"rating": 1 if side == name_side else -1})
        for side in ("a", "b")
    ]  # fmt: skip
    assert rated[0].json()["id"] != rated[1].json()["id"]  # one rating per side, though one adapter answered both

    counts = {v["version"]: v["feedback"] for v in name_state(lab)["versions"]}
    assert counts[1]["requests"] == requests[1] + 1  # the arena side is counted at the vote
    assert counts[2]["requests"] > counts[2]["canary_requests"] >= len(by_version[v2])  # it was current once too
    assert counts[1]["canary_requests"] == 0 and counts[1]["requests"] >= len(by_version[v1])
    assert (counts[2]["thumbs_up"], counts[2]["thumbs_down"], counts[2]["approval"]) == (1, 0, 1.0)
    assert (counts[1]["thumbs_up"], counts[1]["thumbs_down"]) == (1, 2)  # the API's and the arena's
    assert counts[1]["arena_wins"] == 1 and counts[2]["arena_wins"] == 0  # v1 answered for the name
    other = lab.new_tenant("tally", "tally-owner")
    assert lab.client.get(f"/api/model_names/{NAME}", headers=lab.auth(other.api_key)).status_code == 404
    assert lab.client.put("/api/feedback/policy", headers=auth, json={"collect": "off"}).status_code == 200


def _side_of(lab: Running, battle_id: str, model: str) -> str:
    with lab.platform.db.tenant(lab.tenant_id) as s:
        return "a" if s.get(m.ArenaBattle, battle_id).model_a == model else "b"


def test_the_canary_split_holds_over_many_request_ids() -> None:
    for share in (0, 10, 30, 100):
        hits = sum(model_names.in_canary("ft:b:t:n", f"chatcmpl-{i:06d}", share) for i in range(20_000))
        assert abs(hits / 20_000 - share / 100) < 0.01, (share, hits)
    assert model_names.in_canary("ft:b:t:n", "chatcmpl-x", 50) == model_names.in_canary("ft:b:t:n", "chatcmpl-x", 50)


def test_a_dpo_fine_tune_from_the_name_starts_from_its_current_version(lab: Running) -> None:
    pairs = [
        {
            "input": {"messages": QUESTION},
            "preferred_output": [{"role": "assistant", "content": NEW_ANSWER}],
            "non_preferred_output": [{"role": "assistant", "content": OLD_ANSWER}],
        }
    ] * 2
    content = "".join(json.dumps(pair) + "\n" for pair in pairs).encode()
    file_id = upload_sample(lab.client, lab.auth(), content)["id"]
    body = {"training_file": file_id, "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1}}}}
    started = lab.client.post(f"/api/model_names/{NAME}/fine_tune", headers=lab.auth(), json=body)
    assert started.status_code == 200, started.text
    assert started.json()["method"]["type"] == "dpo" and started.json()["lineage"]["adapter"] == lab.found["v1"]
    done = wait_for_job(lab.client, lab.auth(), started.json()["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    assert name_state(lab)["versions"][2]["model"] == done["fine_tuned_model"]
    lab.found["v3"] = done["fine_tuned_model"]


def test_a_fine_tune_from_the_name_takes_a_dataset_version(lab: Running) -> None:
    headers = lab.auth()
    dataset = lab.client.post(
        "/api/datasets", params={"filename": "fix.jsonl"}, content=facts(NEW_ANSWER), headers=headers
    )
    assert dataset.status_code == 202, dataset.text  # its version is made in the background
    dataset_id = dataset.json()["id"]
    wait_until(
        lambda: lab.client.get(f"/api/datasets/{dataset_id}/versions/1", headers=headers).json()["status"] == "ready"
    )
    both = lab.client.post(
        f"/api/model_names/{NAME}/fine_tune", headers=headers, json={"training_file": "file-x", "dataset": dataset_id}
    )
    assert both.status_code == 400 and both.json()["error"]["param"] == "training_file"
    nowhere = lab.client.post(f"/api/model_names/{NAME}/fine_tune", headers=headers, json={"dataset": "nope"})
    assert nowhere.status_code == 400 and nowhere.json()["error"]["param"] == "dataset"
    started = lab.client.post(
        f"/api/model_names/{NAME}/fine_tune", headers=headers, json={"dataset": dataset_id, "dataset_version": 1}
    )
    assert started.status_code == 200, started.text
    exported = lab.client.get(f"/v1/files/{started.json()['training_file']}", headers=headers).json()
    assert exported["filename"].endswith("-v1.jsonl") and exported["purpose"] == "fine-tune"
    cancelled = lab.client.post(f"/v1/fine_tuning/jobs/{started.json()['id']}/cancel", headers=headers)
    assert cancelled.status_code == 200  # its training is the test above's; here, what it starts from


def test_bad_promotions_get_clear_errors(lab: Running) -> None:
    headers = lab.auth()
    missing = lab.client.post(f"/api/model_names/{NAME}/promote", headers=headers, json={"version": 9})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "version"
    base = lab.client.post(f"/api/model_names/{NAME}/promote", headers=headers, json={"version": "adaptery-demo"})
    assert base.status_code == 400 and "is not an adapter" in base.json()["error"]["message"]
    taken = lab.client.post("/api/model_names", headers=headers, json={"name": NAME, "version": lab.found["v1"]})
    # FINDINGS L7: one answer whether or not the caller may see the name (nothing about its workspace or owner)
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "name_taken"
    assert taken.json()["error"]["message"] == f"The name '{NAME}' is not available: choose another."
    odd = lab.client.post("/api/model_names", headers=headers, json={"name": "no spaces", "version": lab.found["v1"]})
    assert odd.status_code == 400 and odd.json()["error"]["param"] == "name"
    # An adapter on another base cannot be a version of this name.
    with lab.platform.db.system() as s:
        s.add(m.BaseModel(id="other-base", ref=s.get(m.BaseModel, "adaptery-demo").ref, display_name="other"))
        v1 = s.get(m.Adapter, lab.found["v1"])
        s.add(
            m.Adapter(
                id="ft:other-base:default::0ther000",
                tenant_id=v1.tenant_id,
                base_model="other-base",
                rank=v1.rank,
                manifest=dict(v1.manifest),
                sha256=v1.sha256,
            )
        )
    other_base = lab.client.post(
        f"/api/model_names/{NAME}/promote", headers=headers, json={"version": "ft:other-base:default::0ther000"}
    )
    assert other_base.status_code == 400
    assert "trained on 'other-base'; this name serves 'adaptery-demo'" in other_base.json()["error"]["message"]
    # Not a name: the name's own routes manage it, not an adapter's.
    deleting = lab.client.delete(f"/v1/models/{lab.found['name']}", headers=headers)
    assert deleting.status_code == 400 and "is a stable name" in deleting.json()["error"]["message"]
    fine_tuning = lab.client.post(
        "/v1/fine_tuning/jobs", headers=headers, json={"model": lab.found["name"], "training_file": "file-x"}
    )
    assert fine_tuning.status_code == 400 and "fine_tune" in fine_tuning.json()["error"]["message"]


def test_another_tenant_finds_none_of_it_and_cannot_promote_across(lab: Running) -> None:
    name_id, v1 = lab.found["name"], lab.found["v1"]
    other = lab.new_tenant("other", "other-owner")
    theirs = {"Authorization": f"Bearer {other.api_key}"}
    assert lab.client.get("/api/model_names", headers=theirs).json()["data"] == []
    for ref in (NAME, name_id):
        assert lab.client.get(f"/api/model_names/{ref}", headers=theirs).status_code == 404
        promote = lab.client.post(f"/api/model_names/{ref}/promote", headers=theirs, json={"version": 1})
        assert promote.status_code == 404
        assert lab.client.post(f"/api/model_names/{ref}/rollback", headers=theirs).status_code == 404
        canary = lab.client.put(f"/api/model_names/{ref}/canary", headers=theirs, json={"version": 2, "share": 5})
        assert canary.status_code == 404
        tune = lab.client.post(f"/api/model_names/{ref}/fine_tune", headers=theirs, json={"training_file": "f"})
        assert tune.status_code == 404
        assert lab.client.delete(f"/api/model_names/{ref}", headers=theirs).status_code == 404
    status, body, _ = ask(lab, name_id, theirs)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert lab.client.get(f"/v1/models/{name_id}", headers=theirs).status_code == 404
    assert name_id not in [x["id"] for x in lab.client.get("/v1/models", headers=theirs).json()["data"]]

    # Their own name cannot take our tenant's segment, nor answer from our adapter.
    stolen = lab.client.post("/api/model_names", headers=theirs, json={"name": name_id, "version": v1})
    assert stolen.status_code == 400 and stolen.json()["error"]["param"] == "name"
    borrowed = lab.client.post("/api/model_names", headers=theirs, json={"name": "mine", "version": v1})
    assert borrowed.status_code == 404 and borrowed.json()["error"]["param"] == "version"
    # Nor can we promote their adapter into ours: it does not exist for us.
    with lab.platform.db.system() as s:
        ours = s.get(m.Adapter, v1)
        s.add(
            m.Adapter(
                id="ft:adaptery-demo:other::7he1r000",
                tenant_id=other.tenant.id,
                base_model="adaptery-demo",
                rank=ours.rank,
                manifest=dict(ours.manifest),
                sha256=ours.sha256,
            )
        )
    across = lab.client.post(
        f"/api/model_names/{NAME}/promote", headers=lab.auth(), json={"version": "ft:adaptery-demo:other::7he1r000"}
    )
    assert across.status_code == 404 and across.json()["error"]["code"] == "model_not_found"
    assert name_state(lab)["current_version"] == 1  # nothing changed


def test_an_adapters_owner_cannot_hide_a_version_of_someone_elses_name(lab: Running) -> None:
    """M6: making an adapter private (or shared without the name's creator) while it is a version of another
    person's name would lock them out of their name (404 on it, its id taken): refused, 409 naming the name."""
    member = add_user(lab.platform, lab.tenant_id, "m6-member", Role.MEMBER)
    theirs = lab.auth(add_key(lab.platform, lab.tenant_id, member))
    creator = lab.auth(
        add_key(lab.platform, lab.tenant_id, add_user(lab.platform, lab.tenant_id, "m6-creator", Role.MEMBER))
    )
    with lab.platform.db.system() as s:
        ours = s.get(m.Adapter, lab.found["v1"])
        adapter = m.Adapter(id="ft:adaptery-demo:default::m6member", tenant_id=ours.tenant_id, rank=ours.rank,
                            base_model=ours.base_model, manifest=dict(ours.manifest), sha256=ours.sha256,
                            visibility="tenant", created_by=member)  # fmt: skip
        s.add(adapter)
    made = lab.client.post("/api/model_names", headers=creator, json={"name": "m6-name", "version": adapter.id})
    assert made.status_code == 200, made.text
    sharing = f"/api/models/{adapter.id}/sharing"
    for body in ({"visibility": "private"}, {"visibility": "shared", "members": ["m6-member"]}):
        refused = lab.client.put(sharing, headers=theirs, json=body)
        assert refused.status_code == 409, refused.text
        assert "version 1 of the model name 'm6-name'" in refused.json()["error"]["message"]
    assert lab.client.get("/api/model_names/m6-name", headers=creator).status_code == 200
    assert lab.client.get(sharing, headers=theirs).json()["visibility"] == "tenant"
    # Shared with the name's creator keeps it visible to them: allowed.
    with_them = {"visibility": "shared", "members": ["m6-creator"]}
    assert lab.client.put(sharing, headers=theirs, json=with_them).status_code == 200, with_them
    assert lab.client.get("/api/model_names/m6-name", headers=creator).status_code == 200
    assert lab.client.delete("/api/model_names/m6-name", headers=creator).status_code == 200
    assert lab.client.put(sharing, headers=theirs, json={"visibility": "private"}).status_code == 200


def test_a_name_whose_version_was_deleted_says_so(lab: Running) -> None:
    name_id = lab.found["name"]
    assert lab.client.delete(f"/v1/models/{lab.found['v1']}", headers=lab.auth()).status_code == 200
    status, body, _ = ask(lab, name_id)
    assert status == 400 and body["error"]["code"] == "model_version_deleted"
    assert "version 1 was deleted" in body["error"]["message"]
    assert name_id not in [x["id"] for x in lab.client.get("/v1/models", headers=lab.auth()).json()["data"]]
    state = name_state(lab)
    assert state["versions"][0]["deleted"] is True
    gone = lab.client.post(f"/api/model_names/{NAME}/promote", headers=lab.auth(), json={"version": 1})
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "model_version_deleted"
    tune = lab.client.post(f"/api/model_names/{NAME}/fine_tune", headers=lab.auth(), json={"training_file": "f"})
    assert tune.status_code == 400 and tune.json()["error"]["code"] == "model_version_deleted"
    # Promoting a live version heals it.
    healed = lab.client.post(f"/api/model_names/{NAME}/promote", headers=lab.auth(), json={"version": 2})
    assert healed.status_code == 200
    assert answer(lab, name_id) == NEW_ANSWER
    assert lab.client.delete(f"/api/model_names/{NAME}", headers=lab.auth()).status_code == 200
    status, body, _ = ask(lab, name_id)
    assert status == 404  # clients of a deleted name are told it is not there
