"""API keys: minted once, stored as a hash, checked on every request.

A key reads `sk-<environment>-<key id>-<secret>`: the environment and id are stable and safe to show, the
secret is known only to whoever received the key. Rotation mints a new secret under the same id; the old
one keeps working for an overlap window so running clients can switch without an outage.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from adaptery.auth import policy
from adaptery.auth.principal import ALL_SCOPES, Principal, Role, Scope
from adaptery.auth.secrets import hash_token, same_token
from adaptery.db import models as m
from adaptery.db.ids import random_token
from adaptery.services.errors import InvalidRequest, NotFound, PermissionDenied, Unauthenticated

ENVIRONMENTS = ("dev", "staging", "prod")
MAX_ROTATION_OVERLAP_SECONDS = 30 * 86400
_KEY_PATTERN = re.compile(r"^sk-(dev|staging|prod)-(key[A-Za-z0-9]{12})-([A-Za-z0-9]{40})$")
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "concurrent_streams", "monthly_tokens")


@dataclass(frozen=True)
class NewKey:
    record: m.ApiKey
    secret: str


def _redacted(environment: str, key_id: str, secret: str) -> str:
    return f"sk-{environment}-{key_id}-…{secret[-4:]}"


def check_scopes(scopes: Iterable[str], *, within: frozenset[Scope] = ALL_SCOPES) -> list[str]:
    """Known scopes, and none beyond `within`: a key never mints a key with more power than itself."""
    out = []
    for scope in scopes:
        if scope not in {s.value for s in Scope}:
            raise InvalidRequest(
                f"unknown scope {scope!r}; scopes are {', '.join(s.value for s in Scope)}", param="scopes"
            )
        if scope not in within:
            raise InvalidRequest(f"a key without the scope {scope!r} cannot grant it", param="scopes")
        out.append(scope)
    if not out:
        raise InvalidRequest("a key needs at least one scope", param="scopes")
    return sorted(set(out))


def create_key(
    session: Session,
    *,
    tenant_id: str,
    user_id: str,
    name: str = "",
    environment: str = "dev",
    expires_in_days: float | None = None,
    expires_at: float | None = None,
    scopes: Iterable[str] | None = None,
    allowed_models: list[str] | None = None,
    limits: dict[str, int | None] | None = None,
    platform: bool = False,
) -> NewKey:
    if environment not in ENVIRONMENTS:
        raise InvalidRequest(f"environment must be one of {', '.join(ENVIRONMENTS)}", param="environment")
    if expires_in_days is not None and expires_in_days <= 0:
        raise InvalidRequest("expires_in_days must be positive", param="expires_in_days")
    key_id = "key" + random_token(12)
    secret = random_token(40)
    record = m.ApiKey(
        id=key_id,
        tenant_id=tenant_id,
        user_id=user_id,
        name=name,
        environment=environment,
        secret_hash=hash_token(secret),
        redacted=_redacted(environment, key_id, secret),
        expires_at=time.time() + expires_in_days * 86400 if expires_in_days else expires_at,
        scopes=check_scopes(ALL_SCOPES if scopes is None else scopes),
        allowed_models=sorted(set(allowed_models)) if allowed_models is not None else None,
        platform=platform,
        **set_limits_values(limits or {}),
    )
    session.add(record)
    session.flush()
    return NewKey(record, f"sk-{environment}-{key_id}-{secret}")


def set_limits_values(values: dict[str, int | None]) -> dict[str, int | None]:
    for field, value in values.items():
        if field not in LIMIT_FIELDS:
            raise InvalidRequest(f"unknown limit {field!r}", param=field)
        if value is not None and value < 1:
            raise InvalidRequest(f"{field} must be at least 1 (or null for no limit)", param=field)
    return values


def list_keys(session: Session, who: Principal) -> list[m.ApiKey]:
    """Admins see every key of the tenant (never a secret: only hashes are kept); members their own."""
    query = select(m.ApiKey).order_by(m.ApiKey.created_at.desc())
    if not who.has_role(Role.ADMIN):
        query = query.where(m.ApiKey.user_id == who.user_id)
    return list(session.scalars(query))


def all_key_ids(session: Session) -> list[str]:
    """Every key of the session's tenant, revoked ones too (their usage still counts this month)."""
    return list(session.scalars(select(m.ApiKey.id).order_by(m.ApiKey.created_at)))


