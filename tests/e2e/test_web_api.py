"""The routes behind the web page, against a real server: saved conversations (each user's own),
bringing members in and out with one-time links, and the model catalog."""

from __future__ import annotations

import re

import httpx
import pytest

from adaptery.engine.demo_model import MAX_POSITIONS
from tests.conftest import ServerProcess, use_sign_in_link


def signed_in(server: ServerProcess, link: str) -> httpx.Client:
    """A browser-like client: the link's session cookie, and the CSRF header the page sends."""
    client = httpx.Client(base_url=server.url, follow_redirects=True)
    response = use_sign_in_link(client, link)
    assert response.status_code == 200 and "adaptery_session" in client.cookies, response.text
    client.headers["X-CSRF-Token"] = client.cookies["adaptery_csrf"]
    return client


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # one backend is enough here
def test_conversations_are_saved_per_user_and_members_come_and_go(server: ServerProcess) -> None:
    owner = signed_in(server, server.login_url)

    # --- conversations -------------------------------------------------------------------------
    created = owner.post("/api/conversations", json={"model": "adaptery-demo", "params": {"temperature": 0}})
    assert created.status_code == 201
    conv = created.json()
    assert conv["title"] == "New chat" and conv["messages"] == []
    assert error_of(owner.post("/api/conversations", json={"params": {"temperature": 3}}), 400)["param"] == (
        "params.temperature"
    )
    assert error_of(owner.post("/api/conversations", json={"params": {"top_k": 3}}), 400)["param"] == "params"
    path = f"/api/conversations/{conv['id']}"
    assert error_of(owner.post(f"{path}/messages", json={"role": "system", "content": "x"}), 400)["param"] == "role"
    question = owner.post(f"{path}/messages", json={"role": "user", "content": "What is   the lab's\nmascot?"})
    answer = owner.post(
        f"{path}/messages", json={"role": "assistant", "content": "A tortoise.", "model": "adaptery-demo"}
    )
    assert question.status_code == answer.status_code == 201
    listed = owner.get("/api/conversations").json()["data"]
    assert [(c["id"], c["title"], c["message_count"]) for c in listed] == [(conv["id"], "What is the lab's mascot?", 2)]
    for _ in range(2):  # the same opening question twice: two titles a person can tell apart
        again = owner.post("/api/conversations", json={}).json()
        owner.post(
            f"/api/conversations/{again['id']}/messages", json={"role": "user", "content": "What is the lab's mascot?"}
        )
    titles = [c["title"] for c in owner.get("/api/conversations").json()["data"]]
    assert sorted(titles) == [
        "What is the lab's mascot?",
        "What is the lab's mascot? (2)",
        "What is the lab's mascot? (3)",
    ]
    for extra in owner.get("/api/conversations").json()["data"][:2]:
        owner.delete(f"/api/conversations/{extra['id']}")
    renamed = owner.patch(path, json={"title": "Mascot", "system_prompt": "Be brief.", "params": {"top_p": 0.5}})
    assert renamed.json()["title"] == "Mascot" and renamed.json()["params"] == {"top_p": 0.5}
    regenerate = owner.delete(f"{path}/messages/{answer.json()['id']}")
    assert regenerate.json()["deleted"] == 1
    assert [m["role"] for m in owner.get(path).json()["messages"]] == ["user"]
    assert error_of(owner.delete(f"{path}/messages/msg_unknown"), 404)["param"] == "message_id"
    no_csrf = httpx.post(f"{server.url}/api/conversations", json={}, cookies=owner.cookies)
    assert error_of(no_csrf, 403)["code"] == "csrf_failed"

    # --- a member, invited with a one-time link -------------------------------------------------
    invited = owner.post("/api/admin/members", json={"username": "ada", "role": "member"})
    assert invited.status_code == 201, invited.text
    assert invited.json()["role"] == "member" and "/auth/link?token=" in invited.json()["login_url"]
    assert error_of(owner.post("/api/admin/members", json={"username": "ada"}), 409)["code"] == "already_member"
    assert error_of(owner.post("/api/admin/members", json={"username": "Not OK"}), 400)["param"] == "username"
    ada = signed_in(server, invited.json()["login_url"])
    assert ada.get("/api/me").json()["role"] == "member"
    assert ada.get("/api/conversations").json()["data"] == []  # the owner's chats are the owner's
    for response in (ada.get(path), ada.patch(path, json={"title": "mine"}), ada.delete(path)):
        assert error_of(response, 404)["code"] == "conversation_not_found"
    assert ada.post("/api/admin/members", json={"username": "eve"}).status_code == 403  # members don't invite
    ada_key = ada.post("/api/keys", json={"name": "ada's"}).json()["value"]
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {ada_key}"}).status_code == 200

    # ada has signed in: a new link would sign in as her (FINDINGS M3); a never-signed-in person gets one
    assert error_of(owner.post("/api/admin/members/ada/link"), 409)["code"] == "account_set_up"
    assert owner.post("/api/admin/members", json={"username": "bo"}).status_code == 201
    relink = owner.post("/api/admin/members/bo/link")
    assert relink.status_code == 200
    assert error_of(owner.delete("/api/admin/members/owner"), 400)["param"] == "username"  # not oneself
    assert owner.delete("/api/admin/members/ada").status_code == 204
    assert ada.get("/api/me").status_code == 401  # their session ended
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {ada_key}"}).status_code == 401
    assert owner.delete("/api/admin/members/bo").status_code == 204
    unused = use_sign_in_link(httpx.Client(base_url=server.url), relink.json()["login_url"])
    assert error_of(unused, 401)["code"] == "invalid_login_link"  # their unused link died with them
    assert error_of(owner.delete("/api/admin/members/ada"), 404)["code"] == "member_not_found"
    assert [m["username"] for m in owner.get("/api/admin/members").json()["data"]] == ["owner"]
    audit = owner.get("/api/admin/audit").json()["data"]
    assert {"member.invite", "member.link", "member.remove"} <= {e["action"] for e in audit}

    # --- another tenant sees none of it ----------------------------------------------------------
    created = server.cli("tenants", "create", "other-lab", "--owner", "bob")
    token = re.search(r"/auth/link\?token=(\S+)", created.stdout).group(1)
    bob = signed_in(server, f"{server.url}/auth/link?token={token}")
    assert bob.get("/api/conversations").json()["data"] == []
    assert error_of(bob.get(path), 404)["code"] == "conversation_not_found"
    assert error_of(bob.delete("/api/admin/members/owner"), 404)["code"] == "member_not_found"

    # --- the model catalog the page builds its pickers and estimates from ------------------------
    catalog = owner.get("/api/models").json()["data"]
    base = next(m for m in catalog if m["id"] == "adaptery-demo")
    assert base["kind"] == "base" and base["finetune_defaults"]["n_epochs"] == 20
    assert base["observed_tokens_per_second"] is None  # no finished fine-tune to time yet
    assert base["context_length"] == MAX_POSITIONS  # what bounds max tokens in the chat settings
