"""Browser sign-in: who a person is, how they prove it, and the sessions that follow.

The identity model:
- A person is one `User` across the platform, with one password that only they set: changing it needs the
  current one, or a session opened moments ago by a one-time link they asked for. A change ends every other
  session of theirs, in every tenant, and voids their unused links.
- A one-time link signs in only as the person it was made for, and only while it may: a `setup` link (the
  invitation of someone new to the platform) is void once that person has a password; a `reset` link is
  made by the platform operator at the person's request (`adaptery users reset-link`). A tenant admin never
  gets a link that signs in as someone who already set up their account (see `services.tenants`).
- A session belongs to one tenant; switching to another tenant of the same person opens a new session there.
- Platform administration is never inherited by a tenant session: a platform admin steps up with their
  password (`elevate`), for `platform_session_minutes`, and only that session carries it.
- A session remembers how it was opened (password, link, or sso through which provider), and a tenant decides
  which of these it accepts (`sign_in_policy`; single sign-on is `services.sso`): a tenant that turned passwords
  off is entered neither by a password sign-in nor by switching into it from a password session.

Failed sign-ins are throttled per (account, source), per source and per account, each with its own
threshold and a lock that doubles with every further failure: a guesser spread over many sources still meets
the per-account lock. A browser the person signed in from with their password carries a device cookie; for
it the per-account and per-source locks give way to one of its own (OWASP's device cookies), so a guesser
elsewhere cannot lock the person out of their own browser, only out of browsers they never used. Unknown
usernames cost the same password hash as known ones, and every refusal reads the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal, Role
from adaptery.auth.secrets import MIN_PASSWORD_LENGTH, hash_password, hash_token, verify_password
from adaptery.db import models as m
from adaptery.db.ids import new_id, random_token
from adaptery.services.errors import (
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServiceError,
    Unauthenticated,
)
from adaptery.settings import Settings

# A session opened by a one-time link may set a password without the current one for this long: the link
# proved the person moments ago, a session left open for hours proves less.
FRESH_LINK_SECONDS = 3600.0
MAX_PASSWORD_LENGTH = 1024
# Verified in place of a missing user's hash, so an unknown username costs the same as a wrong password.
_DUMMY_HASH = hash_password("a password nobody has: only its verification time matters")


@dataclass(frozen=True)
class NewSession:
    token: str
    csrf_token: str
    principal: Principal
    device_token: str | None = None  # a new device cookie for this browser, to set with the session's


@dataclass(frozen=True)
class TenantRef:
    id: str
    name: str
    role: str


def _invalid_credentials() -> Unauthenticated:
    return Unauthenticated("Wrong username or password.", code="invalid_credentials")


def _principal(session: Session, user: m.User, record: m.WebSession) -> Principal:
    tenant, membership = session.execute(
        select(m.Tenant, m.Membership)
        .join(m.Membership, m.Membership.tenant_id == m.Tenant.id)
        .where(m.Tenant.id == record.tenant_id, m.Membership.user_id == user.id)
    ).one()
    platform = bool(user.is_platform_admin and record.platform_until and record.platform_until > time.time())
    return Principal(
        tenant_id=tenant.id,
        tenant_name=tenant.name,
        user_id=user.id,
        username=user.username,
        role=Role(membership.role),
        session_id=record.id,
        is_platform_admin=platform,
    )


PASSWORD, LINK, SSO = "password", "link", "sso"


def open_session(
    session: Session,
    user: m.User,
    tenant_id: str,
    settings: Settings,
    *,
    method: str,
    provider_id: str | None = None,
    id_token: str | None = None,
    fresh_link: bool = False,
) -> NewSession:
    """A new session (a new token and CSRF token: nothing a browser held before is reused). `fresh_link`: opened
    by a one-time link just now, so it may set a password without the current one for a while."""
    token, csrf = random_token(40), random_token(32)
    record = m.WebSession(
        id=new_id("sess_"),
        tenant_id=tenant_id,
        user_id=user.id,
        token_hash=hash_token(token),
        csrf_token=csrf,
        expires_at=time.time() + settings.session_hours * 3600,
        via_link=fresh_link,
        sign_in_method=method,
        identity_provider_id=provider_id,
        id_token=id_token,
    )
    session.add(record)
    # Signed in now: no setup link issued earlier (in any tenant) may sign in as them any more.
    session.execute(
        delete(m.LoginToken).where(
            m.LoginToken.user_id == user.id, m.LoginToken.used_at.is_(None), m.LoginToken.purpose == "setup"
        )
    )
    session.flush()
    return NewSession(token, csrf, _principal(session, user, record))


def has_signed_in(session: Session, user_id: str) -> bool:
    """The person has signed in at least once, by any means (a used link, a session, a password, SSO): from
    then on a setup link for them would be a way to sign in as them."""
    used_link = select(m.LoginToken.id).where(m.LoginToken.user_id == user_id, m.LoginToken.used_at.is_not(None))
    any_session = select(m.WebSession.id).where(m.WebSession.user_id == user_id)
    user = session.get(m.User, user_id)
    return (
        user.password_hash is not None
        or uses_sso(session, user_id)
        or session.scalar(select(used_link.exists())) is True
        or session.scalar(select(any_session.exists())) is True
    )


@dataclass(frozen=True)
class SignInPolicy:
    password_sign_in: bool = True
    link_sign_in: bool = True


def sign_in_policy(session: Session, tenant_id: str) -> SignInPolicy:
    row = session.get(m.TenantSignInPolicy, tenant_id)
    return SignInPolicy(row.password_sign_in, row.link_sign_in) if row else SignInPolicy()


def tenant_accepts(session: Session, tenant_id: str, method: str | None, provider_id: str | None) -> bool:
    """Whether a tenant lets in a person who proved themself this way (None: a session from before SSO, opened
    with a password or a link)."""
    if method == SSO:
        return provider_id is not None and (
            session.scalar(
                select(m.TenantIdentityProvider.id).where(
                    m.TenantIdentityProvider.tenant_id == tenant_id, m.TenantIdentityProvider.provider_id == provider_id
                )
            )
            is not None
        )
    policy = sign_in_policy(session, tenant_id)
    return policy.link_sign_in if method == LINK else policy.password_sign_in


def uses_sso(session: Session, user_id: str) -> bool:
    """A person provisioned by an identity provider: they prove themself there, never with a local password
    or link (one would let them, or whoever holds it, in after the provider stopped vouching for them)."""
    return session.scalar(select(m.SsoIdentity.id).where(m.SsoIdentity.user_id == user_id).limit(1)) is not None


# -- throttling -------------------------------------------------------------------------------------------


def _throttle_rules(
    username: str, ip: str | None, settings: Settings, *, device: str | None = None
) -> list[tuple[str, int]]:
    """(key, threshold) pairs; the first is the one a success forgives. A known device has its own rule
    instead of the per-source and per-account ones."""
    if device is not None:
        return [(f"account+device:{username}|{device}", settings.login_max_failures)]
    source = ip or "unknown"
    return [
        (f"account+source:{username}|{source}", settings.login_max_failures),
        (f"source:{source}", settings.login_max_failures_per_source),
        (f"account:{username}", settings.login_max_failures_per_account),
    ]


def known_device(session: Session, username: str, token: str | None) -> str | None:
    """The hash of a live device cookie that this username signed in with, else None."""
    if not token:
        return None
    digest = hash_token(token)
    record = session.get(m.SignInDevice, digest)
    if record is None or record.username != username or record.expires_at <= time.time():
        return None
    return digest


def _new_device(session: Session, username: str, settings: Settings) -> str:
    token = random_token(40)
    expires = time.time() + settings.sign_in_device_days * 86400
    session.add(m.SignInDevice(token_hash=hash_token(token), username=username, expires_at=expires))
    return token


def _throttle_row(session: Session, key: str, now: float) -> m.SignInThrottle:
    row = session.get(m.SignInThrottle, key, with_for_update=True)
    if row is None:
        try:
            with session.begin_nested():
                row = m.SignInThrottle(key=key, failures=0, updated_at=now)
                session.add(row)
        except IntegrityError:  # another request made it first
            row = session.get(m.SignInThrottle, key, with_for_update=True, populate_existing=True)
    return row


def _locked_for(session: Session, rules: list[tuple[str, int]], now: float) -> float:
    rows = session.scalars(select(m.SignInThrottle).where(m.SignInThrottle.key.in_([k for k, _ in rules])))
    return max((row.locked_until - now for row in rows if row.locked_until and row.locked_until > now), default=0.0)


def _record_failure(session: Session, rules: list[tuple[str, int]], settings: Settings, now: float) -> None:
    for key, threshold in rules:
        row = _throttle_row(session, key, now)
        if now - row.updated_at > settings.login_failure_window_seconds:
            row.failures = 0
        row.failures += 1
        row.updated_at = now
        if row.failures >= threshold:
            lock = settings.login_lockout_seconds * 2 ** min(row.failures - threshold, 20)
            row.locked_until = now + min(lock, settings.login_max_lockout_seconds)


def _record_success(session: Session, rules: list[tuple[str, int]]) -> None:
    """Only the (account, source) pair is forgiven: signing in to one's own account from a source must not
    wipe that source's failures on others."""
    session.execute(delete(m.SignInThrottle).where(m.SignInThrottle.key == rules[0][0]))


