"""Tenants, their people, and the first start of a platform."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from adaptery.auth.principal import Role
from adaptery.auth.secrets import hash_token
from adaptery.db import models as m
from adaptery.db.ids import new_id, random_token
from adaptery.services import keys
from adaptery.services.errors import Conflict, InvalidRequest, NotFound

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class NewTenant:
    tenant: m.Tenant
    owner: m.User
    api_key: str
    login_token: str


def check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise InvalidRequest(
            f"{what} must be 1-63 characters of lowercase letters, digits and '-', starting with a letter or digit",
            param=what,
        )
    return name


def has_any_tenant(session: Session) -> bool:
    return session.scalar(select(func.count()).select_from(m.Tenant)) > 0


def create_tenant(session: Session, name: str, owner_username: str, *, login_link_hours: float) -> NewTenant:
    """Create a tenant with its owner; returns the owner's first API key and sign-in token once."""
    check_name(name, "tenant")
    check_name(owner_username, "username")
    if session.scalar(select(m.Tenant).where(m.Tenant.name == name)):
        raise Conflict(f"A tenant named '{name}' already exists", param="tenant")
    user = session.scalar(select(m.User).where(m.User.username == owner_username))
    if user is None:
        user = m.User(id=new_id("user_"), username=owner_username)
        session.add(user)
    tenant = m.Tenant(id=new_id("tn_"), name=name)
    session.add(tenant)
    session.flush()
    session.add(m.Membership(id=new_id("mem_"), tenant_id=tenant.id, user_id=user.id, role=Role.OWNER))
    key = keys.create_key(session, tenant_id=tenant.id, user_id=user.id, name="first key")
    token = create_login_token(session, tenant_id=tenant.id, user_id=user.id, hours=login_link_hours)
    return NewTenant(tenant, user, key.secret, token)


def create_login_token(session: Session, *, tenant_id: str, user_id: str, hours: float) -> str:
    token = random_token(40)
    session.add(
        m.LoginToken(
            id=new_id("login_"),
            tenant_id=tenant_id,
            user_id=user_id,
            token_hash=hash_token(token),
            expires_at=time.time() + hours * 3600,
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


def invite_member(
    session: Session, tenant_id: str, username: str, role: Role, *, login_link_hours: float
) -> tuple[Member, str]:
    """Add a person (new, or already on the platform) to this tenant; returns them and a one-time
    sign-in link token into this tenant."""
    check_name(username, "username")
    user = session.scalar(select(m.User).where(m.User.username == username))
    if user is None:
        user = m.User(id=new_id("user_"), username=username)
        session.add(user)
        session.flush()
    elif session.scalar(select(m.Membership).where(m.Membership.user_id == user.id)) is not None:
        raise Conflict(f"'{username}' is already a member of this tenant.", param="username", code="already_member")
    membership = m.Membership(id=new_id("mem_"), tenant_id=tenant_id, user_id=user.id, role=role.value)
    session.add(membership)
    token = create_login_token(session, tenant_id=tenant_id, user_id=user.id, hours=login_link_hours)
    return Member(user, membership), token


def remove_member(session: Session, member: Member) -> None:
    """Take a person out of this tenant: their membership goes, and their sessions, unused sign-in links
    and API keys in this tenant stop working."""
    if member.membership.role == Role.OWNER.value:
        owners = session.scalar(
            select(func.count()).select_from(m.Membership).where(m.Membership.role == Role.OWNER.value)
        )
        if owners <= 1:
            raise Conflict("The last owner cannot be removed; make someone else owner first.", param="username")
    now = time.time()
    for key in session.scalars(
        select(m.ApiKey).where(m.ApiKey.user_id == member.user.id, m.ApiKey.revoked_at.is_(None))
    ):
        key.revoked_at = now
    session.execute(delete(m.WebSession).where(m.WebSession.user_id == member.user.id))
    session.execute(delete(m.LoginToken).where(m.LoginToken.user_id == member.user.id))
    session.delete(member.membership)
