"""Administration: a tenant's audit log, usage, limits and members (tenant admins), and every tenant's
limits (platform admins). Every change here is itself audited."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import platform, principal
from adaptery.auth import policy
from adaptery.auth.principal import Principal, Role
from adaptery.platform import Platform
from adaptery.services import audit, keys, limits, tenants
from adaptery.services.errors import PermissionDenied

router = APIRouter(tags=["admin"])
Limit = Annotated[int | None, Field(ge=1)]


class TenantLimitsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests_per_minute: Limit = None
    tokens_per_minute: Limit = None
    concurrent_streams: Limit = None
    monthly_tokens: Limit = None
    max_tokens: Limit = None
    max_upload_bytes: Limit = None


class RoleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role


def _limits_object(values: limits.Limits) -> dict[str, int | None]:
    return {name: getattr(values, name) for name in limits.LIMIT_FIELDS}


@router.get("/api/admin/audit")
def read_audit(
    after: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="Only events older than this seq")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    action: Annotated[str | None, Query(max_length=64)] = None,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict[str, Any]:
    """Your tenant's audit events, newest first."""
    with p.db.system() as s:
        rows = audit.list_events(s, who.tenant_id, after=after, limit=limit + 1, action=action)
        data = [audit.event_object(r) for r in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit}


@router.get("/api/admin/usage")
def read_usage(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict[str, Any]:
    """This month's usage of the tenant and of each of its keys."""
    with p.db.tenant(who.tenant_id) as s:
        key_ids = keys.all_key_ids(s)
        limits.charge_training(s, who.tenant_id, limits.clock())
        counted = limits.usage(s, [f"tenant:{who.tenant_id}", *[f"key:{k}" for k in key_ids]])
    return {
        "object": "usage",
        "period": limits.month_period(limits.clock()).removeprefix("month:"),
        "tenant": counted[f"tenant:{who.tenant_id}"],
        "keys": {k: counted[f"key:{k}"] for k in key_ids},
    }


@router.get("/api/admin/limits")
def read_limits(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict[str, Any]:
    """The limits a platform admin set on your tenant (null: none)."""
    with p.db.system() as s:
        return {
            "object": "limits",
            "tenant_id": who.tenant_id,
            **_limits_object(limits.tenant_limits(s, who.tenant_id)),
        }


def _members(rows: list[tenants.MemberRow]) -> list[dict[str, Any]]:
    return [
        {
            "username": row.username,
            "user_id": row.user_id,
            "role": row.role,
            "created_at": int(row.created_at),
            "set_up": row.set_up,
        }
        for row in rows
    ]


@router.get("/api/admin/members")
def list_members(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict[str, Any]:
    """The tenant's members, and the invitations of people who have not answered yet."""
    with p.db.tenant(who.tenant_id) as s:
        invitations = [
            {
                "username": username,
                "role": inv.role,
                "created_at": int(inv.created_at),
                "expires_at": int(inv.expires_at),
            }
            for inv, username in tenants.list_invitations(s)
        ]
        return {"object": "list", "data": _members(tenants.list_members(s)), "invitations": invitations}


@router.put("/api/admin/members/{username}")
def change_role(
    username: str, body: RoleBody, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict[str, Any]:
    """Change a member's role. Admins manage members and viewers; owners everyone; a tenant keeps an owner."""
    with p.db.tenant(who.tenant_id) as s:
        member = tenants.get_member(s, username)
        current = Role(member.membership.role)
        if not policy.may_grant_role(who, current, body.role):
            raise PermissionDenied(f"Your role '{who.role}' may not change a {current} into a {body.role}.")
        tenants.change_role(s, member, body.role)
        audit.record(s, who, "member.role", target=username, detail={"from": current.value, "to": body.role.value})
        return {"object": "list", "data": _members(tenants.list_members(s))}


@router.get("/api/platform/tenants")
def list_tenants(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict[str, Any]:
    """Every tenant with its limits and this month's usage (platform admins)."""
    with p.db.system() as s:
        every_tenant = tenants.all_tenants(s)
        counted = limits.usage(s, [f"tenant:{t.id}" for t in every_tenant])
        data = [
            {
                "id": t.id,
                "name": t.name,
                "limits": _limits_object(limits.tenant_limits(s, t.id)),
                "usage": counted[f"tenant:{t.id}"],
            }
            for t in every_tenant
        ]
    return {"object": "list", "data": data}


@router.put("/api/platform/tenants/{tenant_id}/limits")
def set_tenant_limits(
    tenant_id: str, body: TenantLimitsBody, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict[str, Any]:
    """Set a tenant's limits; fields left out keep their value, null removes a limit."""
    values = body.model_dump(exclude_unset=True)
    with p.db.system() as s:
        tenants.get_tenant(s, tenant_id)
        limits.set_tenant_limits(s, tenant_id, values)
        audit.record(s, who, "admin.limits", tenant_id=tenant_id, target=tenant_id, detail=values)
        return {"object": "limits", "tenant_id": tenant_id, **_limits_object(limits.tenant_limits(s, tenant_id))}