def check_password(
    session: Session, username: str, password: str, settings: Settings, *, ip: str | None, device: str | None = None
) -> m.User | RateLimited | Unauthenticated:
    """The user whose password this is, or the refusal (returned, so the caller commits the failure count).
    `device`: the hash of a known device cookie of this username (`known_device`)."""
    now = time.time()
    rules = _throttle_rules(username, ip, settings, device=device)
    if (wait := _locked_for(session, rules, now)) > 0:
        return RateLimited("Too many failed sign-ins; try again later.", retry_after=wait)
    user = session.scalar(select(m.User).where(m.User.username == username))
    known = user is not None and user.password_hash is not None
    matches = verify_password(user.password_hash if known else _DUMMY_HASH, password)
    if not (known and matches):
        _record_failure(session, rules, settings, now)
        return _invalid_credentials()
    _record_success(session, rules)
    return user


def login(
    session: Session,
    username: str,
    password: str,
    settings: Settings,
    *,
    ip: str | None = None,
    device_cookie: str | None = None,
) -> NewSession | RateLimited | Unauthenticated:
    """Check a password and open a session in the person's first tenant (`switch_tenant` moves it)."""
    device = known_device(session, username, device_cookie)
    user = check_password(session, username, password, settings, ip=ip, device=device)
    if not isinstance(user, m.User):
        return user
    memberships = session.scalars(
        select(m.Membership).where(m.Membership.user_id == user.id).order_by(m.Membership.created_at)
    ).all()
    if not memberships:  # removed from every tenant: reads as any other refusal
        return _invalid_credentials()
    tenant_id = next(
        (ms.tenant_id for ms in memberships if tenant_accepts(session, ms.tenant_id, PASSWORD, None)), None
    )
    if tenant_id is None:  # the password was right (so this says nothing to a guesser): the tenant wants SSO
        return PermissionDenied(
            "Your organisation turned password sign-in off: sign in with its identity provider.",
            code="password_sign_in_disabled",
        )
    opened = open_session(session, user, tenant_id, settings, method=PASSWORD)
    if device is None:
        opened = replace(opened, device_token=_new_device(session, user.username, settings))
    return opened


