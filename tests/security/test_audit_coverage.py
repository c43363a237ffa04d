"""Every route that changes state writes an audit record: the app's POST/PUT/PATCH/DELETE routes are listed from
`app.routes`, each is called once the way a person would (successfully), and a new event must appear in the
chain. A route is exempt only from the short list below, with the reason. A new route that is in neither list
fails the test, so nobody adds a state-changing route without deciding how it is audited."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from adaptery.db import models as m
from adaptery.messaging import identity
from adaptery.services import audit, tenants
from tests.conftest import SAMPLE_CHAT, ca_pem, link_token
from tests.security.conftest import World
from tests.security.objects import trained, unpack
from tests.security.test_authorization_matrix import app_routes
from tests.security.test_identity import PASSWORD, set_password, sign_in

# Not security-relevant, so not audited (each is accounted elsewhere or touches only its caller's own drafts):
NOT_AUDITED = {
    "POST /v1/chat/completions": "inference: metered in the usage ledger instead (one row per request is noise)",
    "POST /v1/completions": "inference: metered in the usage ledger instead",
    "POST /v1/embeddings": "inference: metered in the usage ledger instead",
    "POST /api/datasets/{dataset_id}/versions/{number}/validate": "a read that computes: changes nothing",
    "POST /api/auth/link/holder": "a read: whom a sign-in link signs in, for its page; spends nothing",
    "POST /api/conversations": "a person's own chat history: no rights, sharing or data leaving the tenant",
    "PATCH /api/conversations/{conversation_id}": "a person's own chat history (a title)",
    "DELETE /api/conversations/{conversation_id}": "a person's own chat history",
    "POST /api/conversations/{conversation_id}/messages": "a person's own chat history",
    "DELETE /api/conversations/{conversation_id}/messages/{message_id}": "a person's own chat history",
    "POST /api/federations/sites/{site_id}/check-in": "a site's signed heartbeat: marks it seen, grants nothing",
    "PUT /api/fabric/transfers/{sha256}": "an agent's bytes for work leased to it (a presigned, single-use URL), as "
    "its uploads over the bus: a blob no row names until the job's result is recorded",
}
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


def last_seq(world: World) -> int:
    with world.platform.db.system() as s:
        return s.scalar(select(func.max(m.AuditEvent.seq))) or 0


def ready_version(world: World, dataset_id: str, number: int) -> None:
    """Dataset work runs in the background: wait until the version is ready (bounded)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        version = world.client.get(f"/api/datasets/{dataset_id}/versions/{number}", headers=world.auth("owner"))
        if version.json().get("status") == "ready":
            return
        time.sleep(0.05)
    raise AssertionError(f"version {number} of {dataset_id} never became ready: {version.text}")


