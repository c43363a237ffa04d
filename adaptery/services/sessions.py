"""Browser sign-in: passwords with lockout, one-time links, server-side sessions with a CSRF token."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal, Role
from adaptery.auth.secrets import MIN_PASSWORD_LENGTH, hash_password, hash_token, verify_password
from adaptery.db import models as m
from adaptery.db.ids import new_id, random_token
from adaptery.services.errors import InvalidRequest, RateLimited, ServiceError, Unauthenticated
from adaptery.settings import Settings


@dataclass(frozen=True)
class NewSession:
    token: str
    csrf_token: str
    principal: Principal


def _principal(session: Session, user: m.User, tenant_id: str, session_id: str | None = None) -> Principal:
    tenant, membership = session.execute(
        select(m.Tenant, m.Membership)
        .join(m.Membership, m.Membership.tenant_id == m.Tenant.id)
        .where(m.Tenant.id == tenant_id, m.Membership.user_id == user.id)
    ).one()
    return Principal(
        tenant_id=tenant.id,
        tenant_name=tenant.name,
        user_id=user.id,
        username=user.username,
        role=Role(membership.role),
        session_id=session_id,
    )


def _open(session: Session, user: m.User, tenant_id: str, settings: Settings) -> NewSession:
    token, csrf = random_token(40), random_token(32)
    record = m.WebSession(
        id=new_id("sess_"),
        tenant_id=tenant_id,
        user_id=user.id,
        token_hash=hash_token(token),
        csrf_token=csrf,
        expires_at=time.time() + settings.session_hours * 3600,
    )
    session.add(record)
    session.flush()
    return NewSession(token, csrf, _principal(session, user, tenant_id, record.id))


def login(session: Session, username: str, password: str, settings: Settings) -> NewSession | ServiceError:
    """Check a password. Repeated failures lock the account for a while, whoever is trying.

    A refusal is returned, not raised, so the caller commits the failure count with it.
    """
    user = session.scalar(select(m.User).where(m.User.username == username))
    now = time.time()
    if user is not None and user.locked_until and user.locked_until > now:
        return RateLimited("Too many failed sign-ins; try again later.", retry_after=user.locked_until - now)
    if user is None or not verify_password(user.password_hash, password):
        if user is not None:
            user.failed_logins += 1
            if user.failed_logins >= settings.login_max_failures:
                user.locked_until = now + settings.login_lockout_seconds
                user.failed_logins = 0
        return Unauthenticated("Wrong username or password.", code="invalid_credentials")
    user.failed_logins = 0
    user.locked_until = None
    membership = session.scalar(
        select(m.Membership).where(m.Membership.user_id == user.id).order_by(m.Membership.created_at)
    )
    if membership is None:
        return Unauthenticated("This account belongs to no tenant.", code="no_tenant")
    return _open(session, user, membership.tenant_id, settings)


def consume_login_link(session: Session, token: str, settings: Settings) -> NewSession:
    record = session.scalar(select(m.LoginToken).where(m.LoginToken.token_hash == hash_token(token)))
    if record is None or record.used_at is not None or record.expires_at <= time.time():
        raise Unauthenticated("This sign-in link is invalid, used or expired.", code="invalid_login_link")
    record.used_at = time.time()
    user = session.get(m.User, record.user_id)
    return _open(session, user, record.tenant_id, settings)


def resolve(session: Session, token: str) -> tuple[Principal, str]:
    """The principal and CSRF token of a live session cookie."""
    record = session.scalar(select(m.WebSession).where(m.WebSession.token_hash == hash_token(token)))
    if record is None or record.expires_at <= time.time():
        raise Unauthenticated("You are not signed in.", code="not_signed_in")
    user = session.get(m.User, record.user_id)
    return _principal(session, user, record.tenant_id, record.id), record.csrf_token


def logout(session: Session, session_id: str) -> None:
    record = session.get(m.WebSession, session_id)
    if record is not None:
        session.delete(record)


def set_password(session: Session, user_id: str, password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidRequest(f"password must be at least {MIN_PASSWORD_LENGTH} characters", param="password")
    user = session.get(m.User, user_id)
    user.password_hash = hash_password(password)


def has_password(session: Session, user_id: str) -> bool:
    return session.get(m.User, user_id).password_hash is not None