@dataclass(frozen=True)
class LinkHolder:
    """Whom a one-time sign-in link signs in, and where: what its page shows before anyone presses the button."""

    username: str
    tenant_name: str
    purpose: str


def _usable_link(session: Session, token: str, *, lock: bool) -> tuple[m.LoginToken, m.User]:
    query = select(m.LoginToken).where(m.LoginToken.token_hash == hash_token(token[:128]))
    record = session.scalar(query.with_for_update() if lock else query)
    invalid = Unauthenticated("This sign-in link is invalid, used or expired.", code="invalid_login_link")
    if record is None or record.used_at is not None or record.expires_at <= time.time():
        raise invalid
    user = session.get(m.User, record.user_id)
    member = session.scalar(
        select(m.Membership).where(m.Membership.user_id == user.id, m.Membership.tenant_id == record.tenant_id)
    )
    if member is None or uses_sso(session, user.id) or not tenant_accepts(session, record.tenant_id, LINK, None):
        raise invalid
    if record.purpose != "reset":  # a setup link holds only while its person has set nothing up anywhere
        memberships = session.scalar(
            select(func.count()).select_from(m.Membership).where(m.Membership.user_id == user.id)
        )
        if memberships > 1 or has_signed_in(session, user.id):
            raise invalid
    return record, user