def calls(world: World, lora_bytes: bytes, tmp_path) -> list[tuple[str, Callable[[], httpx.Response]]]:  # noqa: ANN001
    """One successful call per audited route, in an order where each finds what it needs."""
    client, owner, member, admin = world.client, world.auth("owner"), world.auth("member"), world.auth("admin")
    platform_admin = world.auth("platform_admin")
    ids = world.ids
    with world.platform.db.system() as s:
        s.get(m.FineTuningJob, ids["job_id"]).status = "queued"
    finished = trained(world, "lab-member", unpack(lora_bytes, tmp_path / "lora"))
    set_password(world, "lab-owner")
    set_password(world, "lab-member")
    state: dict[str, object] = {}

    def browser() -> TestClient:
        if "browser" not in state:
            state["browser"] = sign_in(world, "lab-member")
        return state["browser"]  # type: ignore[return-value]

    def create_federation() -> httpx.Response:
        response = client.post("/api/federations", headers=owner, json={"name": "fed", "base_model": "adaptery-demo"})
        state["federation"] = response.json().get("id")
        return response

    def site_key() -> str:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        public = ec.generate_private_key(ec.SECP384R1()).public_key()
        return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

    def invite_site() -> httpx.Response:
        response = client.post(
            f"/api/federations/{state['federation']}/invitations", headers=owner, json={"name": "site-2"}
        )
        state["site_token"] = response.json().get("token")
        return response

    def withdraw_site_invitation() -> httpx.Response:
        made = client.post(
            f"/api/federations/{state['federation']}/invitations", headers=owner, json={"name": "site-withdrawn"}
        )
        assert made.status_code == 201, made.text
        return client.delete(f"/api/federations/{state['federation']}/invitations/{made.json()['id']}", headers=owner)

    def join_site() -> httpx.Response:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from adaptery.federated.join import join_message, sign

        key = ec.generate_private_key(ec.SECP384R1())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        token = str(state["site_token"])
        signature = sign(key, join_message(token.rpartition(".")[0])).hex()
        return client.post(
            "/api/federations/join", json={"token": token, "public_key": public.decode(), "signature": signature}
        )

    def sign_in_with_link() -> httpx.Response:
        with world.platform.db.system() as s:
            user = s.scalar(select(m.User).where(m.User.username == "lab-viewer"))
            token = tenants.create_login_token(s, tenant_id=world.tenant_id, user_id=user.id, hours=1, purpose="reset")
        return TestClient(client.app).post("/api/auth/link", json={"token": token})

    def login() -> httpx.Response:
        return TestClient(client.app).post("/api/auth/login", json={"username": "lab-owner", "password": PASSWORD})

    def invite_lab_member_elsewhere() -> str:
        created = world.running.new_tenant("elsewhere-two", "someone")
        other = {"Authorization": f"Bearer {created.api_key}"}
        invited = client.post("/api/admin/members", headers=other, json={"username": "lab-member", "role": "member"})
        state["accept"] = {"token": link_token(invited.json()["accept_url"])}
        state["elsewhere"] = created.tenant.id
        return browser().get("/api/invitations").json()["data"][0]["id"]

    def decline() -> httpx.Response:
        created = world.running.new_tenant("elsewhere-three", "someone-else")
        other = {"Authorization": f"Bearer {created.api_key}"}
        client.post("/api/admin/members", headers=other, json={"username": "lab-member", "role": "viewer"})
        invitation = browser().get("/api/invitations").json()["data"][0]["id"]
        return browser().post(f"/api/invitations/{invitation}/decline")

    def switch() -> httpx.Response:
        switched = browser().post("/api/auth/switch", json={"tenant_id": state["elsewhere"]})
        browser().headers["x-csrf-token"] = browser().cookies.get("adaptery_csrf")  # a new session, a new token
        return switched

    def step_up() -> httpx.Response:
        set_password(world, "owner")
        state["admin_browser"] = sign_in(world, "owner")
        return state["admin_browser"].post("/api/auth/platform", json={"password": PASSWORD})  # type: ignore[union-attr]

    def new_key() -> str:
        return client.post("/api/keys", headers=owner, json={"name": "audited"}).json()["id"]

    def enroll() -> httpx.Response:
        made = client.post("/api/admin/agents/tokens", headers=owner, json={"roles": ["infer"]})
        assert made.status_code == 200, made.text
        state["agent_key"] = identity.make_key()
        csr = identity.make_csr(state["agent_key"]).decode()
        response = client.post("/api/fabric/enroll", json={"token": made.json()["token"], "csr": csr, "kind": "agent"})
        state["enrolled"] = response.json()
        return response

    def withdraw_token() -> httpx.Response:
        made = client.post("/api/admin/agents/tokens", headers=owner, json={"roles": ["train"]})
        assert made.status_code == 200, made.text
        return client.delete(f"/api/admin/agents/tokens/{made.json()['id']}", headers=owner)

    def renew() -> httpx.Response:
        enrolled = state["enrolled"]
        csr = identity.make_csr(state["agent_key"]).decode()  # type: ignore[arg-type]
        return client.post("/api/fabric/renew", json={"certificate": enrolled["certificate"], "csr": csr})  # type: ignore[index]

    def collecting() -> None:
        client.put("/api/feedback/policy", headers=owner, json={"collect": "all", "readers": "members"})

    def completion_feedback() -> httpx.Response:
        made = client.post(
            "/v1/chat/completions",
            headers=member,
            json={"model": "adaptery-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        state["feedback"] = client.post(
            f"/api/completions/{made.json()['id']}/feedback", headers=member, json={"rating": 1, "correction": "hello"}
        )
        return state["feedback"]  # type: ignore[return-value]

    def message_feedback() -> httpx.Response:
        chat = client.post("/api/conversations", headers=member, json={}).json()["id"]
        client.post(f"/api/conversations/{chat}/messages", headers=member, json={"role": "user", "content": "hi"})
        answer = client.post(
            f"/api/conversations/{chat}/messages",
            headers=member,
            json={"role": "assistant", "content": "hello", "model": "adaptery-demo"},
        ).json()["id"]
        return client.post(
            f"/api/conversations/{chat}/messages/{answer}/feedback",
            headers=member,
            json={"rating": -1, "reason": "terse"},
        )

    def battle() -> httpx.Response:
        made = client.post(
            "/api/arena/battles",
            headers=member,
            json={"prompt": "hi", "models": ["adaptery-demo", ids["model_id"]], "params": {"max_tokens": 4}},
        )
        state["battle"] = made.json()["id"]
        return made

    def answer(side: str) -> httpx.Response:
        return client.post(f"/api/arena/battles/{state['battle']}/answers/{side}", headers=member)

    def dataset_op(operation: str, body: dict) -> httpx.Response:
        ready_version(world, ids["dataset_id"], 1)
        return client.post(f"/api/datasets/{ids['dataset_id']}/versions/1/{operation}", headers=owner, json=body)

    return [
        ("POST /api/auth/login", login),
        ("POST /api/auth/link", sign_in_with_link),
        ("POST /api/auth/password", lambda: browser().post(
            "/api/auth/password", json={"password": "another password", "current_password": PASSWORD})),
        ("POST /api/invitations/{invitation_id}/accept", lambda: browser().post(
            f"/api/invitations/{invite_lab_member_elsewhere()}/accept", json=state["accept"])),
        ("POST /api/invitations/{invitation_id}/decline", decline),
        ("POST /api/auth/switch", switch),
        ("POST /api/auth/logout", lambda: browser().post("/api/auth/logout")),
        ("POST /api/auth/platform", step_up),
        ("DELETE /api/auth/platform", lambda: state["admin_browser"].delete("/api/auth/platform")),  # type: ignore[union-attr]
        ("POST /v1/files", lambda: client.post("/v1/files", headers=owner, data={"purpose": "fine-tune"},
                                               files={"file": ("t.jsonl", SAMPLE_CHAT.read_bytes())})),
        ("POST /v1/fine_tuning/jobs", lambda: client.post(
            "/v1/fine_tuning/jobs", headers=owner, json={"model": "adaptery-demo", "training_file": ids["file_id"]})),
        ("POST /v1/fine_tuning/jobs/{job_id}/pause", lambda: client.post(
            f"/v1/fine_tuning/jobs/{ids['job_id']}/pause", headers=owner)),
        ("POST /v1/fine_tuning/jobs/{job_id}/resume", lambda: client.post(
            f"/v1/fine_tuning/jobs/{ids['job_id']}/resume", headers=owner)),
        ("POST /v1/fine_tuning/jobs/{job_id}/cancel", lambda: client.post(
            f"/v1/fine_tuning/jobs/{ids['job_id']}/cancel", headers=owner)),
        ("POST /api/fine_tuning/jobs/{job_id}/extend", lambda: client.post(
            f"/api/fine_tuning/jobs/{finished.job_id}/extend", headers=member, json={"n_epochs": 1})),
        ("POST /api/fine_tuning/jobs/{job_id}/continue", lambda: client.post(
            f"/api/fine_tuning/jobs/{finished.job_id}/continue", headers=member,
            json={"checkpoint": finished.checkpoint_id})),
        ("POST /api/fine_tuning/jobs/{job_id}/fork", lambda: client.post(
            f"/api/fine_tuning/jobs/{finished.job_id}/fork", headers=member, json={"training_file": ids["file_id"]})),
        ("PUT /api/feedback/policy", lambda: client.put(
            "/api/feedback/policy", headers=owner, json={"collect": "feedback"})),
        ("POST /api/conversations/{conversation_id}/messages/{message_id}/feedback", message_feedback),
        ("POST /api/completions/{completion_id}/feedback", lambda: collecting() or completion_feedback()),
        ("POST /api/arena/battles", battle),
        ("POST /api/arena/battles/{battle_id}/answers/{side}", lambda: answer("a") and answer("b")),
        ("POST /api/arena/battles/{battle_id}/vote", lambda: client.post(
            f"/api/arena/battles/{state['battle']}/vote", headers=member, json={"winner": "tie"})),
        ("POST /api/arena/battles/{battle_id}/answers/{side}/feedback", lambda: client.post(
            f"/api/arena/battles/{state['battle']}/answers/a/feedback", headers=member, json={"rating": 1})),
        ("POST /api/feedback/datasets", lambda: client.post(
            "/api/feedback/datasets", headers=owner, json={"name": "audited-feedback", "kind": "sft"})),
        ("DELETE /api/feedback/{feedback_id}", lambda: client.delete(
            f"/api/feedback/{state['feedback'].json()['id']}", headers=member)),  # type: ignore[attr-defined]
        ("POST /api/datasets", lambda: client.post(
            "/api/datasets", params={"filename": "u.jsonl"}, content=SAMPLE_CHAT.read_bytes(), headers=owner)),
        ("POST /api/datasets/{dataset_id}/versions", lambda: client.post(
            f"/api/datasets/{ids['dataset_id']}/versions", params={"filename": "v.jsonl"},
            content=SAMPLE_CHAT.read_bytes(), headers=owner)),
        ("PATCH /api/datasets/{dataset_id}", lambda: client.patch(
            f"/api/datasets/{ids['dataset_id']}", headers=owner, json={"description": "audited"})),
        ("POST /api/datasets/{dataset_id}/versions/{number}/dedup", lambda: dataset_op("dedup", {})),
        ("POST /api/datasets/{dataset_id}/versions/{number}/scrub", lambda: dataset_op("scrub", {})),
        ("POST /api/datasets/{dataset_id}/versions/{number}/split", lambda: dataset_op("split", {})),
        ("POST /api/datasets/{dataset_id}/versions/{number}/export", lambda: dataset_op("export", {})),
        ("POST /api/models/import", lambda: client.post(
            "/api/models/import", params={"base_model": "adaptery-demo", "suffix": "again"}, content=lora_bytes,
            headers=member)),
        ("POST /api/evaluation_tasks", lambda: client.post("/api/evaluation_tasks", headers=member, json={
            "config": 'task: audited\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n',
            "data": '{"q": "1", "a": "2"}\n'})),
        ("PUT /api/models/{model_id}/evaluation_set", lambda: client.put(
            f"/api/models/{ids['model_id']}/evaluation_set", headers=member, json={"file_id": ids["file_id"]})),
        ("POST /api/evaluations", lambda: client.post("/api/evaluations", headers=member, json={
            "model": ids["model_id"], "kind": "lm_eval", "task": "audited", "limit": 1})),
        ("PUT /api/models/{model_id}/sharing", lambda: client.put(
            f"/api/models/{ids['model_id']}/sharing", headers=member, json={"visibility": "private"})),
        ("POST /api/model_names", lambda: client.post(
            "/api/model_names", headers=member, json={"name": "assistant", "version": ids["model_id"]})),
        ("POST /api/model_names/{name}/promote", lambda: client.post(
            "/api/model_names/assistant/promote", headers=member, json={"version": finished.model_id})),
        ("POST /api/model_names/{name}/rollback", lambda: client.post(
            "/api/model_names/assistant/rollback", headers=member)),
        ("PUT /api/model_names/{name}/canary", lambda: client.put(
            "/api/model_names/assistant/canary", headers=member, json={"version": 2, "share": 10})),
        ("DELETE /api/model_names/{name}/canary", lambda: client.delete(
            "/api/model_names/assistant/canary", headers=member)),
        ("POST /api/model_names/{name}/fine_tune", lambda: client.post(
            "/api/model_names/assistant/fine_tune", headers=member, json={"training_file": ids["file_id"]})),
        ("DELETE /api/model_names/{name}", lambda: client.delete("/api/model_names/assistant", headers=member)),
        ("POST /api/keys", lambda: client.post("/api/keys", headers=owner, json={"name": "new"})),
        ("PATCH /api/keys/{key_id}", lambda: client.patch(f"/api/keys/{new_key()}", headers=owner, json={"name": "b"})),
        ("POST /api/keys/{key_id}/rotate", lambda: client.post(
            f"/api/keys/{new_key()}/rotate", headers=owner, json={"overlap_seconds": 0})),
        ("DELETE /api/keys/{key_id}", lambda: client.delete(f"/api/keys/{new_key()}", headers=owner)),
        ("POST /api/admin/members", lambda: client.post(
            "/api/admin/members", headers=admin, json={"username": "newcomer", "role": "viewer"})),
        ("POST /api/admin/members/{username}/link", lambda: client.post(
            "/api/admin/members/newcomer/link", headers=admin)),
        ("PUT /api/admin/members/{username}", lambda: client.put(
            "/api/admin/members/lab-viewer", headers=owner, json={"role": "member"})),
        ("DELETE /api/admin/members/{username}", lambda: client.delete("/api/admin/members/lab-target", headers=owner)),
        ("POST /api/platform/identity-providers", lambda: client.post(
            "/api/platform/identity-providers", headers=platform_admin,
            json={"name": "audited-idp", "issuer": "https://idp.example", "client_id": "c", "client_secret": "s"})),
        ("PUT /api/platform/tenants/{tenant_id}/identity-providers", lambda: client.put(
            f"/api/platform/tenants/{world.tenant_id}/identity-providers", headers=platform_admin,
            json={"providers": ["audited-idp"]})),
        ("PUT /api/admin/sso/rules", lambda: client.put("/api/admin/sso/rules", headers=owner, json={
            "rules": [{"provider": "audited-idp", "group": "heads", "role": "admin"}]})),
        ("PUT /api/admin/sso/policy", lambda: client.put(
            "/api/admin/sso/policy", headers=owner, json={"password_sign_in": True, "link_sign_in": True})),
        ("DELETE /api/platform/identity-providers/{name}", lambda: client.delete(
            "/api/platform/identity-providers/audited-idp", headers=platform_admin)),
        ("PUT /api/platform/tenants/{tenant_id}/limits", lambda: client.put(
            f"/api/platform/tenants/{world.tenant_id}/limits", headers=platform_admin, json={"max_tokens": 100})),
        ("DELETE /v1/models/{model_id:path}", lambda: client.delete(f"/v1/models/{ids['model_id']}", headers=member)),
        ("POST /api/admin/agents/tokens", lambda: client.post(
            "/api/admin/agents/tokens", headers=admin, json={"roles": ["train"]})),
        ("DELETE /api/admin/agents/tokens/{token_id}", withdraw_token),
        ("POST /api/fabric/enroll", enroll),
        ("POST /api/fabric/renew", renew),
        ("POST /api/admin/agents/{agent_id}/revoke", lambda: client.post(
            f"/api/admin/agents/{state['enrolled']['agent_id']}/revoke", headers=owner)),  # type: ignore[index]
        ("POST /api/federations", create_federation),
        ("POST /api/federations/{federation_id}/sites", lambda: client.post(
            f"/api/federations/{state['federation']}/sites", headers=owner,
            json={"name": "site-1", "public_key": site_key()})),
        ("POST /api/federations/{federation_id}/invitations", invite_site),
        ("DELETE /api/federations/{federation_id}/invitations/{invitation_id}", withdraw_site_invitation),
        ("POST /api/federations/join", join_site),
        ("PUT /api/federations/{federation_id}/coordinator", lambda: client.put(
            f"/api/federations/{state['federation']}/coordinator", headers=owner,
            json={"superlink": "127.0.0.1:9093", "superlink_ca": ca_pem(), "rounds": 1})),
        ("POST /api/federations/{federation_id}/events", lambda: client.post(
            f"/api/federations/{state['federation']}/events", headers=owner, json={"event": "done"})),
        ("DELETE /api/datasets/{dataset_id}", lambda: client.delete(
            f"/api/datasets/{ids['dataset_id']}", headers=owner)),
        ("DELETE /v1/files/{file_id}", lambda: client.delete(f"/v1/files/{ids['file_id']}", headers=owner)),
    ]  # fmt: skip


def test_every_state_changing_route_writes_an_audit_record(world: World, lora_bytes: bytes, tmp_path):  # noqa: ANN001
    routes = {f"{method} {path}" for method, path in app_routes(world.client.app) if method in STATE_CHANGING}
    planned = calls(world, lora_bytes, tmp_path)
    called = [route for route, _ in planned]
    unplanned = sorted(routes - set(called) - NOT_AUDITED.keys())
    assert not unplanned, "state-changing routes with no audit check (add a call, or a reason to NOT_AUDITED):\n" + (
        "\n".join(unplanned)
    )
    assert not set(called) & NOT_AUDITED.keys()
    silent = []
    for route, call in planned:
        before = last_seq(world)
        response = call()
        assert response.status_code < 400, f"{route}: {response.status_code} {response.text[:300]}"
        if last_seq(world) == before:
            silent.append(route)
    assert not silent, "these routes changed state and wrote no audit record:\n" + "\n".join(silent)
    with world.platform.db.system() as s:
        assert audit.verify(s).ok
