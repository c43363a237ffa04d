"""Tenants, their people, and the first start of a platform."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from urllib.parse import urlencode

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from adaptery.auth.principal import Role
from adaptery.auth.secrets import hash_token, same_token
from adaptery.db import models as m
from adaptery.db.ids import new_id, random_token
from adaptery.services import enrollment, federations, keys
from adaptery.services.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from adaptery.services.sessions import has_signed_in, uses_sso

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class NewTenant:
    tenant: m.Tenant
    owner: m.User
    api_key: str | None  # None: the owner already had an account, and is invited (below)
    login_token: str | None  # a new owner's first sign-in link
    invitation: m.Invitation | None = None  # an owner with an account becomes owner by accepting it...
    accept_token: str | None = None  # ...with this link's token, passed to them by the platform operator


def check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise InvalidRequest(
            f"{what} must be 1-63 characters of lowercase letters, digits and '-', starting with a letter or digit",
            param=what,
        )
    return name


def has_any_tenant(session: Session) -> bool:
    return session.scalar(select(func.count()).select_from(m.Tenant)) > 0


def tenant_named(system_session: Session, name: str) -> m.Tenant | None:
    return system_session.scalar(select(m.Tenant).where(m.Tenant.name == name))


def get_tenant(system_session: Session, tenant_id: str) -> m.Tenant:
    tenant = system_session.get(m.Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"No tenant with id '{tenant_id}'", param="tenant_id")
    return tenant


def all_tenants(system_session: Session) -> list[m.Tenant]:
    return list(system_session.scalars(select(m.Tenant).order_by(m.Tenant.name)))


def create_tenant(
    session: Session,
    name: str,
    owner_username: str,
    *,
    login_link_hours: float,
    invitation_days: float,
    platform_admin: bool = False,
) -> NewTenant:
    """Create a tenant with its owner; returns the owner's first API key and sign-in token once.

    An owner who already has an account gets no sign-in link (it would sign in as them), no key and no
    membership: they are invited as owner, and accept with the one-time accept link (usernames are
    platform-wide: the account of that name may not be the person meant). `platform_admin` (the platform's
    first start only) makes the owner a platform admin and their first key a platform key."""
    check_name(name, "tenant")
    check_name(owner_username, "username")
    if tenant_named(session, name) is not None:
        raise Conflict(f"A tenant named '{name}' already exists", param="tenant")
    user = session.scalar(select(m.User).where(m.User.username == owner_username))
    tenant = m.Tenant(id=new_id("tn_"), name=name)
    session.add(tenant)
    if user is not None:
        session.flush()
        invitation, accept_token = _invite(session, tenant.id, user, Role.OWNER, invited_by=None, days=invitation_days)
        return NewTenant(tenant, user, None, None, invitation=invitation, accept_token=accept_token)
    user = m.User(id=new_id("user_"), username=owner_username, is_platform_admin=platform_admin)
    session.add(user)
    session.flush()
    session.add(m.Membership(id=new_id("mem_"), tenant_id=tenant.id, user_id=user.id, role=Role.OWNER))
    key = keys.create_key(session, tenant_id=tenant.id, user_id=user.id, name="first key", platform=platform_admin)
    token = create_login_token(session, tenant_id=tenant.id, user_id=user.id, hours=login_link_hours)
    return NewTenant(tenant, user, key.secret, token)


def create_login_token(session: Session, *, tenant_id: str, user_id: str, hours: float, purpose: str = "setup") -> str:
    """A one-time link into a tenant; earlier unused links of the same person there stop working."""
    session.execute(
        delete(m.LoginToken).where(
            m.LoginToken.user_id == user_id, m.LoginToken.tenant_id == tenant_id, m.LoginToken.used_at.is_(None)
        )
    )
    token = random_token(40)
    session.add(
        m.LoginToken(
            id=new_id("login_"),
            tenant_id=tenant_id,
            user_id=user_id,
            token_hash=hash_token(token),
            expires_at=time.time() + hours * 3600,
            purpose=purpose,
        )
    )
    session.flush()
    return token


@dataclass(frozen=True)
class Member:
    user: m.User
    membership: m.Membership


def get_member(session: Session, username: str) -> Member:
    """A member of the session's tenant by username (the tenant filter narrows memberships)."""
    row = session.execute(
        select(m.Membership, m.User).join(m.User, m.User.id == m.Membership.user_id).where(m.User.username == username)
    ).one_or_none()
    if row is None:
        raise NotFound(f"'{username}' is not a member of this tenant.", param="username", code="member_not_found")
    return Member(row[1], row[0])


