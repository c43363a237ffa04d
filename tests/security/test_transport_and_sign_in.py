"""Headers on every answer, cookies a script cannot read, CSRF, and sign-in brute force locked out and audited."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from adaptery.auth.secrets import hash_password
from adaptery.db import models as m
from tests.security.conftest import World

PASSWORD = "correct horse battery"


def test_security_headers_are_on_every_answer_errors_included(world: World):
    client = world.client
    for response in (
        client.get("/api/health"),
        client.get("/v1/models"),  # 401
        client.get("/no/such/route"),  # 404
        client.post("/v1/chat/completions", headers={**world.auth("owner"), "content-type": "text/plain"}, content="x"),
        client.post(  # streamed: the headers go out with the first event, before the body is known
            "/v1/chat/completions",
            headers=world.auth("owner"),
            json={"model": "adaptery-demo", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        ),
    ):
        assert response.headers["x-content-type-options"] == "nosniff", response.status_code
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "strict-transport-security" not in response.headers  # plain http: HSTS would be ignored anyway
    streamed = response
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")


def _set_password(world: World) -> None:
    with world.platform.db.system() as s:
        s.query(m.User).filter_by(username="lab-owner").one().password_hash = hash_password(PASSWORD)


def test_session_cookies_are_httponly_strict_and_secure_over_https(world: World):
    _set_password(world)
    https = TestClient(world.client.app, base_url="https://testserver")
    response = https.post("/api/auth/login", json={"username": "lab-owner", "password": PASSWORD})
    assert response.status_code == 200
    cookies = {c.split("=", 1)[0]: c.lower() for c in response.headers.get_list("set-cookie")}
    session = cookies["adaptery_session"]
    assert "httponly" in session and "samesite=strict" in session and "secure" in session
    assert "strict-transport-security" in response.headers


def test_a_session_write_without_the_csrf_token_is_refused(world: World):
    _set_password(world)
    client = TestClient(world.client.app)
    login = client.post("/api/auth/login", json={"username": "lab-owner", "password": PASSWORD})
    assert login.status_code == 200
    refused = client.post("/api/keys", json={"name": "from a forged form"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
    csrf = client.cookies.get("adaptery_csrf")
    assert client.post("/api/keys", json={"name": "mine"}, headers={"x-csrf-token": csrf}).status_code == 200


def test_brute_force_sign_in_locks_the_account_and_every_try_is_audited(world: World):
    _set_password(world)
    limit = world.platform.settings.login_max_failures
    for i in range(limit):
        wrong = world.client.post("/api/auth/login", json={"username": "lab-owner", "password": f"guess-{i}"})
        assert wrong.status_code == 401
    locked = world.client.post("/api/auth/login", json={"username": "lab-owner", "password": PASSWORD})
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert locked.json()["error"]["type"] == "rate_limit_error"
    events = world.client.get(
        "/api/admin/audit", headers=world.auth("admin"), params={"action": "auth.sign_in"}
    ).json()["data"]
    assert [e["outcome"] for e in events].count("failure") == limit + 1
    assert all(e["target"] == "lab-owner" and e["ip"] for e in events)
    with world.platform.db.system() as s:  # the lockout ends
        for row in s.query(m.SignInThrottle):
            row.locked_until = time.time() - 1
    assert world.client.post("/api/auth/login", json={"username": "lab-owner", "password": PASSWORD}).status_code == 200


def test_an_unknown_user_reads_the_same_as_a_wrong_password(world: World):
    unknown = world.client.post("/api/auth/login", json={"username": "nobody", "password": "whatever1"})
    _set_password(world)
    wrong = world.client.post("/api/auth/login", json={"username": "lab-owner", "password": "whatever1"})
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json() == wrong.json()
