"""A tenant keeps an owner, even when two owners demote or remove each other at the same moment."""

from __future__ import annotations

import threading

import pytest

from adaptery.auth.principal import Role
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.db.session import Database
from adaptery.services import tenants
from adaptery.services.errors import Conflict


def _two_owners(db: Database) -> str:
    with db.system() as s:
        created = tenants.create_tenant(s, "lab", "first", login_link_hours=1, invitation_days=1)
        second = m.User(id=new_id("user_"), username="second")
        s.add(second)
        s.flush()
        s.add(m.Membership(id=new_id("mem_"), tenant_id=created.tenant.id, user_id=second.id, role=Role.OWNER))
        return created.tenant.id


def test_the_last_owner_can_be_neither_demoted_nor_removed(db: Database):
    tenant_id = _two_owners(db)
    with db.tenant(tenant_id) as s:
        tenants.change_role(s, tenants.get_member(s, "first"), Role.MEMBER)
    with db.tenant(tenant_id) as s, pytest.raises(Conflict):
        tenants.change_role(s, tenants.get_member(s, "second"), Role.ADMIN)
    with db.tenant(tenant_id) as s, pytest.raises(Conflict):
        tenants.remove_member(s, tenants.get_member(s, "second"))


def test_two_owners_demoting_each_other_at_once_leave_one(db: Database, database_url: str):
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite runs one writer at a time: the second transaction cannot write on a stale read")
    tenant_id = _two_owners(db)
    outcome: dict[str, object] = {}
    first_holds_its_lock = threading.Event()

    def demote_second() -> None:
        first_holds_its_lock.wait(10)
        try:
            with db.tenant(tenant_id) as s:
                tenants.change_role(s, tenants.get_member(s, "second"), Role.MEMBER)
            outcome["second"] = "demoted"
        except Conflict:
            outcome["second"] = "refused"

    other = threading.Thread(target=demote_second)
    other.start()
    with db.tenant(tenant_id) as s:
        tenants.change_role(s, tenants.get_member(s, "first"), Role.MEMBER)
        first_holds_its_lock.set()
        other.join(0.5)  # the other transaction waits on the owner rows this one locked
        assert other.is_alive()
    other.join(10)
    assert outcome == {"second": "refused"}
    with db.tenant(tenant_id) as s:
        assert [x.role for x in s.query(m.Membership)].count(Role.OWNER.value) == 1
