"""Single sign-on: identity providers, the tenants that trust them, and the people they sign in.

The model:
- A provider is platform-wide (settings or a platform admin add it); it signs people in to a tenant only once a
  platform admin binds it to that tenant. A tenant may trust several providers, a provider serve several tenants.
- A person coming from a provider is known by (provider, `sub`) alone. An email or username the provider
  asserts never links them to an existing account, here or in another tenant: that would let whoever controls
  an account at any trusted provider (or a provider's lax email policy) take over a local account. A new
  person gets a new user, named after the username claim, with a suffix if the name is taken.
- Roles come from the tenant admin's rules (group → role; the highest matching rule wins), applied at every
  sign-in, in every tenant that trusts the provider: a changed group changes the role, a lost group ends the
  membership there, with its sessions and API keys. People with no role anywhere are refused.
- Such a person has no local password or link (`sessions.uses_sso`): the provider alone vouches for them.

The flow (`start`, `finish`): `services.oidc` does the protocol; here the sign-in in flight is a row keyed by
the hash of its `state`, bound to the browser by a cookie whose hash it keeps, used once, gone in minutes.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal, Role
from adaptery.auth.secrets import hash_token, same_token
from adaptery.db import models as m
from adaptery.db.ids import new_id, random_token
from adaptery.db.session import Database
from adaptery.services import audit, sessions, tenants
from adaptery.services.errors import Conflict, InvalidRequest, NotFound, PermissionDenied, ServiceError
from adaptery.services.oidc import OidcClient, ProviderConfig, TokenRefused, check_issuer
from adaptery.settings import OidcProviderSettings, Settings
from adaptery.storage.crypto import KeyProvider, TamperedError, client_secret_context

CALLBACK_PATH = "/auth/oidc/callback"
_RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.ADMIN: 2, Role.OWNER: 3}
_CLAIM = re.compile(r"^[A-Za-z0-9_:./-]{1,64}$")
MAX_RULES = 200


def redirect_uri(settings: Settings) -> str:
    return settings.base_url + CALLBACK_PATH


# -- providers ------------------------------------------------------------------------------------------------


def _seal(keys: KeyProvider, provider_id: str, secret: str) -> tuple[str, str]:
    key_id, sealed = keys.wrap(secret.encode(), client_secret_context(provider_id))
    return key_id, base64.b64encode(sealed).decode()


def config(record: m.IdentityProvider, settings: Settings, keys: KeyProvider) -> ProviderConfig:
    """What the protocol needs of a provider: a settings one's secret comes from the settings."""
    secret: str | None = None
    if record.managed_by_settings:
        configured = next((p for p in settings.oidc_providers if p.name == record.name), None)
        if configured is None:
            raise NotFound(f"The identity provider '{record.name}' is no longer configured.", param="provider")
        secret = configured.client_secret.get_secret_value() if configured.client_secret else None
    elif record.secret_sealed:
        try:
            secret = keys.unwrap(
                record.secret_key_id or "", base64.b64decode(record.secret_sealed), client_secret_context(record.id)
            ).decode()
        except TamperedError as exc:
            raise ServiceError(f"The client secret of '{record.name}' cannot be opened: {exc}") from exc
    return ProviderConfig(
        record.id, record.name, record.issuer, record.client_id, secret, tuple(record.scopes or ["openid"])
    )


def _check_scopes(scopes: list[str]) -> list[str]:
    if "openid" not in scopes:
        raise InvalidRequest("scopes must include 'openid'", param="scopes")
    if any(not _CLAIM.match(scope) for scope in scopes):
        raise InvalidRequest("each scope is 1-64 characters of letters, digits and _:./-", param="scopes")
    return scopes


def _check_claim(name: str, param: str) -> str:
    if not _CLAIM.match(name):
        raise InvalidRequest(f"{param} must be 1-64 characters of letters, digits and _:./-", param=param)
    return name