def calling_key(session: Session, who: Principal) -> m.ApiKey | None:
    """The key the caller signed in with (None for a browser session)."""
    return session.get(m.ApiKey, who.api_key_id) if who.api_key_id else None


def owner_role(session: Session, record: m.ApiKey) -> Role | None:
    role = session.scalar(select(m.Membership.role).where(m.Membership.user_id == record.user_id))
    return Role(role) if role else None


def get_key(session: Session, who: Principal, key_id: str, *, action: str = "read") -> m.ApiKey:
    """A key the caller may act on. A key is its person's: only they rotate it; admins may also read it
    (redacted), revoke it and change its limits when its person's role is at or below theirs. Anything else
    is 404, as for a key that does not exist."""
    record = session.scalars(select(m.ApiKey).where(m.ApiKey.id == key_id)).one_or_none()
    if record is not None and not policy.may_manage_key(who, record.user_id, owner_role(session, record), action):
        record = None
    if record is None:
        raise NotFound(f"No API key with id '{key_id}'", param="key_id")
    return record


def revoke_key(session: Session, who: Principal, key_id: str) -> m.ApiKey:
    record = get_key(session, who, key_id, action="revoke")
    if record.revoked_at is None:
        record.revoked_at = time.time()
    return record


def child_settings(
    parent: m.ApiKey | None,
    *,
    expires_in_days: float | None,
    allowed_models: list[str] | None,
    limits: dict[str, int | None],
    platform: bool,
) -> tuple[float | None, list[str] | None, dict[str, int | None]]:
    """What a key minted by another key may have: never wider than its parent in models, limits, expiry or
    platform power (scopes: `check_scopes`). Left out, each is the parent's; asked wider, a 400 that names it.
    Returns (expires_at, allowed_models, limits). A browser session (no parent) mints what it asks for."""
    now = time.time()
    expires_at = now + expires_in_days * 86400 if expires_in_days else None
    if parent is None:
        return expires_at, allowed_models, limits
    if platform and not parent.platform:
        raise InvalidRequest("a key without platform power cannot grant it", param="platform")
    if parent.expires_at is not None:
        if expires_at is None:
            expires_at = parent.expires_at
        elif expires_at > parent.expires_at:
            raise InvalidRequest("a key cannot outlive the key that creates it", param="expires_in_days")
    if parent.allowed_models is not None:
        if allowed_models is None:
            allowed_models = list(parent.allowed_models)
        for i, model_id in enumerate(allowed_models):
            if model_id not in parent.allowed_models:
                raise InvalidRequest(
                    f"the model '{model_id}' is not among the creating key's allowed models",
                    param=f"allowed_models[{i}]",
                )
    limits = dict(limits)
    for field in LIMIT_FIELDS:
        ceiling = getattr(parent, field)
        if ceiling is None:
            continue
        value = limits.get(field)
        if value is None:
            limits[field] = ceiling
        elif value > ceiling:
            raise InvalidRequest(f"{field} cannot exceed the creating key's own ({ceiling})", param=f"limits.{field}")
    return expires_at, allowed_models, limits


def covers(caller: m.ApiKey, target: m.ApiKey) -> bool:
    """Whether `caller` is at least as wide as `target` in every way a key can be narrow: scopes, models,
    limits, expiry and platform power. Only then may a key hand out a new secret of `target`."""
    if caller.id == target.id:
        return True
    if caller.scopes is not None and (target.scopes is None or not set(target.scopes) <= set(caller.scopes)):
        return False
    if caller.allowed_models is not None and (
        target.allowed_models is None or not set(target.allowed_models) <= set(caller.allowed_models)
    ):
        return False
    for field in LIMIT_FIELDS:
        ceiling, value = getattr(caller, field), getattr(target, field)
        if ceiling is not None and (value is None or value > ceiling):
            return False
    if caller.expires_at is not None and (target.expires_at is None or target.expires_at > caller.expires_at):
        return False
    return caller.platform or not target.platform


def limits_change(
    record: m.ApiKey, wanted: dict[str, int | None], *, calling_key: m.ApiKey | None, may_raise: bool
) -> dict[str, int | None]:
    """New limits for a key (a field left out is unchanged; null: no limit). Never above the calling key's own
    limits; raised or removed only by whoever may govern the key (a tenant admin at or above its person's
    role), so its person cannot undo a limit an admin set. Anything else is a 400 naming the field."""
    set_limits_values(wanted)
    for field, value in wanted.items():
        ceiling = getattr(calling_key, field) if calling_key is not None else None
        if ceiling is not None and (value is None or value > ceiling):
            raise InvalidRequest(f"{field} cannot exceed the calling key's own ({ceiling})", param=f"limits.{field}")
        current = getattr(record, field)
        if not may_raise and current is not None and (value is None or value > current):
            raise InvalidRequest(
                f"{field} can only be lowered here ({current} now); ask a tenant admin to raise it",
                param=f"limits.{field}",
            )
    return wanted


