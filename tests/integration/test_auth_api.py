"""Who may call: API keys, browser sessions with CSRF, sign-in lockout, roles."""

from __future__ import annotations

import pytest

from adaptery.auth.principal import Role
from adaptery.auth.secrets import hash_password
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.services import keys
from tests.conftest import use_sign_in_link
from tests.contracts.openai_schema import assert_matches


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk-wrong"},
        {"Authorization": "Bearer sk-dev-keyAAAAAAAAAAAA-" + "x" * 40},
        {"Authorization": "Basic abc"},
    ],
)
def test_missing_or_bad_key_is_401_in_openai_shape(running, headers):
    response = running.client.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert_matches("ErrorResponse", response.json())
    assert response.json()["error"]["type"] == "authentication_error"


def test_a_right_key_id_with_a_wrong_secret_is_refused(running):
    key_id = running.first.api_key.split("-")[2]
    forged = f"sk-dev-{key_id}-{'A' * 40}"
    assert running.client.get("/v1/models", headers=running.auth(forged)).status_code == 401


def test_keys_create_list_revoke_and_revocation_takes_effect_at_once(running):
    created = running.client.post(
        "/api/keys", headers=running.auth(), json={"name": "ci", "environment": "prod"}
    ).json()
    assert created["value"].startswith("sk-prod-") and created["redacted_value"].endswith(created["value"][-4:])
    assert running.client.get("/v1/models", headers=running.auth(created["value"])).status_code == 200
    listed = running.client.get("/api/keys", headers=running.auth()).json()["data"]
    assert created["id"] in [k["id"] for k in listed]
    assert all("value" not in k for k in listed)
    assert running.client.delete(f"/api/keys/{created['id']}", headers=running.auth()).status_code == 200
    assert running.client.get("/v1/models", headers=running.auth(created["value"])).status_code == 401


def test_only_a_hash_of_a_key_is_stored(running):
    secret = running.first.api_key.rsplit("-", 1)[1]
    with running.platform.db.system() as s:
        stored = [(k.secret_hash, k.redacted) for k in s.query(m.ApiKey)]
    assert all(secret not in h and secret not in r for h, r in stored)


def test_expired_key_is_refused_with_its_own_code(running):
    with running.platform.db.system() as s:
        user = s.query(m.User).first()
        tenant = s.query(m.Tenant).first()
        new = keys.create_key(s, tenant_id=tenant.id, user_id=user.id, expires_in_days=1)
        new.record.expires_at = 1.0
    response = running.client.get("/v1/models", headers=running.auth(new.secret))
    assert response.status_code == 401 and response.json()["error"]["code"] == "expired_api_key"


def test_other_tenant_cannot_revoke_my_key(running):
    created = running.client.post("/api/keys", headers=running.auth(), json={}).json()
    other = running.new_tenant("other", "mallory")
    assert running.client.delete(f"/api/keys/{created['id']}", headers=running.auth(other.api_key)).status_code == 404
    assert running.client.get("/api/keys", headers=running.auth(other.api_key)).json()["data"][0]["id"] != created["id"]


def test_sign_in_link_works_once_and_gives_a_session_with_csrf(running):
    client = running.client
    response = use_sign_in_link(client, running.first.login_url)
    assert response.status_code == 200 and response.json()["user"]["username"] == "owner"
    me = client.get("/api/me").json()
    assert me["user"]["username"] == "owner" and me["role"] == "owner" and me["has_password"] is False
    assert "httponly" in response.headers.get_list("set-cookie")[0].lower()

    # a state-changing request with the cookie but without the CSRF header is refused
    refused = client.post("/api/auth/password", json={"password": "correct horse battery"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
    csrf = client.cookies.get("adaptery_csrf")
    too_short = client.post("/api/auth/password", json={"password": "short"}, headers={"X-CSRF-Token": csrf})
    assert too_short.status_code == 400 and too_short.json()["error"]["param"] == "password"
    ok = client.post("/api/auth/password", json={"password": "correct horse battery"}, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 204

    assert client.post("/api/auth/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    client.cookies.clear()
    assert client.get("/api/me").status_code == 401
    reused = use_sign_in_link(client, running.first.login_url)
    assert reused.status_code == 401 and reused.json()["error"]["code"] == "invalid_login_link"
    assert (
        client.post("/api/auth/login", json={"username": "owner", "password": "correct horse battery"}).status_code
        == 200
    )
    assert client.get("/api/me").json()["has_password"] is True


def test_repeated_wrong_passwords_lock_the_account(running):
    with running.platform.db.system() as s:
        s.query(m.User).filter_by(username="owner").one().password_hash = hash_password("the right password")
    for _ in range(5):
        assert running.client.post("/api/auth/login", json={"username": "owner", "password": "nope"}).status_code == 401
    locked = running.client.post("/api/auth/login", json={"username": "owner", "password": "the right password"})
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert_matches("ErrorResponse", locked.json())


def test_a_viewer_may_chat_but_not_upload_or_train(running):
    with running.platform.db.system() as s:
        tenant = s.query(m.Tenant).first()
        viewer = m.User(id=new_id("user_"), username="vera")
        s.add(viewer)
        s.flush()
        s.add(m.Membership(id=new_id("mem_"), tenant_id=tenant.id, user_id=viewer.id, role=Role.VIEWER))
        key = keys.create_key(s, tenant_id=tenant.id, user_id=viewer.id).secret
    headers = running.auth(key)
    assert running.client.get("/v1/models", headers=headers).status_code == 200
    upload = running.client.post(
        "/v1/files", headers=headers, files={"file": ("a.txt", b"x")}, data={"purpose": "user_data"}
    )
    assert upload.status_code == 403
    assert_matches("ErrorResponse", upload.json())
    job = running.client.post(
        "/v1/fine_tuning/jobs", headers=headers, json={"model": "adaptery-demo", "training_file": "f"}
    )
    assert job.status_code == 403


def test_security_headers_on_every_response(running):
    for path in ("/", "/v1/models", "/api/health", "/static/app.js"):
        response = running.client.get(path, headers=running.auth())
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["x-frame-options"] == "DENY"
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["referrer-policy"] == "no-referrer"
    assert running.client.get("/docs").status_code == 404  # Swagger UI would need a CDN
    assert running.client.get("/openapi.json").json()["info"]["title"] == "Adaptery"
