"""Joining by certificate through the API: one-time, expiring, scoped enrollment tokens; a certificate whose
subject the platform sets; renewal only with the current key; revocation ends renewal. Each step is audited."""

from __future__ import annotations

import time

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import select

from adaptery.auth.principal import Role
from adaptery.db import models as m
from adaptery.messaging import identity
from tests.integration.conftest import Running
from tests.security.conftest import add_key, add_user


def token_for(running: Running, key: str | None = None, **body: object) -> dict:
    response = running.client.post("/api/admin/agents/tokens", json=body, headers=running.auth(key))
    assert response.status_code == 200, response.text
    return response.json()


def enroll(running: Running, token: str, key=None, kind: str = "agent"):  # noqa: ANN001, ANN201
    key = key or identity.make_key()
    response = running.client.post(
        "/api/fabric/enroll", json={"token": token, "csr": identity.make_csr(key).decode(), "kind": kind}
    )
    return response, key


def test_an_enrollment_token_buys_one_certificate_naming_tenant_island_and_agent(running: Running):
    made = token_for(running, scope="tenant", island="lab-gpu", roles=["train", "infer"], ttl_seconds=600)
    response, _ = enroll(running, made["token"])
    assert response.status_code == 200, response.text
    body = response.json()
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    name = {attr.oid: attr.value for attr in cert.subject}
    assert name == {
        NameOID.ORGANIZATION_NAME: running.tenant_id,
        NameOID.ORGANIZATIONAL_UNIT_NAME: "lab-gpu",
        NameOID.COMMON_NAME: body["agent_id"],
    }
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() <= running.platform.settings.agent_certificate_hours * 3600 + 600
    assert body["roles"] == ["infer", "train"] and body["tenant_id"] == running.tenant_id
    assert identity.ca_pin(body["ca"].encode()) == made["token"].rpartition(".")[2]

    again, _ = enroll(running, made["token"])
    assert again.status_code == 401 and "already used" in again.json()["error"]["message"]
    with running.platform.db.system() as s:
        stored = s.get(m.EnrollmentToken, made["id"])
        assert made["token"].partition(".")[0] not in stored.token_hash  # only a hash is kept
        actions = list(s.scalars(select(m.AuditEvent.action).where(m.AuditEvent.action.like("agent.%"))))
    assert actions == ["agent.token.create", "agent.enroll"]


def test_an_expired_or_forged_token_is_refused(running: Running):
    made = token_for(running, ttl_seconds=600)
    with running.platform.db.system() as s:
        s.get(m.EnrollmentToken, made["id"]).expires_at = time.time() - 1
    expired, _ = enroll(running, made["token"])
    assert expired.status_code == 401
    secret, pin = identity.parse_token(token_for(running)["token"])
    for forged in (f"{secret}x.{pin}", f"{secret}.{'0' * 64}", "not-a-token"):
        response, _ = enroll(running, forged)
        assert response.status_code == 401, forged


def test_only_platform_admins_enroll_for_the_platform_and_only_admins_for_their_tenant(running: Running):
    member = add_key(
        running.platform, running.tenant_id, add_user(running.platform, running.tenant_id, "mia", Role.MEMBER)
    )
    refused = running.client.post("/api/admin/agents/tokens", json={}, headers=running.auth(member))
    assert refused.status_code == 403
    other = running.new_tenant("other-lab", "olga")  # its owner, not a platform admin
    platform_wide = running.client.post(
        "/api/admin/agents/tokens", json={"scope": "platform"}, headers=running.auth(other.api_key)
    )
    assert platform_wide.status_code == 403
    assert token_for(running, other.api_key, scope="tenant")["tenant_id"] == other.tenant.id
    assert token_for(running, scope="platform")["tenant_id"] is None  # the first owner runs the platform


def test_renewal_needs_the_current_key_and_ends_with_revocation(running: Running):
    response, key = enroll(running, token_for(running, roles=["infer"])["token"])
    enrolled = response.json()
    current = enrolled["certificate"]
    renewed = running.client.post(
        "/api/fabric/renew", json={"certificate": current, "csr": identity.make_csr(key).decode()}
    )
    assert renewed.status_code == 200, renewed.text
    new = x509.load_pem_x509_certificate(renewed.json()["certificate"].encode())
    assert new.subject == x509.load_pem_x509_certificate(current.encode()).subject
    assert new.serial_number != x509.load_pem_x509_certificate(current.encode()).serial_number

    stolen_cert_only = running.client.post(
        "/api/fabric/renew", json={"certificate": current, "csr": identity.make_csr(identity.make_key()).decode()}
    )
    assert stolen_cert_only.status_code == 401

    other = running.new_tenant("other-lab", "olga")
    hidden = running.client.post(
        f"/api/admin/agents/{enrolled['agent_id']}/revoke", headers=running.auth(other.api_key)
    )
    assert hidden.status_code == 404
    revoked = running.client.post(f"/api/admin/agents/{enrolled['agent_id']}/revoke", headers=running.auth())
    assert revoked.status_code == 200
    for certificate in (current, renewed.json()["certificate"]):
        after = running.client.post(
            "/api/fabric/renew", json={"certificate": certificate, "csr": identity.make_csr(key).decode()}
        )
        assert after.status_code == 401 and "revoked" in after.json()["error"]["message"]