def rotate_key(session: Session, who: Principal, key_id: str, *, overlap_seconds: float) -> NewKey:
    """A new secret under the same id; the current one stays valid for `overlap_seconds` (0: revoked now)."""
    if not 0 <= overlap_seconds <= MAX_ROTATION_OVERLAP_SECONDS:
        raise InvalidRequest(
            f"overlap_seconds must be between 0 and {MAX_ROTATION_OVERLAP_SECONDS}", param="overlap_seconds"
        )
    record = get_key(session, who, key_id, action="rotate")
    if session.scalar(select(m.Evaluation.id).where(m.Evaluation.api_key_id == record.id)) is not None:
        raise PermissionDenied(
            "This key is the platform's, minted for an evaluation: nobody rotates it (revoking it ends the run).",
            param="key_id",
            code="evaluation_key",
        )
    calling = session.get(m.ApiKey, who.api_key_id) if who.api_key_id else None
    if calling is not None and not covers(calling, record):
        raise PermissionDenied(
            "A key may rotate itself, or keys no wider than itself (scopes, models, limits, expiry); rotate this "
            "one signed in to the web page, or with a key at least as wide.",
            param="key_id",
            code="key_too_narrow",
        )
    if record.revoked_at is not None:
        raise InvalidRequest("a revoked key cannot be rotated; create a new key", param="key_id")
    now = time.time()
    secret = random_token(40)
    record.previous_secret_hash = record.secret_hash if overlap_seconds > 0 else None
    record.previous_secret_expires_at = now + overlap_seconds if overlap_seconds > 0 else None
    record.secret_hash = hash_token(secret)
    record.redacted = _redacted(record.environment, record.id, secret)
    record.rotated_at = now
    session.flush()
    return NewKey(record, f"sk-{record.environment}-{record.id}-{secret}")


@functools.cache
def _key_query() -> Any:
    """The key as an object (its last use is written), the rest as the columns used; built once (every API call
    runs it), the key's id a parameter."""
    return (
        select(m.ApiKey, m.User.username, m.User.is_platform_admin, m.Tenant.name, m.Membership.role)
        .join(m.User, m.User.id == m.ApiKey.user_id)
        .join(m.Tenant, m.Tenant.id == m.ApiKey.tenant_id)
        .join(m.Membership, (m.Membership.user_id == m.User.id) & (m.Membership.tenant_id == m.Tenant.id))
        .where(m.ApiKey.id == bindparam("key_id"))
    )


def authenticate(system_session: Session, token: str) -> Principal:
    """Resolve a bearer token to its principal; every failure reads the same to the caller."""
    invalid = Unauthenticated("Incorrect API key provided.", code="invalid_api_key")
    match = _KEY_PATTERN.match(token)
    if not match:
        raise invalid
    environment, key_id, secret = match.groups()
    row = system_session.execute(_key_query(), {"key_id": key_id}).one_or_none()
    if row is None:
        raise invalid
    key, username, user_is_platform_admin, tenant_name, role = row
    now = time.time()
    current = same_token(secret, key.secret_hash)
    previous = (
        key.previous_secret_hash is not None
        and (key.previous_secret_expires_at or 0) > now
        and same_token(secret, key.previous_secret_hash)
    )
    if not (current or previous) or key.revoked_at is not None or environment != key.environment:
        raise invalid
    if key.expires_at is not None and key.expires_at <= now:
        raise Unauthenticated("This API key has expired.", code="expired_api_key")
    if key.last_used_at is None or now - key.last_used_at > 60:  # keep writes off the hot path
        key.last_used_at = now
    return Principal(
        tenant_id=key.tenant_id,
        tenant_name=tenant_name,
        user_id=key.user_id,
        username=username,
        role=Role(role),
        api_key_id=key.id,
        scopes=ALL_SCOPES if key.scopes is None else frozenset(Scope(s) for s in key.scopes),
        allowed_models=None if key.allowed_models is None else frozenset(key.allowed_models),
        is_platform_admin=bool(key.platform and user_is_platform_admin),
        superseded_secret=not current,
    )