def login_link_holder(session: Session, token: str) -> LinkHolder:
    """Whom a usable link signs in, without spending it: opening a link (or a mail scanner or chat preview
    fetching it) changes nothing; only pressing its page's button does (`consume_login_link`)."""
    record, user = _usable_link(session, token, lock=False)
    return LinkHolder(user.username, session.get(m.Tenant, record.tenant_id).name, record.purpose)


def consume_login_link(session: Session, token: str, settings: Settings) -> NewSession:
    record, user = _usable_link(session, token, lock=True)
    record.used_at = time.time()
    return open_session(session, user, record.tenant_id, settings, method=LINK, fresh_link=True)


def _live_record(session: Session, token: str) -> m.WebSession:
    record = session.scalar(select(m.WebSession).where(m.WebSession.token_hash == hash_token(token)))
    if record is None or record.expires_at <= time.time():
        raise Unauthenticated("You are not signed in.", code="not_signed_in")
    return record


def resolve(session: Session, token: str) -> tuple[Principal, str]:
    """The principal and CSRF token of a live session cookie."""
    record = _live_record(session, token)
    user = session.get(m.User, record.user_id)
    return _principal(session, user, record), record.csrf_token


def _own_record(session: Session, who: Principal) -> m.WebSession:
    record = session.get(m.WebSession, who.session_id) if who.session_id else None
    if record is None:
        raise PermissionDenied(
            "Only a person signed in to the web page may do this, not an API key.", code="session_required"
        )
    return record


def _session_device(record: m.WebSession) -> str:
    """A signed-in session re-proving its password (step-up, password change) is throttled on its own: a
    guesser elsewhere, who locked the account for new browsers, cannot lock the person out of these too."""
    return f"session:{record.id}"


def logout(session: Session, session_id: str) -> m.WebSession | None:
    """End a session; returns it (how it was signed in decides whether the provider's session ends too)."""
    record = session.get(m.WebSession, session_id)
    if record is not None:
        session.delete(record)
    return record


def end_by_token_hash(session: Session, token_hash: str) -> None:
    session.execute(delete(m.WebSession).where(m.WebSession.token_hash == token_hash))


def sign_in_method(session: Session, who: Principal) -> str | None:
    record = session.get(m.WebSession, who.session_id) if who.session_id else None
    return (record.sign_in_method or PASSWORD) if record else None