def test_a_token_enrolls_only_the_kind_it_was_made_for_and_a_refusal_spends_nothing(running: Running):
    # An attacker's way onto the hub's leafnode port (finding F2): an infer-only agent token, presented as a leaf.
    agent_token = token_for(running, island="edge", roles=["infer"], ttl_seconds=600)
    as_leaf, _ = enroll(running, agent_token["token"], kind="leaf")
    assert as_leaf.status_code == 403, as_leaf.text
    error = as_leaf.json()["error"]
    assert error["code"] == "wrong_token_kind" and "--kind leaf" in error["message"], error
    assert agent_token["kind"] == "agent"
    as_agent, _ = enroll(running, agent_token["token"])
    assert as_agent.status_code == 200 and as_agent.json()["kind"] == "agent"

    leaf_token = token_for(running, island="edge", kind="leaf", ttl_seconds=600)
    assert leaf_token["kind"] == "leaf" and leaf_token["roles"] == []
    refused, _ = enroll(running, leaf_token["token"])
    assert refused.status_code == 403 and "adaptery island up" in refused.json()["error"]["message"]
    leaf, _ = enroll(running, leaf_token["token"], kind="leaf")
    assert leaf.status_code == 200, leaf.text
    assert leaf.json()["kind"] == "leaf" and leaf.json()["roles"] == []
    with running.platform.db.system() as s:
        kinds = {row.id: row.kind for row in s.scalars(select(m.Agent).where(m.Agent.island == "edge"))}
    assert kinds == {as_agent.json()["agent_id"]: "agent", leaf.json()["agent_id"]: "leaf"}


def test_a_leaf_token_takes_no_roles(running: Running):
    given = running.client.post(
        "/api/admin/agents/tokens", json={"kind": "leaf", "roles": ["train"]}, headers=running.auth()
    )
    assert given.status_code == 400 and given.json()["error"]["param"] == "roles", given.text
    unknown = running.client.post("/api/admin/agents/tokens", json={"kind": "relay"}, headers=running.auth())
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "kind", unknown.text
    assert token_for(running)["roles"] == ["train"]  # an agent's default, as before


def test_an_islands_leaf_is_bound_to_an_account_with_only_that_islands_agents(running: Running):
    """What the broker is told (`enrollment.members` -> `accounts`), for machines enrolled through the API."""
    from adaptery.messaging.accounts import accounts, leaf_users
    from adaptery.services import enrollment

    def enrolled(island: str, kind: str, **body: object) -> str:
        response, _ = enroll(running, token_for(running, island=island, kind=kind, **body)["token"], kind=kind)
        assert response.status_code == 200, response.text
        return response.json()["agent_id"]

    lab_trainer = enrolled("lab", "agent", roles=["train"])
    edge_leaf = enrolled("edge", "leaf")
    edge_infer = enrolled("edge", "agent", roles=["infer"])
    lab_leaf = enrolled("lab", "leaf")
    with running.platform.db.system() as s:
        members = enrollment.members(s)
    bound = {user["user"].split(",")[0]: user["account"] for user in leaf_users(members)}
    assert bound.keys() == {f"CN={edge_leaf}", f"CN={lab_leaf}"} and len(set(bound.values())) == 2
    config = accounts("hash", {}, members, certificate_users=True)
    subjects = {
        leaf: {next(iter(entry.values()))["subject"] for entry in config[bound[f"CN={leaf}"]]["imports"]}
        for leaf in (edge_leaf, lab_leaf)
    }
    assert {s.split(".")[2] for s in subjects[edge_leaf]} == {edge_infer}
    assert {s.split(".")[2] for s in subjects[lab_leaf]} == {lab_trainer}


def admin_key(running: Running, username: str) -> tuple[str, str]:
    user_id = add_user(running.platform, running.tenant_id, username, Role.ADMIN)
    return user_id, add_key(running.platform, running.tenant_id, user_id)