def sync_settings_providers(session: Session, configured: list[OidcProviderSettings]) -> None:
    """The providers `ADAPTERY_OIDC_PROVIDERS` lists, kept as rows (tenants bind them, identities name them).
    One dropped from the settings stays, unusable (`config` refuses it), so re-adding it keeps its people."""
    for provider in configured:
        tenants.check_name(provider.name, "name")
        check_issuer(provider.issuer)
        row = session.scalar(select(m.IdentityProvider).where(m.IdentityProvider.name == provider.name))
        if row is None:
            row = m.IdentityProvider(id=new_id("idp_"), name=provider.name, managed_by_settings=True)
            session.add(row)
        elif not row.managed_by_settings:
            raise Conflict(
                f"ADAPTERY_OIDC_PROVIDERS names '{provider.name}', which a platform admin added through the API: "
                "rename one of them."
            )
        row.display_name = provider.display_name or provider.name
        row.issuer = provider.issuer
        row.client_id = provider.client_id
        row.scopes = _check_scopes(provider.scopes)
        row.groups_claim = _check_claim(provider.groups_claim, "groups_claim")
        row.username_claim = _check_claim(provider.username_claim, "username_claim")
    session.flush()


def list_providers(session: Session) -> list[m.IdentityProvider]:
    return list(session.scalars(select(m.IdentityProvider).order_by(m.IdentityProvider.name)))


def provider_named(session: Session, name: str) -> m.IdentityProvider:
    row = session.scalar(select(m.IdentityProvider).where(m.IdentityProvider.name == name))
    if row is None:
        raise NotFound(f"No identity provider named '{name}'.", param="provider", code="provider_not_found")
    return row


@dataclass(frozen=True)
class NewProvider:
    name: str
    issuer: str
    client_id: str
    client_secret: str | None = None
    display_name: str = ""
    scopes: list[str] = field(default_factory=lambda: ["openid", "email", "profile", "groups"])
    groups_claim: str = "groups"
    username_claim: str = "preferred_username"


def create_provider(session: Session, keys: KeyProvider, body: NewProvider) -> m.IdentityProvider:
    tenants.check_name(body.name, "name")
    check_issuer(body.issuer)
    if session.scalar(select(m.IdentityProvider.id).where(m.IdentityProvider.name == body.name)) is not None:
        raise Conflict(f"An identity provider named '{body.name}' already exists.", param="name")
    row = m.IdentityProvider(
        id=new_id("idp_"),
        name=body.name,
        display_name=body.display_name or body.name,
        issuer=body.issuer,
        client_id=body.client_id,
        scopes=_check_scopes(body.scopes),
        groups_claim=_check_claim(body.groups_claim, "groups_claim"),
        username_claim=_check_claim(body.username_claim, "username_claim"),
        managed_by_settings=False,
    )
    if body.client_secret:
        row.secret_key_id, row.secret_sealed = _seal(keys, row.id, body.client_secret)
    session.add(row)
    session.flush()
    return row


def delete_provider(session: Session, name: str) -> m.IdentityProvider:
    """Remove an API-added provider: its bindings, rules, identities and sessions go with it (cascade)."""
    row = provider_named(session, name)
    if row.managed_by_settings:
        raise Conflict(
            f"'{name}' comes from ADAPTERY_OIDC_PROVIDERS: remove it there.", param="provider", code="managed"
        )
    session.execute(delete(m.WebSession).where(m.WebSession.identity_provider_id == row.id))
    session.delete(row)
    session.flush()
    return row


def bind(session: Session, tenant_id: str, names: list[str]) -> tuple[list[str], list[str]]:
    """The providers a tenant trusts, replaced by `names`; returns (added, removed). A removed provider's rules
    in the tenant go, and its sessions there end (its people keep their membership until an admin removes them,
    but cannot sign in again). Local sign-in comes back on when no rule is left that makes an admin."""
    wanted = {name: provider_named(session, name) for name in dict.fromkeys(names)}
    current = {
        row.provider_id: row
        for row in session.scalars(
            select(m.TenantIdentityProvider).where(m.TenantIdentityProvider.tenant_id == tenant_id)
        )
    }
    wanted_ids = {provider.id for provider in wanted.values()}
    added = [name for name, provider in wanted.items() if provider.id not in current]
    removed = []
    for provider_id, row in current.items():
        if provider_id in wanted_ids:
            continue
        removed.append(session.get(m.IdentityProvider, provider_id).name)
        session.delete(row)
        session.execute(
            delete(m.SsoRoleRule).where(m.SsoRoleRule.tenant_id == tenant_id, m.SsoRoleRule.provider_id == provider_id)
        )
        session.execute(
            delete(m.WebSession).where(
                m.WebSession.tenant_id == tenant_id, m.WebSession.identity_provider_id == provider_id
            )
        )
    for name in added:
        session.add(m.TenantIdentityProvider(id=new_id("tidp_"), tenant_id=tenant_id, provider_id=wanted[name].id))
    session.flush()
    policy = session.get(m.TenantSignInPolicy, tenant_id)
    if removed and policy is not None and not _administered_through_sso(session, tenant_id):
        # nobody could administer the tenant through SSO any more: local sign-in comes back rather than nobody's
        policy.password_sign_in = policy.link_sign_in = True
        policy.updated_at = time.time()
    return added, sorted(removed)


