"""Tenant isolation, in one place.

A session is opened either for one tenant (`info["tenant_id"]`) or as the platform itself
(`info["system"]`). Every ORM SELECT, UPDATE and DELETE that touches a `TenantOwned` table in a
tenant session is narrowed to that tenant here, and every row flushed from it must belong to it.
A session that is neither fails closed instead of reading across tenants.
"""

from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session, with_loader_criteria

from adaptery.db.models import TenantOwned


class TenancyViolation(RuntimeError):
    pass


def _touches_tenant_rows(state: ORMExecuteState) -> bool:
    return any(issubclass(mapper.class_, TenantOwned) for mapper in state.all_mappers)


@event.listens_for(Session, "do_orm_execute")
def _filter_by_tenant(state: ORMExecuteState) -> None:
    if not (state.is_select or state.is_update or state.is_delete):
        return
    tenant_id = state.session.info.get("tenant_id")
    if tenant_id is None:
        if not state.session.info.get("system") and _touches_tenant_rows(state):
            raise TenancyViolation("query on tenant data from a session without a tenant")
        return
    state.statement = state.statement.options(
        with_loader_criteria(TenantOwned, lambda cls: cls.tenant_id == tenant_id, include_aliases=True)
    )


@event.listens_for(Session, "before_flush")
def _stamp_and_check_tenant(session: Session, _context: object, _instances: object) -> None:
    tenant_id = session.info.get("tenant_id")
    if tenant_id is None:
        return
    for obj in list(session.new) + list(session.dirty) + list(session.deleted):
        if not isinstance(obj, TenantOwned):
            continue
        if obj.tenant_id is None and obj in session.new:
            obj.tenant_id = tenant_id
        elif obj.tenant_id != tenant_id:
            raise TenancyViolation(f"{type(obj).__name__} of another tenant in this session")