def test_a_token_is_worth_no_more_than_its_makers_right_to_make_it(running: Running):
    """An attacker's find: an admin removed from the tenant (or demoted) could still enroll a machine with a token
    made before, which then leased the tenant's jobs and read its training data."""
    _, removed_key = admin_key(running, "ada")
    removed = token_for(running, removed_key, island="rogue", roles=["train", "infer"], ttl_seconds=3600)
    _, demoted_key = admin_key(running, "bea")
    demoted = token_for(running, demoted_key, island="rogue", roles=["train"], ttl_seconds=3600)
    cal_id, cal_key = admin_key(running, "cal")
    behind_our_back = token_for(running, cal_key, island="rogue", ttl_seconds=3600)
    kept = token_for(running, island="lab", ttl_seconds=3600)  # the owner's

    assert running.client.delete("/api/admin/members/ada", headers=running.auth()).status_code == 204
    demotion = running.client.put("/api/admin/members/bea", json={"role": "member"}, headers=running.auth())
    assert demotion.status_code == 200, demotion.text
    with running.platform.db.system() as s:  # a role lost by a path that does not withdraw tokens (a database edit)
        membership = s.scalar(select(m.Membership).where(m.Membership.user_id == cal_id))
        membership.role = Role.MEMBER.value
        assert s.get(m.EnrollmentToken, removed["id"]) is None  # withdrawn with the membership
        assert s.get(m.EnrollmentToken, demoted["id"]) is None  # and with the role
    for made in (removed, demoted, behind_our_back):
        response, _ = enroll(running, made["token"])
        assert response.status_code == 401, response.text
        assert response.json()["error"]["message"].startswith("This enrollment token")
    with running.platform.db.system() as s:
        assert s.get(m.EnrollmentToken, behind_our_back["id"]).used_at is None  # refused before it was spent
        assert s.scalar(select(m.Agent).where(m.Agent.island == "rogue")) is None
    response, _ = enroll(running, kept["token"])
    assert response.status_code == 200, response.text


def test_unspent_tokens_are_listed_and_withdrawn_by_their_tenants_admins_only(running: Running):
    spent = token_for(running, island="used")
    assert enroll(running, spent["token"])[0].status_code == 200
    pending = token_for(running, island="lab-gpu", roles=["infer"], ttl_seconds=600)
    listed = running.client.get("/api/admin/agents/tokens", headers=running.auth())
    assert listed.status_code == 200, listed.text
    [shown] = [t for t in listed.json()["data"] if t["scope"] == "tenant"]
    assert {k: shown[k] for k in ("id", "island", "kind", "roles")} == {
        "id": pending["id"], "island": "lab-gpu", "kind": "agent", "roles": ["infer"],
    }  # fmt: skip
    assert shown["created_by"] == running.first.username
    assert "token" not in shown  # shown once, when made

    other = running.new_tenant("other-lab", "olga")
    theirs = running.client.get("/api/admin/agents/tokens", headers=running.auth(other.api_key)).json()["data"]
    assert pending["id"] not in {t["id"] for t in theirs}
    stolen = running.client.delete(f"/api/admin/agents/tokens/{pending['id']}", headers=running.auth(other.api_key))
    assert stolen.status_code == 404
    member = add_key(
        running.platform, running.tenant_id, add_user(running.platform, running.tenant_id, "mo", Role.MEMBER)
    )
    assert running.client.get("/api/admin/agents/tokens", headers=running.auth(member)).status_code == 403
    assert running.client.delete(f"/api/admin/agents/tokens/{spent['id']}", headers=running.auth()).status_code == 404

    withdrawn = running.client.delete(f"/api/admin/agents/tokens/{pending['id']}", headers=running.auth())
    assert withdrawn.status_code == 204
    assert enroll(running, pending["token"])[0].status_code == 401
    listed = running.client.get("/api/admin/agents/tokens", headers=running.auth()).json()["data"]
    assert pending["id"] not in {t["id"] for t in listed}
    with running.platform.db.system() as s:
        actions = list(s.scalars(select(m.AuditEvent.action).where(m.AuditEvent.action == "agent.token.withdraw")))
    assert actions == ["agent.token.withdraw"]


def test_only_an_ec_key_enrolls_and_a_refused_key_spends_nothing(running: Running):
    """An attacker's find: an RSA-1024 request enrolled (and spent the token), for an agent whose presigned
    transfers, proved by ECDSA, could then never work."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    made = token_for(running, ttl_seconds=600)
    weak_keys = [
        (rsa.generate_private_key(65537, 1024), hashes.SHA256()),
        (rsa.generate_private_key(65537, 2048), hashes.SHA256()),
        (ed25519.Ed25519PrivateKey.generate(), None),
        (ec.generate_private_key(ec.SECP256K1()), hashes.SHA256()),
    ]
    for key, digest in weak_keys:
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, digest)
        body = {"token": made["token"], "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
        refused = running.client.post("/api/fabric/enroll", json=body)
        assert refused.status_code == 400 and "EC key" in refused.json()["error"]["message"], refused.text
    with running.platform.db.system() as s:
        assert s.get(m.EnrollmentToken, made["id"]).used_at is None
    accepted, _ = enroll(running, made["token"], key=ec.generate_private_key(ec.SECP384R1()))
    assert accepted.status_code == 200, accepted.text
