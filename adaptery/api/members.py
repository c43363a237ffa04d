"""Bringing people into a tenant and out of it: invitations with a one-time sign-in link (someone new) or
accept link (someone with an account), removal, and a fresh link for a pending invitation or a member who
lost theirs. Listing members and changing roles live in `api.admin`."""

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


def _invitation(p: Platform, invited: tenants.Invited) -> dict[str, Any]:
    """Someone new: their one-time sign-in link. Someone with an account already: a pending invitation and the
    one-time link that accepts it, for the admin to pass to the person they mean (the account of that name may
    be someone else's). Either link is shown once; only its hash is kept."""
    body: dict[str, Any] = {
        "object": "member.invitation",
        "username": invited.username,
        "user_id": invited.user_id if invited.token else None,  # an account of elsewhere: not its id
        "role": invited.role,
        "status": "invited" if invited.token else "pending",
        "login_url": None,
        "accept_url": None,
        "expires_in_hours": None,
    }
    if invited.token:
        body["login_url"] = f"{p.settings.base_url}/auth/link?token={invited.token}"
        body["expires_in_hours"] = p.settings.login_link_hours
    else:
        body["accept_url"] = p.settings.base_url + tenants.accept_path(invited.invitation.id, invited.accept_token)
        body["expires_in_hours"] = p.settings.invitation_days * 24
        body["message"] = (
            f"'{invited.username}' already has an account: send them the accept link privately. They open it "
            "signed in as themself and join once they accept; without the link they cannot."
        )
    return body


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
    """Add someone new with a role (the answer carries their one-time sign-in link), or invite someone who
    already has an account (the answer carries the one-time accept link for them; they accept with it while
    signed in as themself)."""
    _check_grant(who, None, body.role)
    with p.db.tenant(who.tenant_id) as s:
        replaced = tenants.pending_invitation(s, body.username)
        if replaced is not None:  # a new invitation replaces it: as withdrawing it would, this needs its role
            _check_grant(who, None, Role(replaced.role))
        invited = tenants.invite_member(
            s,
            who.tenant_id,
            body.username,
            body.role,
            invited_by=who.user_id,
            login_link_hours=p.settings.login_link_hours,
            invitation_days=p.settings.invitation_days,
        )
        action = "member.invite" if invited.token else "member.invite_pending"
        audit.record(s, who, action, target=body.username, detail={"role": body.role.value})
        return _invitation(p, invited)


@router.delete("/{username}", status_code=204)
def remove_member(username: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> Response:
    """Remove a member (their sessions, unused links and API keys in this tenant stop working), or withdraw a
    pending invitation."""
    with p.db.tenant(who.tenant_id) as s:
        invitation = tenants.pending_invitation(s, username)
        if invitation is not None:
            _check_grant(who, None, Role(invitation.role))
            tenants.withdraw_invitation(s, invitation)
            audit.record(s, who, "member.invitation_withdraw", target=username)
            return Response(status_code=204)
        member = tenants.get_member(s, username)
        if member.user.id == who.user_id:
            raise InvalidRequest("You cannot remove yourself; ask another owner.", param="username")
        current = Role(member.membership.role)
        _check_grant(who, current, current)
        tenants.remove_member(s, member)
        audit.record(s, who, "member.remove", target=username, detail={"role": current.value})
    return Response(status_code=204)


@router.post("/{username}/link")
def new_link(username: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """A fresh one-time link: for a pending invitation, its accept link (the previous one stops working, and
    the invitation runs for `invitation_days` again); for a member who lost their invitation before setting
    up their account, a sign-in link. Never a sign-in link for someone who has: it would sign in as them (a
    forgotten password is the operator's `adaptery users reset-link`)."""
    with p.db.tenant(who.tenant_id) as s:
        invitation = tenants.pending_invitation(s, username)
        if invitation is not None:
            _check_grant(who, None, Role(invitation.role))
            token = tenants.renew_accept_link(invitation, days=p.settings.invitation_days)
            audit.record(s, who, "member.invitation_link", target=username, detail={"role": invitation.role})
            invited = tenants.Invited(
                username, invitation.user_id, invitation.role, invitation=invitation, accept_token=token
            )
            return _invitation(p, invited)
    with p.db.system() as s:
        member, token = tenants.new_setup_link(s, who.tenant_id, username, hours=p.settings.login_link_hours)
        current = Role(member.membership.role)
        _check_grant(who, current, current)
        audit.record(s, who, "member.link", target=username)
        invited = tenants.Invited(username, member.user.id, current.value, token=token)
        return _invitation(p, invited)