@dataclass(frozen=True)
class MemberRow:
    username: str
    user_id: str
    role: str
    created_at: float
    set_up: bool  # the person has signed in at least once (a new sign-in link is then refused)


def list_members(session: Session) -> list[MemberRow]:
    """The members of the session's tenant, by username."""
    rows = session.execute(
        select(m.User.username, m.User.id, m.Membership.role, m.Membership.created_at)
        .join(m.Membership, m.Membership.user_id == m.User.id)
        .order_by(m.User.username)
    ).all()
    return [
        MemberRow(username, user_id, role, created, set_up=has_signed_in(session, user_id))
        for username, user_id, role, created in rows
    ]


@dataclass(frozen=True)
class Invited:
    """A new person joined with a one-time sign-in link (`token`), or an existing person was asked
    (`invitation`), to accept with a one-time link (`accept_token`)."""

    username: str
    user_id: str
    role: str
    token: str | None = None
    invitation: m.Invitation | None = None
    accept_token: str | None = None


def invite_member(
    session: Session,
    tenant_id: str,
    username: str,
    role: Role,
    *,
    invited_by: str,
    login_link_hours: float,
    invitation_days: float,
) -> Invited:
    """Someone new to the platform joins at once, with a one-time link that can only ever sign in as them.
    Someone who already has an account is invited: nothing changes until they accept, signed in as themself,
    with the one-time accept link the inviting admin passes them; nobody gets a link that signs in as them.
    (Usernames are platform-wide: the account may be a squatter's, who must not join on the name alone.)"""
    check_name(username, "username")
    user = session.scalar(select(m.User).where(m.User.username == username))
    if user is None:
        user = m.User(id=new_id("user_"), username=username)
        session.add(user)
        session.flush()
        session.add(m.Membership(id=new_id("mem_"), tenant_id=tenant_id, user_id=user.id, role=role.value))
        token = create_login_token(session, tenant_id=tenant_id, user_id=user.id, hours=login_link_hours)
        return Invited(username, user.id, role.value, token=token)
    if session.scalar(select(m.Membership).where(m.Membership.user_id == user.id)) is not None:
        raise Conflict(f"'{username}' is already a member of this tenant.", param="username", code="already_member")
    invitation, accept_token = _invite(session, tenant_id, user, role, invited_by=invited_by, days=invitation_days)
    return Invited(username, user.id, role.value, invitation=invitation, accept_token=accept_token)


def _invite(
    session: Session, tenant_id: str, user: m.User, role: Role, *, invited_by: str | None, days: float
) -> tuple[m.Invitation, str]:
    """A pending invitation and its accept token (shown once; only its hash is kept). A new one replaces the
    person's earlier one in this tenant."""
    session.execute(delete(m.Invitation).where(m.Invitation.user_id == user.id, m.Invitation.tenant_id == tenant_id))
    invitation = m.Invitation(
        id=new_id("inv_"), tenant_id=tenant_id, user_id=user.id, role=role.value, invited_by=invited_by
    )
    token = renew_accept_link(invitation, days=days)
    session.add(invitation)
    session.flush()
    return invitation, token


def accept_path(invitation_id: str, token: str) -> str:
    """Where an accept link points, below the platform's public URL: the page that shows the invitation to
    its person, with an Accept button that sends the token (opening it changes nothing)."""
    return f"/invitations/accept?{urlencode({'invitation': invitation_id, 'token': token})}"


def renew_accept_link(invitation: m.Invitation, *, days: float) -> str:
    """A fresh one-time accept link for a pending invitation, good for `days` from now; the previous link
    stops working."""
    token = random_token(40)
    invitation.token_hash = hash_token(token)
    invitation.expires_at = time.time() + days * 86400
    return token


def renew_owner_invitation(
    system_session: Session, tenant_name: str, username: str, *, days: float
) -> tuple[m.Tenant, m.Invitation, str]:
    """The operator's fresh accept link for the owner invitation `create_tenant` gave a person who already had an
    account, when its link expired or was lost before they accepted: until they do, the tenant has nobody who could
    invite them again. Only that pending invitation is renewed (its earlier link stops working); nobody joins."""
    tenant = tenant_named(system_session, tenant_name)
    invitation = None
    if tenant is not None:
        invitation = system_session.scalar(
            select(m.Invitation)
            .join(m.User, m.User.id == m.Invitation.user_id)
            .where(
                m.Invitation.tenant_id == tenant.id,
                m.Invitation.role == Role.OWNER.value,
                m.User.username == username,
            )
        )
    if tenant is None or invitation is None:
        raise NotFound(
            f"No pending owner invitation of '{username}' in a tenant named '{tenant_name}'.", param="username"
        )
    token = renew_accept_link(invitation, days=days)
    system_session.flush()
    return tenant, invitation, token