def change_password(
    session: Session, who: Principal, current: str | None, new: str, settings: Settings
) -> ServiceError | None:
    """The person's own password. Without the current one only in a session a one-time link opened within the
    last hour; every other session of theirs ends, in every tenant, and their unused links are void.

    A wrong current password is returned, not raised, so the caller commits its count against guessing."""
    record = _own_record(session, who)
    user = session.get(m.User, who.user_id)
    if len(new) < MIN_PASSWORD_LENGTH:
        raise InvalidRequest(f"password must be at least {MIN_PASSWORD_LENGTH} characters", param="password")
    if len(new) > MAX_PASSWORD_LENGTH:
        raise InvalidRequest(f"password must be at most {MAX_PASSWORD_LENGTH} characters", param="password")
    fresh_link = record.via_link and time.time() - record.created_at <= FRESH_LINK_SECONDS
    if not fresh_link:
        if user.password_hash is None:
            raise PermissionDenied(
                "Set your first password from the sign-in link's session; ask for a new link if it expired.",
                code="fresh_link_required",
            )
        if not current:
            raise InvalidRequest("current_password is required to change your password", param="current_password")
        outcome = check_password(session, user.username, current, settings, ip=who.ip, device=_session_device(record))
        if isinstance(outcome, RateLimited):
            return outcome
        if not isinstance(outcome, m.User):
            return InvalidRequest("current_password is wrong", param="current_password", code="wrong_password")
    user.password_hash = hash_password(new)
    user.password_changed_at = time.time()
    record.via_link = False  # the link's grace is spent
    session.execute(delete(m.WebSession).where(m.WebSession.user_id == user.id, m.WebSession.id != record.id))
    session.execute(delete(m.LoginToken).where(m.LoginToken.user_id == user.id, m.LoginToken.used_at.is_(None)))
    return None


def elevate(session: Session, who: Principal, password: str, settings: Settings) -> Principal | ServiceError:
    """Step up into platform administration for a while: a platform admin, with their password again.
    A refusal is returned, not raised, so the caller commits its count against guessing."""
    record = _own_record(session, who)
    user = session.get(m.User, who.user_id)
    if not user.is_platform_admin:
        raise PermissionDenied("This needs a platform administrator.", code="platform_admin_required")
    outcome = check_password(session, user.username, password, settings, ip=who.ip, device=_session_device(record))
    if isinstance(outcome, RateLimited):
        return outcome
    if not isinstance(outcome, m.User):
        return InvalidRequest("password is wrong", param="password", code="wrong_password")
    record.platform_until = time.time() + settings.platform_session_minutes * 60
    return _principal(session, user, record)


def leave_platform(session: Session, who: Principal) -> None:
    _own_record(session, who).platform_until = None


def switch_tenant(session: Session, who: Principal, tenant_id: str, settings: Settings) -> NewSession:
    """A session in another tenant of the same person (this one ends); 404 for a tenant they are not in."""
    record = _own_record(session, who)
    user = session.get(m.User, who.user_id)
    member = session.scalar(
        select(m.Membership).where(m.Membership.user_id == user.id, m.Membership.tenant_id == tenant_id)
    )
    if member is None:
        raise NotFound(f"You are not a member of a tenant '{tenant_id}'.", param="tenant_id")
    if not tenant_accepts(session, tenant_id, record.sign_in_method, record.identity_provider_id):
        raise PermissionDenied(
            "That tenant does not accept the way you signed in (its passwords are off, or it does not trust your "
            "identity provider): sign out and sign in there the way it asks.",
            param="tenant_id",
            code="sign_in_method_refused",
        )
    session.delete(record)
    method = record.sign_in_method or PASSWORD
    return open_session(
        session,
        user,
        tenant_id,
        settings,
        method=method,
        provider_id=record.identity_provider_id,
        id_token=record.id_token,
    )


def tenants_of(session: Session, user_id: str) -> list[TenantRef]:
    rows = session.execute(
        select(m.Tenant, m.Membership)
        .join(m.Membership, m.Membership.tenant_id == m.Tenant.id)
        .where(m.Membership.user_id == user_id)
        .order_by(m.Membership.created_at)
    )
    return [TenantRef(tenant.id, tenant.name, membership.role) for tenant, membership in rows]


def platform_until(session: Session, who: Principal) -> float | None:
    """When the caller's platform-admin step-up ends (None: not stepped up, or not a browser session)."""
    record = session.get(m.WebSession, who.session_id) if who.session_id else None
    return record.platform_until if who.is_platform_admin and record is not None else None


def has_password(session: Session, user_id: str) -> bool:
    return session.get(m.User, user_id).password_hash is not None


def may_step_up(session: Session, user_id: str) -> bool:
    return bool(session.get(m.User, user_id).is_platform_admin)