def _administered_through_sso(session: Session, tenant_id: str) -> bool:
    return any(rule.role in (Role.ADMIN, Role.OWNER) for rule in rules_of(session, tenant_id))


def bound_providers(session: Session, tenant_id: str) -> list[m.IdentityProvider]:
    return list(
        session.scalars(
            select(m.IdentityProvider)
            .join(m.TenantIdentityProvider, m.TenantIdentityProvider.provider_id == m.IdentityProvider.id)
            .where(m.TenantIdentityProvider.tenant_id == tenant_id)
            .order_by(m.IdentityProvider.name)
        )
    )


def sign_in_choices(session: Session) -> list[m.IdentityProvider]:
    """The providers the sign-in page offers: those some tenant trusts."""
    return list(
        session.scalars(
            select(m.IdentityProvider)
            .where(m.IdentityProvider.id.in_(select(m.TenantIdentityProvider.provider_id)))
            .order_by(m.IdentityProvider.name)
        )
    )


# -- a tenant's rules and policy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    provider: str
    group: str
    role: Role

    def as_dict(self) -> dict[str, str]:
        return {"provider": self.provider, "group": self.group, "role": self.role.value}


def rules_of(session: Session, tenant_id: str) -> list[Rule]:
    rows = session.execute(
        select(m.SsoRoleRule, m.IdentityProvider.name)
        .join(m.IdentityProvider, m.IdentityProvider.id == m.SsoRoleRule.provider_id)
        .where(m.SsoRoleRule.tenant_id == tenant_id)
        .order_by(m.IdentityProvider.name, m.SsoRoleRule.group_name)
    )
    return [Rule(name, rule.group_name, Role(rule.role)) for rule, name in rows]


def set_rules(session: Session, who: Principal, rules: list[Rule]) -> tuple[list[Rule], list[Rule]]:
    """Replace the tenant's group → role rules; returns (added, removed). They apply at each person's next
    sign-in. Only an owner adds or removes a rule that makes admins or owners (as for roles given by hand)."""
    if len(rules) > MAX_RULES:
        raise InvalidRequest(f"at most {MAX_RULES} rules", param="rules")
    bound = {provider.name: provider for provider in bound_providers(session, who.tenant_id)}
    for index, rule in enumerate(rules):
        if rule.provider not in bound:
            raise InvalidRequest(
                f"rules[{index}].provider: '{rule.provider}' is not an identity provider of this tenant "
                f"(it has: {', '.join(bound) or 'none; a platform admin binds them'}).",
                param=f"rules[{index}].provider",
            )
        if not rule.group.strip() or len(rule.group) > 255:
            raise InvalidRequest(f"rules[{index}].group must be 1-255 characters", param=f"rules[{index}].group")
    keys = [(rule.provider, rule.group) for rule in rules]
    if len(set(keys)) != len(keys):
        raise InvalidRequest("each (provider, group) may have one rule", param="rules")
    before = set(rules_of(session, who.tenant_id))
    after = set(rules)
    added, removed = sorted(after - before, key=str), sorted(before - after, key=str)
    for rule in added + removed:
        if rule.role in (Role.ADMIN, Role.OWNER) and who.role != Role.OWNER:
            raise PermissionDenied(
                f"Your role '{who.role}' may not manage a rule that makes '{rule.role}'; only an owner may.",
                param="rules",
                code="insufficient_role",
            )
    session.execute(delete(m.SsoRoleRule).where(m.SsoRoleRule.tenant_id == who.tenant_id))
    for rule in rules:
        session.add(
            m.SsoRoleRule(
                id=new_id("rule_"),
                tenant_id=who.tenant_id,
                provider_id=bound[rule.provider].id,
                group_name=rule.group,
                role=rule.role.value,
            )
        )
    session.flush()
    return added, removed