def pending_invitation(session: Session, username: str) -> m.Invitation | None:
    """This tenant's open invitation of a person, if any."""
    return session.scalar(
        select(m.Invitation).join(m.User, m.User.id == m.Invitation.user_id).where(m.User.username == username)
    )


def withdraw_invitation(session: Session, invitation: m.Invitation) -> None:
    session.delete(invitation)
    session.flush()


def list_invitations(session: Session) -> list[tuple[m.Invitation, str]]:
    """This tenant's open invitations, with the invited person's username."""
    rows = session.execute(
        select(m.Invitation, m.User.username)
        .join(m.User, m.User.id == m.Invitation.user_id)
        .where(m.Invitation.expires_at > time.time())
        .order_by(m.User.username)
    )
    return [(invitation, username) for invitation, username in rows]


def invitations_for(system_session: Session, user_id: str) -> list[tuple[m.Invitation, m.Tenant]]:
    """A person's own open invitations, across tenants (a system session: they are not in those tenants)."""
    rows = system_session.execute(
        select(m.Invitation, m.Tenant)
        .join(m.Tenant, m.Tenant.id == m.Invitation.tenant_id)
        .where(m.Invitation.user_id == user_id, m.Invitation.expires_at > time.time())
        .order_by(m.Invitation.created_at)
    )
    return [(invitation, tenant) for invitation, tenant in rows]


def answer_invitation(
    system_session: Session, user_id: str, invitation_id: str, *, accept: bool, token: str | None = None
) -> m.Invitation:
    """The invited person accepts (a membership with the invited role) or declines; 404 for anyone else's.
    Accepting takes the invitation's one-time link (`token`), which the inviting admin passed to the person
    they meant: being signed in as an account of that username is not enough. Declining takes none."""
    invitation = system_session.get(m.Invitation, invitation_id, with_for_update=True)
    if invitation is None or invitation.user_id != user_id or invitation.expires_at <= time.time():
        raise NotFound(f"No invitation with id '{invitation_id}'", param="invitation_id")
    if accept and not (token and invitation.token_hash and same_token(token, invitation.token_hash)):
        raise PermissionDenied(
            "Accepting this invitation takes the link the workspace's admin sent you: open it while signed in "
            "as yourself. A link that does not work (an old one, or none) can be replaced by that admin.",
            param="token",
            code="invitation_link_required",
        )
    if accept:
        already = system_session.scalar(
            select(m.Membership).where(m.Membership.user_id == user_id, m.Membership.tenant_id == invitation.tenant_id)
        )
        if already is None:
            system_session.add(
                m.Membership(id=new_id("mem_"), tenant_id=invitation.tenant_id, user_id=user_id, role=invitation.role)
            )
        # a person in two tenants has no setup link left: one kept by the first tenant's admin would sign in
        # as them into the second
        system_session.execute(
            delete(m.LoginToken).where(m.LoginToken.user_id == user_id, m.LoginToken.used_at.is_(None))
        )
    system_session.delete(invitation)
    system_session.flush()
    return invitation


def new_setup_link(system_session: Session, tenant_id: str, username: str, *, hours: float) -> tuple[Member, str]:
    """A fresh first-sign-in link from a tenant admin, only for a person who never set up their account and
    belongs to this tenant alone: for anyone else it would be a way to sign in as them. (A system session:
    the person's memberships in other tenants count.)"""
    row = system_session.execute(
        select(m.Membership, m.User)
        .join(m.User, m.User.id == m.Membership.user_id)
        .where(m.User.username == username, m.Membership.tenant_id == tenant_id)
    ).one_or_none()
    if row is None:
        raise NotFound(f"'{username}' is not a member of this tenant.", param="username", code="member_not_found")
    member = Member(row[1], row[0])
    memberships = system_session.scalar(
        select(func.count()).select_from(m.Membership).where(m.Membership.user_id == member.user.id)
    )
    if uses_sso(system_session, member.user.id):
        raise Conflict(
            f"'{username}' signs in through an identity provider: a link would let someone in as them without it.",
            param="username",
            code="signs_in_with_sso",
        )
    if has_signed_in(system_session, member.user.id) or member.user.is_platform_admin or memberships > 1:
        raise Conflict(
            f"'{username}' has signed in already (or belongs to other tenants): they sign in themself, never "
            "with a link. A forgotten password is reset by the platform operator: adaptery users reset-link.",
            param="username",
            code="account_set_up",
        )
    return member, create_login_token(system_session, tenant_id=tenant_id, user_id=member.user.id, hours=hours)


