"""Administration: a tenant's audit log, usage, limits and members (tenant admins), and every tenant's
limits (platform admins). Every change here is itself audited.

Usage comes from the accounting ledger (`services.usage`): `/api/admin/usage` sums a period for the admin page,
`/v1/organization/usage/{kind}` and `/v1/organization/costs` give it in the shape of OpenAI's organization usage
and costs endpoints (daily buckets, `group_by`), `/api/admin/usage/export` as CSV.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import Positive, platform, principal
from adaptery.auth import policy
from adaptery.auth.principal import Principal, Role
from adaptery.platform import Platform
from adaptery.services import audit, keys, limits, tenants, usage
from adaptery.services.errors import InvalidRequest, PermissionDenied

router = APIRouter(tags=["admin"])
Limit = Positive | None


class TenantLimitsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests_per_minute: Limit = None
    tokens_per_minute: Limit = None
    concurrent_streams: Limit = None
    monthly_tokens: Limit = None
    max_tokens: Limit = None
    max_upload_bytes: Limit = None
    monthly_cost: Annotated[float | None, Field(gt=0, description="In the platform's currency, at its prices")] = None


class RoleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role


def _limits_object(values: limits.Limits) -> dict[str, int | None]:
    return {name: getattr(values, name) for name in limits.LIMIT_FIELDS}


# Unix seconds up to the last second of the year 9999 (what a calendar day can name)
Seconds = Annotated[int, Query(ge=0, le=253_402_300_799)]


def _audit_filters(
    actor: Annotated[str | None, Query(max_length=64, description="Only events of this actor (username)")] = None,
    action: Annotated[str | None, Query(max_length=64, description="This action, or a prefix ending in '.'")] = None,
    outcome: Annotated[Literal["success", "failure"] | None, Query()] = None,
    since: Annotated[float | None, Query(ge=0, description="Only events at or after this Unix time")] = None,
    until: Annotated[float | None, Query(ge=0, description="Only events before this Unix time")] = None,
) -> audit.Filters:
    return audit.Filters(actor=actor, action=action, outcome=outcome, since=since, until=until)


@router.get("/api/admin/audit")
def read_audit(
    after: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="Only events older than this seq")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    filters: audit.Filters = Depends(_audit_filters),
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict[str, Any]:
    """Your tenant's audit events, newest first; page on with `after` = the page's `last_id` while `has_more`."""
    with p.db.system() as s:
        rows = audit.list_events(s, who.tenant_id, after=after, limit=limit + 1, filters=filters)
        data = [audit.event_object(r) for r in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["seq"] if data else None,
        "last_id": data[-1]["seq"] if data else None,
        "has_more": len(rows) > limit,
    }


@router.get("/api/admin/audit/export", response_class=StreamingResponse)
def export_audit(
    filters: audit.Filters = Depends(_audit_filters),
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> StreamingResponse:
    """The whole of your tenant's audit log (with the filters) as CSV, oldest first."""
    return StreamingResponse(
        audit.csv_lines(p.db, who.tenant_id, filters),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="audit.csv"'},
    )


def _month_start(now: float) -> int:
    return usage.day_start(limits.month_period(now).removeprefix("month:") + "-01")


@router.get("/api/admin/usage")
def read_usage(
    start_time: Seconds | None = None,
    end_time: Seconds | None = None,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict[str, Any]:
    """The limits' live counters of this month (tenant and each key), and the ledger's figures of the period
    (default: this month) by day, model, user, key and agent, with their cost."""
    now = limits.clock()
    start = start_time if start_time is not None else _month_start(now)
    end = end_time if end_time is not None else int(now) + 1
    with p.db.tenant(who.tenant_id) as s:
        key_ids = keys.all_key_ids(s)
        limits.charge_training(s, who.tenant_id, now)
        counted = limits.usage(s, [f"tenant:{who.tenant_id}", *[f"key:{k}" for k in key_ids]])
    with p.db.system() as s:
        price_list = usage.prices(s, p.settings.usage_prices, p.settings.usage_currency)
        ledger = usage.summary(s, who.tenant_id, price_list, start, end)
    return {
        "object": "usage",
        "period": limits.month_period(now).removeprefix("month:"),
        "start_time": start,
        "end_time": end,
        "tenant": counted[f"tenant:{who.tenant_id}"],
        "keys": {k: counted[f"key:{k}"] for k in key_ids},
        "ledger": ledger,
    }


@router.get("/api/admin/usage/export", response_class=StreamingResponse)
def export_usage(
    start_time: Seconds | None = None,
    end_time: Seconds | None = None,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> StreamingResponse:
    """The ledger's rows of the period (default: this month) as CSV: one per day, user, key, model, agent, kind."""
    now = limits.clock()
    start = start_time if start_time is not None else _month_start(now)
    end = end_time if end_time is not None else int(now) + 1
    with p.db.system() as s:
        price_list = usage.prices(s, p.settings.usage_prices, p.settings.usage_currency)
        lines = list(usage.csv_rows(s, who.tenant_id, price_list, start, end))
    return StreamingResponse(
        iter(lines),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
    )


GroupBy = Annotated[list[str] | None, Query(description="Group each bucket's results by these fields")]
Buckets = Annotated[int, Query(ge=1, le=usage.MAX_BUCKETS, description="Buckets (days) per page")]


def _one_day(bucket_width: str) -> None:
    if bucket_width != "1d":
        raise InvalidRequest(f"bucket_width {bucket_width!r} is not supported; use '1d'.", param="bucket_width")


@router.get("/v1/organization/usage/{kind}")
def organization_usage(
    kind: Literal["completions", "embeddings", "fine_tuning", "compute", "evaluations"],
    start_time: Seconds,
    end_time: Seconds | None = None,
    bucket_width: str = "1d",
    group_by: GroupBy = None,
    models: Annotated[list[str] | None, Query()] = None,
    user_ids: Annotated[list[str] | None, Query()] = None,
    api_key_ids: Annotated[list[str] | None, Query()] = None,
    limit: Buckets = 7,
    page: Annotated[str | None, Query(max_length=32)] = None,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict[str, Any]:
    """Your tenant's usage in daily buckets, shaped like OpenAI's organization usage (one tenant is one
    project); `fine_tuning`, `compute` and `evaluations` (what evaluations generated, apart from chat) are Adaptery's
    own kinds."""
    _one_day(bucket_width)
    filters = {"model": models or [], "user_id": user_ids or [], "api_key_id": api_key_ids or []}
    with p.db.system() as s:
        return usage.usage_page(
            s, who.tenant_id, kind, start_time=start_time, end_time=end_time, group_by=group_by or [],
            limit=limit, page=page, now=limits.clock(), filters=filters,
        )  # fmt: skip


@router.get("/v1/organization/costs")
def organization_costs(
    start_time: Seconds,
    end_time: Seconds | None = None,
    bucket_width: str = "1d",
    group_by: GroupBy = None,
    limit: Buckets = 7,
    page: Annotated[str | None, Query(max_length=32)] = None,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict[str, Any]:
    """What your tenant's usage cost per day at the platform's prices, shaped like OpenAI's organization costs."""
    _one_day(bucket_width)
    with p.db.system() as s:
        price_list = usage.prices(s, p.settings.usage_prices, p.settings.usage_currency)
        return usage.costs_page(
            s, who.tenant_id, price_list, start_time=start_time, end_time=end_time, group_by=group_by or [],
            limit=limit, page=page, now=limits.clock(),
        )  # fmt: skip


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
