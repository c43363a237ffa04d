"""API keys: environments, scopes, allowed models, expiry, last use, rotation with an overlap, revocation."""

from __future__ import annotations

import time

from adaptery.db import models as m
from tests.security.conftest import World

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


def make_key(world: World, who: str = "owner", **body: object) -> dict:
    response = world.client.post("/api/keys", headers=world.auth(who), json=body)
    assert response.status_code == 200, response.text
    return response.json()


def bearer(key: dict | str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['value'] if isinstance(key, dict) else key}"}


def test_the_environment_shows_in_the_prefix_and_cannot_be_swapped(world: World):
    key = make_key(world, environment="staging")
    assert key["value"].startswith(f"sk-staging-{key['id']}-") and key["redacted_value"].startswith("sk-staging-")
    assert world.client.get("/v1/models", headers=bearer(key)).status_code == 200
    relabelled = key["value"].replace("sk-staging-", "sk-prod-", 1)
    assert world.client.get("/v1/models", headers=bearer(relabelled)).status_code == 401


def test_a_key_does_only_what_its_scopes_allow(world: World):
    key = make_key(world, scopes=["inference"])
    assert key["scopes"] == ["inference"]
    refused = world.client.get("/v1/files", headers=bearer(key))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "missing_scope"
    chat = world.client.post("/v1/chat/completions", headers=bearer(key), json={"model": "adaptery-demo", **CHAT})
    assert chat.status_code == 200, chat.text
    assert world.client.post("/api/keys", headers=bearer(key), json={}).status_code == 403  # no admin scope


def test_a_key_never_mints_a_key_with_more_power(world: World):
    narrow = make_key(world, scopes=["inference", "admin"], allowed_models=["adaptery-demo"])
    wider = world.client.post("/api/keys", headers=bearer(narrow), json={"scopes": ["files"]})
    assert wider.status_code == 400 and wider.json()["error"]["param"] == "scopes"
    child = world.client.post("/api/keys", headers=bearer(narrow), json={}).json()
    assert child["scopes"] == ["admin", "inference"] and child["allowed_models"] == ["adaptery-demo"]


def test_models_lists_only_what_the_key_may_use_and_the_rest_is_404(world: World):
    adapter = world.ids["model_id"]
    key = make_key(world, allowed_models=["adaptery-demo"])
    listed = [m["id"] for m in world.client.get("/v1/models", headers=bearer(key)).json()["data"]]
    assert listed == ["adaptery-demo"]
    full = [m["id"] for m in world.client.get("/v1/models", headers=world.auth("owner")).json()["data"]]
    assert adapter in full and len(full) > 1
    for response in (
        world.client.get(f"/v1/models/{adapter}", headers=bearer(key)),
        world.client.post("/v1/chat/completions", headers=bearer(key), json={"model": adapter, **CHAT}),
        world.client.post("/v1/embeddings", headers=bearer(key), json={"model": "all-MiniLM-L6-v2", "input": "x"}),
        world.client.get(f"/api/models/{adapter}/download", headers=bearer(key)),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "model_not_found"
    assert (
        world.client.post(
            "/v1/chat/completions", headers=bearer(key), json={"model": "adaptery-demo", **CHAT}
        ).status_code
        == 200
    )


def test_allowed_models_must_exist_for_the_creator(world: World):
    response = world.client.post("/api/keys", headers=world.auth("owner"), json={"allowed_models": ["gpt-4o"]})
    assert response.status_code == 404 and response.json()["error"]["param"] == "allowed_models[0]"


def test_rotation_keeps_the_id_and_both_secrets_work_during_the_overlap(world: World):
    key = make_key(world, name="ci")
    rotated = world.client.post(
        f"/api/keys/{key['id']}/rotate", headers=world.auth("owner"), json={"overlap_seconds": 600}
    )
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()
    assert new["id"] == key["id"] and new["value"] != key["value"] and new["value"].startswith(f"sk-dev-{key['id']}-")
    assert world.client.get("/v1/models", headers=bearer(key)).status_code == 200
    assert world.client.get("/v1/models", headers=bearer(new)).status_code == 200
    with world.platform.db.system() as s:  # the overlap window ends
        s.get(m.ApiKey, key["id"]).previous_secret_expires_at = time.time() - 1
    assert world.client.get("/v1/models", headers=bearer(key)).status_code == 401
    assert world.client.get("/v1/models", headers=bearer(new)).status_code == 200


def test_rotation_without_overlap_ends_the_old_secret_at_once(world: World):
    key = make_key(world)
    new = world.client.post(f"/api/keys/{key['id']}/rotate", headers=world.auth("owner"), json={"overlap_seconds": 0})
    assert world.client.get("/v1/models", headers=bearer(key)).status_code == 401
    assert world.client.get("/v1/models", headers=bearer(new.json())).status_code == 200


def test_revocation_is_effective_on_the_next_request_and_for_both_rotated_secrets(world: World):
    key = make_key(world)
    new = world.client.post(f"/api/keys/{key['id']}/rotate", headers=world.auth("owner"), json={}).json()
    assert world.client.delete(f"/api/keys/{key['id']}", headers=world.auth("owner")).status_code == 200
    for secret in (key, new):
        assert world.client.get("/v1/models", headers=bearer(secret)).status_code == 401


def test_expiry_and_last_used(world: World):
    key = make_key(world, expires_in_days=1)
    assert key["expires_at"] > time.time() + 86000 and key["last_used_at"] is None
    world.client.get("/v1/models", headers=bearer(key))
    listed = {k["id"]: k for k in world.client.get("/api/keys", headers=world.auth("owner")).json()["data"]}
    assert listed[key["id"]]["last_used_at"] is not None and "value" not in listed[key["id"]]
    with world.platform.db.system() as s:
        s.get(m.ApiKey, key["id"]).expires_at = time.time() - 1
    expired = world.client.get("/v1/models", headers=bearer(key))
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "expired_api_key"


def test_members_manage_their_own_keys_and_admins_everyones(world: World):
    owners = make_key(world, "owner")
    mine = make_key(world, "member")
    member_sees = {k["id"] for k in world.client.get("/api/keys", headers=world.auth("member")).json()["data"]}
    assert mine["id"] in member_sees and owners["id"] not in member_sees
    assert world.client.delete(f"/api/keys/{owners['id']}", headers=world.auth("member")).status_code == 404
    assert world.client.get("/v1/models", headers=bearer(owners)).status_code == 200
    admin_sees = {k["id"] for k in world.client.get("/api/keys", headers=world.auth("admin")).json()["data"]}
    assert {owners["id"], mine["id"]} <= admin_sees
    assert world.client.delete(f"/api/keys/{mine['id']}", headers=world.auth("admin")).status_code == 200
    assert world.client.get("/v1/models", headers=bearer(mine)).status_code == 401
