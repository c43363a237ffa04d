"""API keys: minted once, stored as a hash, checked on every request.

A key reads `sk-<environment>-<key id>-<secret>`: the id is stable and safe to show, the secret is
known only to whoever received the key.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal, Role
from adaptery.auth.secrets import hash_token, same_token
from adaptery.db import models as m
from adaptery.db.ids import random_token
from adaptery.services.errors import InvalidRequest, NotFound, Unauthenticated

ENVIRONMENTS = ("dev", "staging", "prod")
_KEY_PATTERN = re.compile(r"^sk-(dev|staging|prod)-(key[A-Za-z0-9]{12})-([A-Za-z0-9]{40})$")


@dataclass(frozen=True)
class NewKey:
    record: m.ApiKey
    secret: str


def create_key(
    session: Session,
    *,
    tenant_id: str,
    user_id: str,
    name: str = "",
    environment: str = "dev",
    expires_in_days: float | None = None,
) -> NewKey:
    if environment not in ENVIRONMENTS:
        raise InvalidRequest(f"environment must be one of {', '.join(ENVIRONMENTS)}", param="environment")
    if expires_in_days is not None and expires_in_days <= 0:
        raise InvalidRequest("expires_in_days must be positive", param="expires_in_days")
    key_id = "key" + random_token(12)
    secret = random_token(40)
    token = f"sk-{environment}-{key_id}-{secret}"
    record = m.ApiKey(
        id=key_id,
        tenant_id=tenant_id,
        user_id=user_id,
        name=name,
        environment=environment,
        secret_hash=hash_token(secret),
        redacted=f"sk-{environment}-{key_id}-…{secret[-4:]}",
        expires_at=time.time() + expires_in_days * 86400 if expires_in_days else None,
    )
    session.add(record)
    session.flush()
    return NewKey(record, token)


def list_keys(session: Session) -> list[m.ApiKey]:
    return list(session.scalars(select(m.ApiKey).order_by(m.ApiKey.created_at.desc())))


def revoke_key(session: Session, key_id: str) -> m.ApiKey:
    record = session.scalars(select(m.ApiKey).where(m.ApiKey.id == key_id)).one_or_none()
    if record is None:
        raise NotFound(f"No API key with id '{key_id}'", param="key_id")
    if record.revoked_at is None:
        record.revoked_at = time.time()
    return record


def authenticate(system_session: Session, token: str) -> Principal:
    """Resolve a bearer token to its principal; every failure reads the same to the caller."""
    invalid = Unauthenticated("Incorrect API key provided.", code="invalid_api_key")
    match = _KEY_PATTERN.match(token)
    if not match:
        raise invalid
    _, key_id, secret = match.groups()
    row = system_session.execute(
        select(m.ApiKey, m.User, m.Tenant, m.Membership)
        .join(m.User, m.User.id == m.ApiKey.user_id)
        .join(m.Tenant, m.Tenant.id == m.ApiKey.tenant_id)
        .join(m.Membership, (m.Membership.user_id == m.User.id) & (m.Membership.tenant_id == m.Tenant.id))
        .where(m.ApiKey.id == key_id)
    ).one_or_none()
    if row is None:
        raise invalid
    key, user, tenant, membership = row
    now = time.time()
    if not same_token(secret, key.secret_hash) or key.revoked_at is not None:
        raise invalid
    if key.expires_at is not None and key.expires_at <= now:
        raise Unauthenticated("This API key has expired.", code="expired_api_key")
    if key.last_used_at is None or now - key.last_used_at > 60:  # keep writes off the hot path
        key.last_used_at = now
    return Principal(
        tenant_id=tenant.id,
        tenant_name=tenant.name,
        user_id=user.id,
        username=user.username,
        role=Role(membership.role),
        api_key_id=key.id,
    )