def set_policy(
    session: Session, tenant_id: str, *, password_sign_in: bool, link_sign_in: bool, who: Principal | None = None
) -> int:
    """Which local ways in the tenant accepts; sessions opened a way now refused end. Returns how many ended.
    Local ways go off only once the tenant trusts a provider, so nobody locks the tenant out of the page, and only
    an owner decides it: it can end every local session, the owners' own included."""
    if who is not None and who.role != Role.OWNER and not who.is_platform_admin:
        raise PermissionDenied(
            f"Your role '{who.role}' may not change how people sign in to this tenant; only an owner may.",
            param="password_sign_in",
            code="insufficient_role",
        )
    if not (password_sign_in and link_sign_in) and not _administered_through_sso(session, tenant_id):
        raise Conflict(
            "Passwords and links stay on until people can administer this tenant through single sign-on: it needs "
            "an identity provider (a platform admin binds one) and a rule that makes someone admin or owner.",
            param="password_sign_in",
            code="no_sso_administrator",
        )
    row = session.get(m.TenantSignInPolicy, tenant_id)
    if row is None:
        row = m.TenantSignInPolicy(tenant_id=tenant_id)
        session.add(row)
    row.password_sign_in, row.link_sign_in, row.updated_at = password_sign_in, link_sign_in, time.time()
    refused = [
        method for method, on in ((sessions.PASSWORD, password_sign_in), (sessions.LINK, link_sign_in)) if not on
    ]
    ended = 0
    for record in session.scalars(select(m.WebSession).where(m.WebSession.tenant_id == tenant_id)):
        if (record.sign_in_method or sessions.PASSWORD) in refused:
            session.delete(record)
            ended += 1
    session.flush()
    return ended


# -- the sign-in -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    url: str  # where the browser goes: the provider's authorization endpoint
    browser_token: str  # the cookie that ties the answer to this browser


def start(
    session: Session, client: OidcClient, settings: Settings, keys: KeyProvider, name: str, tenant_name: str | None
) -> Started:
    """A sign-in in flight: the authorization URL (PKCE S256, state, nonce) and the browser's cookie."""
    record = provider_named(session, name)
    provider = config(record, settings, keys)
    tenant_id = None
    if tenant_name:
        tenant = tenants.tenant_named(session, tenant_name)
        tenant_id = tenant.id if tenant else None  # only a preference: an unknown name is ignored, not revealed
    now = time.time()
    session.execute(delete(m.OidcSignIn).where(m.OidcSignIn.expires_at <= now))
    state, nonce, verifier, browser = random_token(43), random_token(43), random_token(64), random_token(43)
    url = client.authorization_url(
        provider, redirect_uri=redirect_uri(settings), state=state, nonce=nonce, code_verifier=verifier
    )
    session.add(
        m.OidcSignIn(
            state_hash=hash_token(state),
            browser_hash=hash_token(browser),
            provider_id=record.id,
            tenant_id=tenant_id,
            nonce=nonce,
            code_verifier=verifier,
            expires_at=now + settings.oidc_sign_in_minutes * 60,
        )
    )
    session.flush()
    return Started(url, browser)


@dataclass
class Outcome:
    """How a sign-in ended: a new session, or the refusal; what to file in the audit log either way."""

    provider: str | None = None
    username: str | None = None
    new: sessions.NewSession | None = None
    refusal: ServiceError | None = None
    tenant_ids: list[str] = field(default_factory=list)  # whose admins see a refusal


def _refused(message: str, code: str) -> TokenRefused:
    return TokenRefused(message, code=code)


def _take_pending(db: Database, state: str | None, browser_token: str | None) -> m.OidcSignIn | ServiceError:
    """The sign-in in flight this answer belongs to, used up (in its own transaction: a replay finds nothing)."""
    if not state:
        return _refused("The answer from the identity provider has no state.", "missing_state")
    with db.system() as s:
        pending = s.get(m.OidcSignIn, hash_token(state), with_for_update=True)
        if pending is None or pending.expires_at <= time.time():
            return _refused("This sign-in is unknown, used or expired: start again.", "bad_state")
        if not browser_token or not same_token(browser_token, pending.browser_hash):
            # someone else's sign-in (a login CSRF): not consumed, the rightful browser may still finish it
            return _refused("This sign-in was started in another browser: start again here.", "browser_mismatch")
        s.delete(pending)
        s.flush()
        s.expunge(pending)
        return pending


