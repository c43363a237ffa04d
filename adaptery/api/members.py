"""Bringing people into a tenant and out of it: invitations with a one-time sign-in link, removal, and a
fresh link for a member who lost theirs. Listing members and changing roles live in `api.admin`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import platform, principal
from adaptery.auth.policy import may_grant_role
from adaptery.auth.principal import Principal, Role
from adaptery.platform import Platform
from adaptery.services import audit, tenants
from adaptery.services.errors import InvalidRequest, PermissionDenied

router = APIRouter(prefix="/api/admin/members", tags=["admin"])


class InviteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=64)
    role: Role = Role.MEMBER


def _invitation(p: Platform, member: tenants.Member, token: str) -> dict[str, Any]:
    """The member and their sign-in link, shown once: only the token's hash is kept."""
    return {
        "object": "member.invitation",
        "username": member.user.username,
        "user_id": member.user.id,
        "role": member.membership.role,
        "login_url": f"{p.settings.base_url}/auth/link?token={token}",
        "expires_in_hours": p.settings.login_link_hours,
    }


def _check_grant(who: Principal, current: Role | None, wanted: Role) -> None:
    if not may_grant_role(who, current, wanted):
        subject = f"a {current}" if current else f"someone a {wanted}"
        raise PermissionDenied(
            f"Your role '{who.role}' may not manage {subject}; only an owner manages owners and admins.",
            param="role",
            code="insufficient_role",
        )


@router.post("", status_code=201)
def invite_member(body: InviteRequest, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """Add a member with a role; the answer carries their one-time sign-in link."""
    _check_grant(who, None, body.role)
    with p.db.tenant(who.tenant_id) as s:
        member, token = tenants.invite_member(
            s, who.tenant_id, body.username, body.role, login_link_hours=p.settings.login_link_hours
        )
        audit.record(s, who, "member.invite", target=body.username, detail={"role": body.role.value})
        return _invitation(p, member, token)


@router.delete("/{username}", status_code=204)
def remove_member(username: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> Response:
    """Remove a member: their sessions, unused links and API keys in this tenant stop working."""
    with p.db.tenant(who.tenant_id) as s:
        member = tenants.get_member(s, username)
        if member.user.id == who.user_id:
            raise InvalidRequest("You cannot remove yourself; ask another owner.", param="username")
        current = Role(member.membership.role)
        _check_grant(who, current, current)
        tenants.remove_member(s, member)
        audit.record(s, who, "member.remove", target=username, detail={"role": current.value})
    return Response(status_code=204)


@router.post("/{username}/link")
def new_sign_in_link(username: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """A fresh one-time sign-in link for a member (a lost invitation, a forgotten password)."""
    with p.db.tenant(who.tenant_id) as s:
        member = tenants.get_member(s, username)
        current = Role(member.membership.role)
        _check_grant(who, current, current)
        token = tenants.create_login_token(
            s, tenant_id=who.tenant_id, user_id=member.user.id, hours=p.settings.login_link_hours
        )
        audit.record(s, who, "member.link", target=username)
        return _invitation(p, member, token)