def reset_link(system_session: Session, username: str, *, hours: float) -> tuple[m.Tenant, str]:
    """The platform operator's link for a person who asked for one (a forgotten password): it signs them in
    to their first tenant, where they set a new password without the old one."""
    user = system_session.scalar(select(m.User).where(m.User.username == username))
    membership = (
        system_session.scalar(
            select(m.Membership).where(m.Membership.user_id == user.id).order_by(m.Membership.created_at)
        )
        if user
        else None
    )
    if user is None or membership is None:
        raise NotFound(f"No person '{username}' in any tenant.", param="username")
    if uses_sso(system_session, user.id):
        raise Conflict(f"'{username}' signs in through an identity provider, never with a password.", param="username")
    token = create_login_token(
        system_session, tenant_id=membership.tenant_id, user_id=user.id, hours=hours, purpose="reset"
    )
    return system_session.get(m.Tenant, membership.tenant_id), token


def _other_owners(session: Session, member: Member) -> int:
    """The tenant's owners besides `member`, counted under a lock on the tenant's owner rows (PostgreSQL:
    FOR UPDATE; SQLite serialises writers), so two owners demoting or removing each other at once cannot
    both pass the check and leave the tenant without one."""
    owners = session.scalars(
        select(m.Membership.id).where(m.Membership.role == Role.OWNER.value).with_for_update()
    ).all()
    return len([owner for owner in owners if owner != member.membership.id])


def change_role(session: Session, member: Member, role: Role) -> Role:
    """Give a member another role; a tenant keeps at least one owner. Returns the role they had."""
    current = Role(member.membership.role)
    if current == Role.OWNER and role != Role.OWNER and _other_owners(session, member) == 0:
        raise Conflict("A tenant must keep at least one owner; make someone else owner first.", param="role")
    set_role(session, member.membership, role)
    session.flush()
    return current


def set_role(session: Session, membership: m.Membership, role: Role) -> None:
    """A member's role changes (by an admin, or by their identity provider's groups): their unspent enrollment
    tokens go with the right to make them, and their site invitations whatever the new role allows (one regained
    later does not bring them back)."""
    if membership.role == role.value:
        return
    membership.role = role.value
    if role.value not in enrollment.ENROLLING_ROLES:
        enrollment.withdraw_tokens_of(session, membership.user_id, membership.tenant_id)
    federations.withdraw_invitations_of(session, membership.user_id, membership.tenant_id)


def remove_member(session: Session, member: Member) -> None:
    """Take a person out of this tenant: their membership goes, and their sessions, unused sign-in links
    and API keys in this tenant stop working."""
    if member.membership.role == Role.OWNER.value and _other_owners(session, member) == 0:
        raise Conflict("The last owner cannot be removed; make someone else owner first.", param="username")
    end_membership(session, member.membership)


def end_membership(session: Session, membership: m.Membership) -> None:
    """A membership ends: the person's sessions, unused sign-in links, API keys and unspent enrollment tokens in
    that tenant stop working.
    (Named by tenant, so a system session ends exactly this tenant's; the tenant filter narrows a tenant one.)"""
    tenant_id, user_id = membership.tenant_id, membership.user_id
    now = time.time()
    for key in session.scalars(
        select(m.ApiKey).where(
            m.ApiKey.tenant_id == tenant_id, m.ApiKey.user_id == user_id, m.ApiKey.revoked_at.is_(None)
        )
    ):
        key.revoked_at = now
    session.execute(delete(m.WebSession).where(m.WebSession.tenant_id == tenant_id, m.WebSession.user_id == user_id))
    session.execute(delete(m.LoginToken).where(m.LoginToken.tenant_id == tenant_id, m.LoginToken.user_id == user_id))
    enrollment.withdraw_tokens_of(session, user_id, tenant_id)
    federations.withdraw_invitations_of(session, user_id, tenant_id)
    session.delete(membership)