def finish(
    db: Database,
    client: OidcClient,
    settings: Settings,
    keys: KeyProvider,
    *,
    state: str | None,
    code: str | None,
    error: str | None,
    issuer: str | None,
    browser_token: str | None,
    ip: str | None,
) -> Outcome:
    """The provider's answer: check it, provision the person, apply the rules, open a session. Every ending
    is audited here, in the transaction that makes it (a refusal too, with the memberships it ended)."""
    outcome = Outcome()
    pending = _take_pending(db, state, browser_token)
    if isinstance(pending, ServiceError):
        outcome.refusal = pending
        return _file(db, outcome, ip)
    with db.system() as s:
        record = s.get(m.IdentityProvider, pending.provider_id)
        s.expunge(record)
    outcome.provider = record.name
    outcome.tenant_ids = [pending.tenant_id] if pending.tenant_id else []
    try:
        provider = config(record, settings, keys)
        # RFC 9207: the answer names who sent it, so one provider's answer cannot pass for another's (mix-up)
        if issuer is not None and issuer != provider.issuer:
            raise _refused("The answer came from another issuer than the one this sign-in went to.", "bad_iss")
        if issuer is None and client.metadata(provider).get("authorization_response_iss_parameter_supported"):
            raise _refused("The answer does not name its issuer, which this provider always does.", "missing_iss")
        if error or not code:
            raise _refused(f"The identity provider did not sign you in ({error or 'no code'}).", "provider_error")
        tokens = client.exchange_code(
            provider, code=code, redirect_uri=redirect_uri(settings), code_verifier=pending.code_verifier
        )
        claims = client.verify_id_token(provider, tokens["id_token"], nonce=pending.nonce)
        if len(claims["sub"]) > 255:  # kept whole or not at all: a cut subject could name someone else
            raise _refused("The ID token's subject is longer than 255 characters.", "bad_sub")
        if isinstance(tokens.get("access_token"), str):
            claims = {**client.userinfo(provider, tokens["access_token"], subject=claims["sub"]), **claims}
    except ServiceError as refused:
        outcome.refusal = refused
        return _file(db, outcome, ip)
    with db.system() as s:
        user, identity = _provision(s, record, claims)
        outcome.username = user.username
        groups = _groups(claims.get(record.groups_claim))
        identity.groups, identity.last_sign_in_at = groups, time.time()
        _apply_rules(s, record, user, groups, ip)
        tenant_id = _tenant_for(s, record, user, pending.tenant_id)
        if tenant_id is None:
            outcome.refusal = PermissionDenied(
                f"Your account at {record.display_name or record.name} gives you no role in any tenant here: ask "
                "your tenant's admin to add a rule for one of your groups.",
                code="no_role",
            )
            outcome.tenant_ids = [b.tenant_id for b in _bindings(s, record.id)]
            _audit_refusal(s, outcome, ip)
            return outcome
        outcome.new = sessions.open_session(
            s, user, tenant_id, settings, method=sessions.SSO, provider_id=record.id, id_token=tokens["id_token"]
        )
        detail = {"method": "sso", "provider": record.name, "groups": groups[:50]}
        audit.record(s, outcome.new.principal, "auth.sign_in", target=user.username, ip=ip, detail=detail)
    return outcome


def _file(db: Database, outcome: Outcome, ip: str | None) -> Outcome:
    with db.system() as s:
        _audit_refusal(s, outcome, ip)
    return outcome


def _audit_refusal(session: Session, outcome: Outcome, ip: str | None) -> None:
    reason = outcome.refusal.code if outcome.refusal else None
    detail = {"method": "sso", "provider": outcome.provider, "reason": reason}
    for tenant_id in outcome.tenant_ids or [None]:
        audit.record(
            session,
            None,
            "auth.sign_in",
            target=(outcome.username or outcome.provider or "unknown")[:255],
            outcome="failure",
            detail=detail,
            tenant_id=tenant_id,
            actor=(outcome.username or "anonymous")[:64],
            ip=ip,
        )


def _groups(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(group) for group in value if isinstance(group, str | int)][:1000]
    return []


def _new_username(session: Session, claims: dict[str, Any], claim: str) -> str:
    raw = claims.get(claim) or str(claims.get("email") or "").split("@")[0] or claims["sub"]
    base = re.sub(r"[^a-z0-9-]+", "-", str(raw).lower()).strip("-")[:56] or "user"
    candidate, suffix = base, 2
    while session.scalar(select(m.User.id).where(m.User.username == candidate)) is not None:
        candidate, suffix = f"{base}-{suffix}", suffix + 1
    return candidate


