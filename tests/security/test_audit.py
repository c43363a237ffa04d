"""The audit log: what it records, who reads it, and a hash chain that shows any tampering."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from adaptery.auth.secrets import hash_password
from adaptery.db import models as m
from adaptery.services import audit
from tests.conftest import SAMPLE_CHAT, use_sign_in_link
from tests.security.conftest import World


def actions(world: World, who: str = "admin", **params: object) -> list[dict]:
    response = world.client.get("/api/admin/audit", headers=world.auth(who), params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def drop_append_only_triggers(world: World) -> None:
    """What an attacker with database access would do first."""
    with world.platform.db.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("DROP TRIGGER audit_events_append_only ON audit_events"))
        else:
            connection.execute(text("DROP TRIGGER audit_events_no_update"))
            connection.execute(text("DROP TRIGGER audit_events_no_delete"))


def test_security_relevant_actions_are_recorded_for_the_tenant(world: World):
    client, owner, member = world.client, world.auth("owner"), world.auth("member")
    adapter = world.ids["model_id"]
    with world.platform.db.system() as s:
        s.query(m.User).filter_by(username="lab-owner").one().password_hash = hash_password("correct horse battery")
    client.post("/api/auth/login", json={"username": "lab-owner", "password": "wrong password"})
    client.post("/api/auth/login", json={"username": "lab-owner", "password": "correct horse battery"})
    changed = client.post(
        "/api/auth/password",
        headers={"x-csrf-token": client.cookies.get("adaptery_csrf")},
        json={"password": "a new password", "current_password": "correct horse battery"},
    )
    assert changed.status_code == 204, changed.text
    client.cookies.clear()
    key = client.post("/api/keys", headers=owner, json={"name": "x"}).json()
    client.post(f"/api/keys/{key['id']}/rotate", headers=owner, json={"overlap_seconds": 0})
    client.delete(f"/api/keys/{key['id']}", headers=owner)
    client.get(f"/v1/files/{world.ids['file_id']}/content", headers=owner)
    client.post(f"/v1/fine_tuning/jobs/{world.ids['job_id']}/cancel", headers=owner)
    client.get(f"/api/models/{adapter}/download", headers=member)
    client.put(
        f"/api/models/{adapter}/sharing", headers=member, json={"visibility": "shared", "members": ["lab-viewer"]}
    )
    client.put(f"/api/models/{adapter}/sharing", headers=member, json={"visibility": "private"})
    client.put("/api/admin/members/lab-viewer", headers=owner, json={"role": "member"})
    client.put(f"/api/platform/tenants/{world.tenant_id}/limits", headers=world.auth("platform_admin"), json={})
    client.delete(f"/v1/models/{adapter}", headers=member)
    client.delete(f"/v1/files/{world.ids['file_id']}", headers=owner)

    events = actions(world)
    seen = {(e["action"], e["outcome"]) for e in events}
    for expected in (
        ("auth.sign_in", "failure"),
        ("auth.sign_in", "success"),
        ("user.password_change", "success"),
        ("key.create", "success"),
        ("key.rotate", "success"),
        ("key.revoke", "success"),
        ("file.upload", "success"),
        ("dataset.upload", "success"),
        ("file.download", "success"),
        ("job.create", "success"),
        ("job.cancel", "success"),
        ("model.import", "success"),
        ("model.download", "success"),
        ("model.share", "success"),
        ("model.unshare", "success"),
        ("member.role", "success"),
        ("admin.limits", "success"),
        ("model.delete", "success"),
        ("file.delete", "success"),
    ):
        assert expected in seen, f"{expected} not in the audit log: {sorted(seen)}"
    role_change = next(e for e in events if e["action"] == "member.role")
    assert role_change["actor"] == "lab-owner" and role_change["target"] == "lab-viewer"
    assert role_change["detail"] == {"from": "viewer", "to": "member"} and role_change["ip"]
    share = next(e for e in events if e["action"] == "model.share")
    assert share["detail"]["members"] == ["lab-viewer"] and share["actor"] == "lab-member"
    assert [e["seq"] for e in events] == sorted((e["seq"] for e in events), reverse=True)


def test_another_tenant_never_reads_these_events(world: World):
    world.client.post("/api/keys", headers=world.auth("owner"), json={})
    other = world.running.new_tenant("third", "third-owner")
    theirs = world.client.get("/api/admin/audit", headers={"Authorization": f"Bearer {other.api_key}"}).json()["data"]
    assert theirs == []
    assert world.client.get("/api/admin/audit", headers=world.auth("member")).status_code == 403


def test_the_chain_verifies_and_the_database_refuses_rewrites(world: World):
    with world.platform.db.system() as s:
        result = audit.verify(s)
    assert result.ok and result.rows >= 4
    with pytest.raises(DBAPIError, match="append-only"), world.platform.db.engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET outcome = 'failure' WHERE seq = 1"))
    with pytest.raises(DBAPIError, match="append-only"), world.platform.db.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_events WHERE seq = 2"))


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        ("UPDATE audit_events SET target = 'someone-else' WHERE seq = 2", "content was changed"),
        ("DELETE FROM audit_events WHERE seq = 2", "missing"),
        ("UPDATE audit_events SET prev_hash = hash WHERE seq = 2", "link"),
    ],
)
def test_verify_points_at_the_first_tampered_row(world: World, tamper: str, problem: str):
    drop_append_only_triggers(world)
    with world.platform.db.engine.begin() as connection:
        connection.execute(text(tamper))
    with world.platform.db.system() as s:
        result = audit.verify(s)
    assert not result.ok and result.first_broken_seq == 2 and problem in result.problem


def test_removing_the_newest_rows_is_noticed_too(world: World):
    drop_append_only_triggers(world)
    with world.platform.db.system() as s:
        last = audit.verify(s).rows
    with world.platform.db.engine.begin() as connection:
        connection.execute(text(f"DELETE FROM audit_events WHERE seq = {last}"))
    with world.platform.db.system() as s:
        result = audit.verify(s)
    assert not result.ok and result.first_broken_seq == last


def test_the_verify_command(world: World):
    env_args = ["--database-url", world.platform.settings.resolved_database_url]
    command = [sys.executable, "-m", "adaptery.cli", "audit", "verify", *env_args]
    intact = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert intact.returncode == 0 and "intact" in intact.stdout, intact.stdout + intact.stderr
    drop_append_only_triggers(world)
    with world.platform.db.engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET actor = 'nobody' WHERE seq = 3"))
    broken = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert broken.returncode == 1 and "broken at row 3" in broken.stdout, broken.stdout + broken.stderr


def test_a_refused_upload_leaves_no_audit_row(world: World):
    before = len(actions(world))
    response = world.client.post(
        "/v1/files",
        headers=world.auth("viewer"),
        files={"file": ("t.jsonl", SAMPLE_CHAT.read_bytes())},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 403
    after = actions(world)
    # nothing of the upload; the refusal itself is a security event
    assert [(e["action"], e["outcome"]) for e in after[: len(after) - before]] == [("auth.denied", "failure")]


def test_the_audit_log_pages_through_every_event_and_filters_and_exports_them(world: World):
    owner = world.auth("owner")
    for i in range(12):  # 24 events on top of the world's own
        key = world.client.post("/api/keys", headers=owner, json={"name": f"k{i}"}).json()
        world.client.delete(f"/api/keys/{key['id']}", headers=owner)
    everything = actions(world)
    assert len(everything) > 24
    seen, params = [], {"limit": 10}
    while True:
        page = world.client.get("/api/admin/audit", headers=world.auth("admin"), params=params).json()
        seen += [e["seq"] for e in page["data"]]
        assert page["first_id"] == page["data"][0]["seq"] and page["last_id"] == page["data"][-1]["seq"]
        if not page["has_more"]:
            break
        params["after"] = page["last_id"]
    assert seen == [e["seq"] for e in everything]  # every event once, newest first, across pages of 10

    revoked = actions(world, action="key.revoke")
    assert len(revoked) == 12 and {e["action"] for e in revoked} == {"key.revoke"}
    assert {e["action"] for e in actions(world, action="key.")} == {"key.create", "key.revoke"}
    assert {e["actor"] for e in actions(world, actor="lab-owner")} == {"lab-owner"}
    middle = everything[len(everything) // 2]["created_at"]
    assert all(e["created_at"] >= middle for e in actions(world, since=middle))
    assert all(e["created_at"] < middle for e in actions(world, until=middle))

    exported = world.client.get("/api/admin/audit/export", headers=world.auth("admin"), params={"action": "key."})
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [int(r["seq"]) for r in rows] == sorted(e["seq"] for e in everything if e["action"].startswith("key."))
    with world.platform.db.system() as s:
        assert audit.verify(s).ok


def test_pausing_resuming_exporting_and_signing_in_by_link_are_audited(world: World):
    client, owner, job_id = world.client, world.auth("owner"), world.ids["job_id"]
    with world.platform.db.system() as s:
        s.get(m.FineTuningJob, job_id).status = "queued"
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=owner).status_code == 200
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=owner).status_code == 200
    invited = client.post("/api/admin/members", headers=owner, json={"username": "newcomer"}).json()
    browser = TestClient(client.app)
    assert use_sign_in_link(browser, invited["login_url"]).status_code == 200
    first_password = browser.post(
        "/api/auth/password",
        headers={"x-csrf-token": browser.cookies.get("adaptery_csrf")},
        json={"password": "a long one"},
    )
    assert first_password.status_code == 204, first_password.text
    assert TestClient(client.app).post("/api/auth/link", json={"token": "forged"}).status_code == 401
    dataset_id = world.ids["dataset_id"]
    deadline = time.monotonic() + 60
    while client.get(f"/api/datasets/{dataset_id}/versions/1", headers=owner).json()["status"] != "ready":
        assert time.monotonic() < deadline, "the dataset never became ready"
        time.sleep(0.05)
    exported = client.post(f"/api/datasets/{dataset_id}/versions/1/export", headers=owner, json={})
    assert exported.status_code == 200, exported.text
    read = client.get(f"/api/datasets/{dataset_id}/versions/1/records", headers=owner, params={"offset": 1})
    assert read.status_code == 200, read.text
    assert client.get(f"/api/datasets/{dataset_id}/versions/1/content", headers=owner).status_code == 200

    events = actions(world)
    seen = {(e["action"], e["target"], e["outcome"]) for e in events}
    assert ("job.pause", job_id, "success") in seen and ("job.resume", job_id, "success") in seen
    assert ("auth.sign_in_link", "newcomer", "success") in seen
    assert ("user.password_change", "newcomer", "success") in seen
    assert ("dataset.export", dataset_id, "success") in seen
    assert ("dataset.download", dataset_id, "success") in seen
    page = next(e for e in events if e["action"] == "dataset.read")  # reading records shows who looked, and where
    assert page["target"] == dataset_id and page["detail"] == {"version": 1, "offset": 1} and page["ip"]
    assert all(e["ip"] for e in events if e["action"] in ("job.pause", "dataset.export", "auth.sign_in_link"))
    with world.platform.db.system() as s:  # a forged link names no account: filed under no tenant
        forged = s.scalars(select(m.AuditEvent).where(m.AuditEvent.action == "auth.sign_in_link")).all()
        assert any(row.outcome == "failure" and row.tenant_id is None for row in forged)


def test_a_refused_action_is_audited_as_a_failure(world: World):
    refused = world.client.put(
        f"/api/platform/tenants/{world.tenant_id}/limits", headers=world.auth("owner"), json={"max_tokens": 1}
    )
    assert refused.status_code == 403
    denied = actions(world, action="auth.denied")
    assert denied and denied[0]["outcome"] == "failure"
    assert denied[0]["target"] == "PUT /api/platform/tenants/{tenant_id}/limits"
