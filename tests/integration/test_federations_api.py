"""/api/federations: the coordinating tenant records its sites' keys and gets the roster; another tenant
sees none of it; a site joins with a one-time invitation and its own key, then checks in by signature; the
coordinator reports its rounds; its result is an ordinary adapter that imports and answers chat."""

from __future__ import annotations

import io
import json
import time
import zipfile

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from sqlalchemy import select

from adaptery.auth.principal import Role
from adaptery.db import models as m
from adaptery.engine.demo_model import DEMO_MODEL_ID
from adaptery.federated import join
from adaptery.federated.apps import load_roster
from tests.conftest import ca_pem
from tests.security.conftest import add_key, add_user


def person(running, username: str, role: Role) -> tuple[str, str]:
    """A person of the first tenant in `role`, and an API key of theirs: (user id, key)."""
    user_id = add_user(running.platform, running.tenant_id, username, role)
    return user_id, add_key(running.platform, running.tenant_id, user_id)


def ssh_public(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def test_federation_sites_roster_and_tenancy(running):
    client, auth = running.client, running.auth()
    created = client.post("/api/federations", json={"name": "hospitals", "base_model": DEMO_MODEL_ID}, headers=auth)
    assert created.status_code == 201, created.text
    federation = created.json()
    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)]
    for number, key in enumerate(keys, 1):
        site = client.post(
            f"/api/federations/{federation['id']}/sites",
            json={"name": f"site-{number}", "public_key": ssh_public(key) + " comment@host"},
            headers=auth,
        )
        assert site.status_code == 201, site.text
        assert site.json()["number"] == number and len(site.json()["fingerprint"]) == 64
    roster = client.get(f"/api/federations/{federation['id']}/roster", headers=auth).json()
    assert roster == {str(n): ssh_public(k) for n, k in enumerate(keys, 1)}
    path = running.platform.settings.data_dir / "roster.json"
    path.write_text(json.dumps(roster))
    assert load_roster(path)[2].public_numbers() == keys[1].public_key().public_numbers()  # what the CLI runs with
    listed = client.get("/api/federations", headers=auth).json()["data"]
    assert [f["name"] for f in listed] == ["hospitals"] and len(listed[0]["sites"]) == 3

    duplicate = client.post(
        f"/api/federations/{federation['id']}/sites",
        json={"name": "again", "public_key": ssh_public(keys[0])},
        headers=auth,
    )
    assert duplicate.status_code == 409
    wrong_kind = ssh_public(ed25519.Ed25519PrivateKey.generate())
    refused = client.post(
        f"/api/federations/{federation['id']}/sites", json={"name": "ed", "public_key": wrong_kind}, headers=auth
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "public_key"
    garbage = client.post(
        f"/api/federations/{federation['id']}/sites", json={"name": "x", "public_key": "not a key"}, headers=auth
    )
    assert garbage.status_code == 400
    assert (
        client.post(
            "/api/federations", json={"name": "hospitals", "base_model": DEMO_MODEL_ID}, headers=auth
        ).status_code
        == 409
    )
    assert client.post("/api/federations", json={"name": "x", "base_model": "nope"}, headers=auth).status_code == 404

    same_name = client.post(
        f"/api/federations/{federation['id']}/sites",
        json={"name": "site-1", "public_key": ssh_public(ec.generate_private_key(ec.SECP256R1()))},
        headers=auth,
    )
    assert same_name.status_code == 409 and same_name.json()["error"]["param"] == "name"
    # The roster is the federation's root of trust: a colleague who is a member, not its creator, adds no site.
    member_key = person(running, "mo", Role.MEMBER)[1]
    colleague = client.post(
        f"/api/federations/{federation['id']}/sites",
        json={"name": "mine", "public_key": ssh_public(ec.generate_private_key(ec.SECP256R1()))},
        headers=running.auth(member_key),
    )
    assert colleague.status_code == 403 and colleague.json()["error"]["code"] == "insufficient_role"

    other = running.auth(running.new_tenant("other", "mallory").api_key)
    assert client.get(f"/api/federations/{federation['id']}", headers=other).status_code == 404
    assert client.get(f"/api/federations/{federation['id']}/roster", headers=other).status_code == 404
    intruder = client.post(
        f"/api/federations/{federation['id']}/sites",
        json={"name": "evil", "public_key": ssh_public(ec.generate_private_key(ec.SECP256R1()))},
        headers=other,
    )
    assert intruder.status_code == 404
    assert client.get("/api/federations", headers=other).json()["data"] == []

    with running.platform.db.system() as s:
        actions = list(s.scalars(select(m.AuditEvent.action).where(m.AuditEvent.target == federation["id"])))
    assert actions.count("federation.site_add") == 3 and "federation.create" in actions


def test_coordinator_adapter_imports_and_chats(running, demo_model_dir, tmp_path):
    """What the ServerApp writes at the end (FFA-LoRA B set from the aggregate) is an ordinary adapter."""
    from adaptery.federated.config import FederatedLoraConfig
    from adaptery.federated.lora import UpdateLayout, build_model, save_adapter

    config = FederatedLoraConfig(rank=4, alpha=8)
    model = build_model(demo_model_dir, config)
    layout = UpdateLayout(model, config)
    layout.write(np.random.default_rng(0).normal(0, 0.01, layout.size))
    adapter = save_adapter(model, tmp_path / "adapter")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in adapter.iterdir():
            archive.write(file, file.name)
    imported = running.client.post(
        "/api/models/import",
        params={"base_model": DEMO_MODEL_ID, "suffix": "federated"},
        content=buffer.getvalue(),
        headers=running.auth(),
    )
    assert imported.status_code == 200, imported.text
    model_id = imported.json()["id"]
    reply = running.client.post(
        "/v1/chat/completions",
        json={"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers=running.auth(),
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == model_id

    # The coordinator links the federation to it: only a model the caller may see.
    auth = running.auth()
    federation = running.client.post(
        "/api/federations", json={"name": "adapter-link", "base_model": DEMO_MODEL_ID}, headers=auth
    ).json()
    events = f"/api/federations/{federation['id']}/events"
    hidden = running.client.post(events, json={"event": "adapter", "model": f"{model_id}x"}, headers=auth)
    assert hidden.status_code == 404
    with running.platform.db.system() as s:  # another person's private adapter: its owner sees it, readers not
        adapter_row = s.scalar(select(m.Adapter).where(m.Adapter.id == model_id))
        creator, adapter_row.created_by, adapter_row.visibility = adapter_row.created_by, "user_else", "private"
    private = running.client.post(events, json={"event": "adapter", "model": model_id}, headers=auth)
    assert private.status_code == 404, private.text  # FINDINGS L3
    with running.platform.db.system() as s:
        s.scalar(select(m.Adapter).where(m.Adapter.id == model_id)).created_by = creator
    linked = running.client.post(events, json={"event": "adapter", "model": model_id}, headers=auth)
    assert linked.status_code == 200, linked.text
    assert linked.json()["adapter"] == model_id


def invite(running, federation_id: str, name: str, key: str | None = None, **extra) -> object:
    return running.client.post(
        f"/api/federations/{federation_id}/invitations",
        json={"name": name, **extra},
        headers=running.auth(key),
    )


def test_a_site_joins_with_a_one_time_token_and_checks_in_by_signature(running, tmp_path):
    client, auth = running.client, running.auth()
    federation = client.post("/api/federations", json={"name": "clinics", "base_model": DEMO_MODEL_ID}, headers=auth)
    fed_id = federation.json()["id"]
    made = invite(running, fed_id, "clinic-a", ttl_seconds=600)
    assert made.status_code == 201, made.text
    token = made.json()["token"]
    listed = client.get(f"/api/federations/{fed_id}", headers=auth).json()
    assert [i["name"] for i in listed["invitations"]] == ["clinic-a"] and listed["invitations"][0]["token"] is None

    # Proof of possession: a join signed by another key than the one it registers is refused, and spends nothing.
    stranger = ec.generate_private_key(ec.SECP384R1())
    secret = token.rpartition(".")[0]
    forged = client.post(
        "/api/federations/join",
        json={
            "token": token,
            "public_key": ssh_public(ec.generate_private_key(ec.SECP384R1())),
            "signature": join.sign(stranger, join.join_message(secret)).hex(),
        },
    )
    assert forged.status_code == 401

    site_dir = tmp_path / "site-a"
    membership = join.join("http://testserver", token, site_dir, http=client)
    assert (membership.number, membership.name, membership.federation_id) == (1, "clinic-a", fed_id)
    assert (site_dir / join.KEY_FILE).stat().st_mode & 0o077 == 0  # the key never leaves the site, nor is shared
    record = client.get(f"/api/federations/{fed_id}", headers=auth).json()
    assert record["invitations"] == []
    (site,) = record["sites"]
    assert site["joined"] and site["status"] == "online"
    assert site["public_key"].split()[:2] == (site_dir / "identity.pub").read_text().split()[:2]

    with pytest.raises(join.JoinError, match="401"):  # one use
        join.join("http://testserver", token, tmp_path / "again", http=client)
    assert not (tmp_path / "again" / join.KEY_FILE).exists()

    expired = invite(running, fed_id, "clinic-b", ttl_seconds=600).json()["token"]
    with running.platform.db.system() as s:
        s.execute(
            m.FederationInvitation.__table__.update()
            .where(m.FederationInvitation.name == "clinic-b")
            .values(expires_at=time.time() - 1)
        )
    with pytest.raises(join.JoinError, match="401"):
        join.join("http://testserver", expired, tmp_path / "late", http=client)
    with pytest.raises(join.JoinError, match="not the one this invitation was made for"):
        join.join("http://testserver", f"{secret}.{'0' * 64}", tmp_path / "wrong-ca", http=client)
    with pytest.raises(join.JoinError, match="64 hex digits"):
        join.join("http://testserver", "not-a-token", tmp_path / "garbage", http=client)

    # Bad invitations: a name taken, a lifetime past the platform's maximum, a colleague who is not the steward.
    assert invite(running, fed_id, "clinic-a").status_code == 409
    assert invite(running, fed_id, "clinic-c", ttl_seconds=10**9).status_code == 400
    member_key = person(running, "mo", Role.MEMBER)[1]
    refused = invite(running, fed_id, "clinic-c", member_key)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_role"

    # Another tenant sees nothing of the federation, and can neither invite, publish, nor report to it.
    other = running.new_tenant("other", "mallory").api_key
    assert invite(running, fed_id, "evil", other).status_code == 404
    assert client.get(f"/api/federations/{fed_id}", headers=running.auth(other)).status_code == 404
    coordinator = {"superlink": "127.0.0.1:9093", "superlink_ca": ca_pem(), "rounds": 2}
    put = f"/api/federations/{fed_id}/coordinator"
    assert client.put(put, json=coordinator, headers=running.auth(other)).status_code == 404
    events = f"/api/federations/{fed_id}/events"
    assert client.post(events, json={"event": "start"}, headers=running.auth(other)).status_code == 404
    their_fed = client.post(
        "/api/federations", json={"name": "theirs", "base_model": DEMO_MODEL_ID}, headers=running.auth(other)
    ).json()
    their_token = invite(running, their_fed["id"], "x", other).json()["token"]
    theirs = join.join("http://testserver", their_token, tmp_path / "theirs", http=client)
    assert theirs.federation_id == their_fed["id"]  # an invitation joins its own federation, whoever's it is
    assert len(client.get(f"/api/federations/{fed_id}", headers=auth).json()["sites"]) == 1

    # Check-ins: before a coordinator publishes, nothing to run with; after, the SuperLink and the roster.
    view = join.check_in(site_dir, http=client)
    assert view["superlink"] is None and not join.write_run_files(site_dir, view)
    unknown_site = client.put(put, json={**coordinator, "sites": [1, 9]}, headers=auth)
    assert unknown_site.status_code == 400 and unknown_site.json()["error"]["param"] == "sites"
    roster = client.put(put, json=coordinator, headers=auth)
    assert roster.status_code == 200 and list(roster.json()) == ["1"]
    view = join.check_in(site_dir, http=client)
    assert join.write_run_files(site_dir, view)
    assert json.loads((site_dir / join.ROSTER_FILE).read_text()) == roster.json()
    assert (site_dir / join.SUPERLINK_CA_FILE).read_text() == ca_pem()
    check_in = f"/api/federations/sites/{membership.site_id}/check-in"
    now = int(time.time() * 1000)
    wrong = client.post(check_in, json={"time_ms": now, "signature": join.sign(stranger, b"x").hex()})
    assert wrong.status_code == 401
    stale = join.sign(join.load_key(site_dir), join.check_in_message(membership.site_id, now - 3_600_000)).hex()
    assert client.post(check_in, json={"time_ms": now - 3_600_000, "signature": stale}).status_code == 401
    unknown = client.post("/api/federations/sites/site_nope/check-in", json={"time_ms": now, "signature": "00"})
    assert unknown.status_code == 404
    assert client.post(check_in, json={"time_ms": now, "signature": "zz"}).status_code == 400
    seconds = client.post(check_in, json={"time": now // 1000, "signature": stale})  # the old body: named, refused
    assert seconds.status_code == 400 and "time_ms" in seconds.text

    # A captured check-in replayed within the clock window is refused: each must be newer than the last accepted,
    # an older one too (its copy kept back while the site checked in again); the site's next one is accepted.
    def signed(when_ms: int) -> dict:
        signature = join.sign(join.load_key(site_dir), join.check_in_message(membership.site_id, when_ms)).hex()
        return {"time_ms": when_ms, "signature": signature}

    captured, held_back = signed(now + 1000), signed(now + 500)
    assert client.post(check_in, json=captured).status_code == 200
    replayed = client.post(check_in, json=captured)
    assert replayed.status_code == 409 and "replayed" in replayed.json()["error"]["message"]
    assert client.post(check_in, json=held_back).status_code == 409
    with running.platform.db.system() as s:
        assert s.get(m.FederationSite, membership.site_id).last_check_in == now + 1000
    assert client.post(check_in, json=signed(now + 1001)).status_code == 200

    with running.platform.db.system() as s:
        actions = list(s.scalars(select(m.AuditEvent.action).where(m.AuditEvent.target == fed_id)))
    assert {"federation.invite", "federation.site_join", "federation.coordinator"} <= set(actions)


def test_the_coordinator_reports_rounds_and_sites_that_dropped(running):
    client, auth = running.client, running.auth()
    fed_id = client.post("/api/federations", json={"name": "rounds", "base_model": DEMO_MODEL_ID}, headers=auth).json()[
        "id"
    ]
    for number in (1, 2):
        key = ssh_public(ec.generate_private_key(ec.SECP256R1()))
        client.post(f"/api/federations/{fed_id}/sites", json={"name": f"s{number}", "public_key": key}, headers=auth)
    coordinator = {"superlink": "127.0.0.1:9093", "superlink_ca": ca_pem(), "rounds": 2, "sites": [1, 2]}
    assert client.put(f"/api/federations/{fed_id}/coordinator", json=coordinator, headers=auth).status_code == 200
    events = f"/api/federations/{fed_id}/events"

    def report(event: dict) -> dict:
        response = client.post(events, json=event, headers=auth)
        assert response.status_code == 200, response.text
        return response.json()

    assert report({"event": "start", "sites": 2, "rounds": 2, "parameters": 10})["status"] == "running"
    progress = report({"round": 1, "stage": "share", "answered": 2, "asked": 2, "time": 1.0})["progress"]
    assert progress == {"round": 1, "stage": "share"}
    record = report({"event": "round", "round": 1, "loss": 2.5, "survivors": [1], "seconds": 3.2})
    assert record["history"][0]["loss"] == 2.5 and record["progress"] == {"round": 2, "stage": "training"}
    assert [s["status"] for s in record["sites"]] == ["added", "dropped"]
    duplicate = client.post(events, json={"event": "round", "round": 1, "survivors": [1]}, headers=auth)
    assert duplicate.status_code == 409
    assert client.post(events, json={"event": "bogus"}, headers=auth).status_code == 400
    assert client.post(events, json={"answered": 2}, headers=auth).status_code == 400
    assert client.post(events, json={"event": "round", "survivors": [1]}, headers=auth).status_code == 400
    private = report({"event": "round", "round": 2, "loss": None, "survivors": [1, 2], "epsilon": 1.5, "seconds": 3})
    assert private["history"][1]["loss"] is None and private["history"][1]["epsilon"] == 1.5
    done = report({"event": "done", "adapter": "/tmp/out/adapter"})
    assert done["status"] == "done" and done["progress"] is None
    assert report({"event": "failed", "error": "boom"})["error"] == "boom"


def test_progress_events_and_the_coordinator_are_checked(running):
    """FINDINGS L3: nonsense numbers, sites outside the federation, a round past the last, a CA that is no PEM,
    a port past 65535, and an adapter its reporter may see but the federation's readers may not were accepted."""
    client, auth = running.client, running.auth()
    fed_id = client.post("/api/federations", json={"name": "checked", "base_model": DEMO_MODEL_ID}, headers=auth)
    fed_id = fed_id.json()["id"]
    for number in (1, 2):
        key = ssh_public(ec.generate_private_key(ec.SECP256R1()))
        client.post(f"/api/federations/{fed_id}/sites", json={"name": f"s{number}", "public_key": key}, headers=auth)
    put = f"/api/federations/{fed_id}/coordinator"
    good = {"superlink": "127.0.0.1:9093", "superlink_ca": ca_pem(), "rounds": 3}
    for bad, param in (
        ({**good, "superlink_ca": "not a pem"}, "superlink_ca"),
        ({**good, "superlink": "127.0.0.1:99999"}, "superlink"),
        ({**good, "superlink": "127.0.0.1:0"}, "superlink"),
    ):
        response = client.put(put, json=bad, headers=auth)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert client.put(put, json=good, headers=auth).status_code == 200
    events = f"/api/federations/{fed_id}/events"
    assert client.post(events, json={"event": "start", "rounds": 3}, headers=auth).status_code == 200
    for bad, param in (
        ({"seconds": -1e308}, "seconds"),
        ({"seconds": float("inf")}, "seconds"),
        ({"epsilon": -5}, "epsilon"),
        ({"survivors": [999999999999, -5]}, "survivors"),
        ({"survivors": [3]}, "survivors"),
        ({"round": 9999}, "round"),
    ):
        event = {"event": "round", "round": 1, "survivors": [1, 2], **bad}
        response = client.post(events, content=json.dumps(event), headers={**auth, "content-type": "application/json"})
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["param"].split("[")[0].split(".")[0] == param, response.text
    sites = client.get(f"/api/federations/{fed_id}", headers=auth).json()["sites"]
    assert [s["status"] for s in sites] != ["added", "dropped"] and not any(s["status"] == "dropped" for s in sites)


def test_a_site_invitation_dies_with_its_makers_right_to_make_it(running, tmp_path):
    """As with enrollment tokens (an attacker's find): an admin who left, or lost the role that let them invite,
    cannot have a site join with an invitation made before."""
    client = running.client
    fed_id = client.post(
        "/api/federations", json={"name": "wards", "base_model": DEMO_MODEL_ID}, headers=running.auth()
    ).json()["id"]
    people = {name: person(running, name, Role.ADMIN) for name in ("ada", "bea")}
    tokens = {name: invite(running, fed_id, f"site-{name}", key).json()["token"] for name, (_, key) in people.items()}
    kept = invite(running, fed_id, "site-owner").json()["token"]

    assert client.delete("/api/admin/members/ada", headers=running.auth()).status_code == 204
    with running.platform.db.system() as s:  # bea is demoted by a path that withdraws nothing (a database edit)
        s.scalar(select(m.Membership).where(m.Membership.user_id == people["bea"][0])).role = Role.MEMBER.value
        left = s.scalars(select(m.FederationInvitation.name).where(m.FederationInvitation.used_at.is_(None))).all()
    assert sorted(left) == ["site-bea", "site-owner"]  # ada's went with her membership
    for name, token in tokens.items():
        with pytest.raises(join.JoinError, match="401"):
            join.join("http://testserver", token, tmp_path / name, http=client)
    assert join.join("http://testserver", kept, tmp_path / "owner", http=client).name == "site-owner"
    assert [
        site["name"] for site in client.get(f"/api/federations/{fed_id}", headers=running.auth()).json()["sites"]
    ] == ["site-owner"]


def test_an_invitation_is_withdrawn_by_its_steward_and_with_any_change_of_its_makers_role(running, tmp_path):
    """An attacker's finds: a leaked invitation could not be withdrawn, one made by a member who created the
    federation still joined after they became a viewer, and a demoted admin's came back with a promotion."""
    client = running.client
    fed_id = client.post(
        "/api/federations", json={"name": "labs", "base_model": DEMO_MODEL_ID}, headers=running.auth()
    ).json()["id"]
    cleo = person(running, "cleo", Role.ADMIN)[1]
    leaked = invite(running, fed_id, "leaked").json()
    other = running.new_tenant("elsewhere", "eve").api_key
    path = f"/api/federations/{fed_id}/invitations/{leaked['id']}"
    assert client.delete(path, headers=running.auth(other)).status_code == 404  # another tenant's
    assert client.delete(path, headers=running.auth()).status_code == 204
    assert client.delete(path, headers=running.auth()).status_code == 404  # gone
    with pytest.raises(join.JoinError, match="401"):
        join.join("http://testserver", leaked["token"], tmp_path / "leaked", http=client)

    cleos = invite(running, fed_id, "cleos", cleo).json()["token"]
    for role in ("member", "admin"):  # demoted, then promoted again: the invitation does not come back
        changed = client.put("/api/admin/members/cleo", json={"role": role}, headers=running.auth())
        assert changed.status_code == 200, changed.text
    with pytest.raises(join.JoinError, match="401"):
        join.join("http://testserver", cleos, tmp_path / "cleo", http=client)
    assert client.get(f"/api/federations/{fed_id}", headers=running.auth()).json()["invitations"] == []
