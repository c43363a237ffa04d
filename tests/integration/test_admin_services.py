"""The queries the admin routes, the web page's catalog and the CLI's admin commands ask of services (routers
run no SQL): each sees its own tenant only, and an unknown name or id is an error, not a crash."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from adaptery.auth.principal import Role
from adaptery.db import models as m
from adaptery.services import catalog, keys, tenants
from adaptery.services.errors import NotFound


@pytest.fixture
def two_labs(db):
    with db.system() as s:
        lab = tenants.create_tenant(s, "lab", "alice", login_link_hours=1, invitation_days=1)
        other = tenants.create_tenant(s, "other", "mallory", login_link_hours=1, invitation_days=1)
        return lab.tenant.id, other.tenant.id


def test_a_tenant_is_found_by_name_and_by_id_and_a_stranger_is_not(db, two_labs):
    lab_id, other_id = two_labs
    with db.system() as s:
        assert tenants.tenant_named(s, "lab").id == lab_id
        assert tenants.tenant_named(s, "nobody") is None
        assert tenants.get_tenant(s, other_id).name == "other"
        with pytest.raises(NotFound) as missing:
            tenants.get_tenant(s, "tn_missing")
        assert missing.value.param == "tenant_id"
        assert [t.name for t in tenants.all_tenants(s)] == ["lab", "other"]


def test_members_list_shows_the_tenants_people_and_who_has_set_up(db, two_labs):
    lab_id, _ = two_labs
    with db.tenant(lab_id) as s:
        tenants.invite_member(s, lab_id, "bea", Role.MEMBER, invited_by="user_x", login_link_hours=1, invitation_days=1)
    with db.system() as s:  # the owner has set a password, the new member not yet
        s.scalar(select(m.User).where(m.User.username == "alice")).password_hash = "set"
    with db.tenant(lab_id) as s:
        members = tenants.list_members(s)
    assert [(r.username, r.role, r.set_up) for r in members] == [("alice", "owner", True), ("bea", "member", False)]


def test_usage_counts_every_key_of_the_tenant_revoked_ones_too_and_no_other(db, two_labs):
    lab_id, other_id = two_labs
    with db.tenant(lab_id) as s:
        lab_keys = list(s.scalars(select(m.ApiKey.id).order_by(m.ApiKey.created_at)))
        s.get(m.ApiKey, lab_keys[0]).revoked_at = 1.0
    with db.tenant(lab_id) as s:
        assert keys.all_key_ids(s) == lab_keys
    with db.tenant(other_id) as s:
        assert not set(keys.all_key_ids(s)) & set(lab_keys)


def test_engine_keys_name_only_the_tenants_own_adapters(db, two_labs):
    lab_id, other_id = two_labs
    with db.system() as s:
        s.add(m.BaseModel(id="base", ref="/nowhere"))
    for tenant_id, name, sha in ((lab_id, "ft:base:lab::1", "a" * 64), (other_id, "ft:base:other::2", "b" * 64)):
        with db.tenant(tenant_id) as s:
            s.add(m.Adapter(id=name, tenant_id=tenant_id, base_model="base", rank=4, manifest={}, sha256=sha))
    with db.tenant(lab_id) as s:
        assert catalog.adapter_keys(s) == [catalog.AdapterKey("ft:base:lab::1", "a" * 64, "base")]
    with db.system() as s:
        assert [row.model_id for row in catalog.adapter_keys(s)] == ["ft:base:lab::1", "ft:base:other::2"]


def test_a_tenant_sees_whether_a_shared_agent_is_busy_but_not_how_much_the_others_use_it(db, two_labs):
    import time

    from adaptery.auth.principal import Principal
    from adaptery.services import agents

    lab_id, other_id = two_labs
    with db.system() as s:
        shared = agents.create_agent(s, "shared-gpu")
        own = agents.create_agent(s, "lab-box", tenant_scope=lab_id)
    busy = {"roles": ["infer"], "bases": {"demo": {}}, "running": 3, "waiting": 2, "served": 900,
            "tokens_per_second": 41.5, "adapter_hits": 80, "adapter_misses": 7,
            "adapters": {"active": ["sha-a", "sha-b"], "memory": ["sha-c"], "disk": [], "loading": []},
            "announced_at": time.time()}  # fmt: skip
    live = {shared.agent_id: busy, own.agent_id: busy}

    def view(tenant_id: str, *, admin: bool = False) -> dict[str, dict]:
        who = Principal(tenant_id, "t", "u", "u", Role.ADMIN, is_platform_admin=admin)
        with db.system() as s:
            rows = agents.agents_view(s, who, live, now=time.time(), offline_after=30)
        return {row["name"]: row for row in rows}

    seen = view(other_id)
    assert set(seen) == {"shared-gpu"}  # the lab's own machine is not theirs to see
    row = seen["shared-gpu"]
    assert row["state"] == "busy" and row["bases"] == ["demo"]
    for counter in ("running", "queue_depth", "served", "tokens_per_second", "adapter_hits", "adapter_misses",
                    "adapters"):  # fmt: skip
        assert row[counter] is None, counter
    mine = view(lab_id)["lab-box"]
    assert mine["served"] == 900 and mine["adapters"]["active"] == ["sha-a", "sha-b"]
    assert view(other_id, admin=True)["shared-gpu"]["served"] == 900