def _provision(session: Session, provider: m.IdentityProvider, claims: dict[str, Any]) -> tuple[m.User, m.SsoIdentity]:
    """The person this (provider, sub) is; someone new gets a new user (never an existing one by email)."""
    subject = claims["sub"]
    identity = session.scalar(
        select(m.SsoIdentity).where(m.SsoIdentity.provider_id == provider.id, m.SsoIdentity.subject == subject)
    )
    email = claims.get("email") if isinstance(claims.get("email"), str) else None
    if identity is None:
        user = m.User(id=new_id("user_"), username=_new_username(session, claims, provider.username_claim))
        session.add(user)
        session.flush()
        identity = m.SsoIdentity(id=new_id("sso_"), provider_id=provider.id, subject=subject, user_id=user.id)
        session.add(identity)
    identity.email = email[:320] if email else None
    session.flush()
    return session.get(m.User, identity.user_id), identity


def _bindings(session: Session, provider_id: str) -> list[m.TenantIdentityProvider]:
    return list(
        session.scalars(select(m.TenantIdentityProvider).where(m.TenantIdentityProvider.provider_id == provider_id))
    )


def _apply_rules(
    session: Session, provider: m.IdentityProvider, user: m.User, groups: list[str], ip: str | None
) -> None:
    """The person's role in every tenant that trusts this provider, from that tenant's rules; each change is
    audited in its tenant."""
    for binding in _bindings(session, provider.id):
        rules = session.scalars(
            select(m.SsoRoleRule).where(
                m.SsoRoleRule.tenant_id == binding.tenant_id, m.SsoRoleRule.provider_id == provider.id
            )
        )
        roles = [Role(rule.role) for rule in rules if rule.group_name in groups]
        role = max(roles, key=_RANK.__getitem__) if roles else None
        membership = session.scalar(
            select(m.Membership).where(m.Membership.tenant_id == binding.tenant_id, m.Membership.user_id == user.id)
        )
        change: tuple[str, dict[str, Any]] | None = None
        if role is not None and membership is None:
            session.add(m.Membership(id=new_id("mem_"), tenant_id=binding.tenant_id, user_id=user.id, role=role.value))
            change = ("member.sso_add", {"role": role.value})
        elif role is not None and membership.role != role.value:
            change = ("member.sso_role", {"role": role.value, "previous_role": membership.role})
            tenants.set_role(session, membership, role)
        elif role is None and membership is not None:
            change = ("member.sso_remove", {"previous_role": membership.role})
            tenants.end_membership(session, membership)
        if change:
            action, detail = change
            audit.record(
                session,
                None,
                action,
                target=user.username,
                detail={**detail, "provider": provider.name, "groups": groups[:50]},
                tenant_id=binding.tenant_id,
                actor=f"sso:{provider.name}"[:64],
                ip=ip,
            )
    session.flush()


def _tenant_for(session: Session, provider: m.IdentityProvider, user: m.User, wanted: str | None) -> str | None:
    """Where the session opens: the tenant asked for if the person has a role there, else their first tenant
    that trusts this provider."""
    trusted = {binding.tenant_id for binding in _bindings(session, provider.id)}
    memberships = session.scalars(
        select(m.Membership).where(m.Membership.user_id == user.id).order_by(m.Membership.created_at)
    ).all()
    eligible = [membership.tenant_id for membership in memberships if membership.tenant_id in trusted]
    if wanted in eligible:
        return wanted
    return eligible[0] if eligible else None


def end_session_url(
    session: Session, client: OidcClient, settings: Settings, keys: KeyProvider, record: m.WebSession | None
) -> str:
    """Where the browser goes to end the provider's session too ("" for a local session, or a provider
    without RP-initiated logout)."""
    if record is None or record.sign_in_method != sessions.SSO or record.identity_provider_id is None:
        return ""
    provider_row = session.get(m.IdentityProvider, record.identity_provider_id)
    if provider_row is None:
        return ""
    try:
        provider = config(provider_row, settings, keys)
    except ServiceError:
        return ""
    return client.end_session_url(provider, id_token=record.id_token, post_logout_redirect_uri=settings.base_url + "/")
