"""/api/federations: the coordinating tenant records its sites' keys and gets the roster; another tenant
sees none of it; the coordinator's result is an ordinary adapter that imports and answers chat."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from sqlalchemy import select

from adaptery.auth.principal import Role
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.engine.demo_model import DEMO_MODEL_ID
from adaptery.federated.apps import load_roster
from adaptery.services import keys as api_keys


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
    with running.platform.db.system() as s:
        member = m.User(id=new_id("user_"), username="mo")
        s.add(member)
        s.flush()
        s.add(m.Membership(id=new_id("mem_"), tenant_id=running.tenant_id, user_id=member.id, role=Role.MEMBER))
        member_key = api_keys.create_key(s, tenant_id=running.tenant_id, user_id=member.id).secret
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
