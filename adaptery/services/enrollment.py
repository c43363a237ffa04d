"""Joining the fabric by certificate: one-time enrollment tokens, the certificates they buy, renewal, revocation.

An admin makes a token for a scope (the platform: platform admins only; their own tenant: its owners and admins),
an island name and a kind: an agent's token (with roles: train, infer) or an island leaf node's (no roles: a leaf
runs nothing itself, it carries its island's agents, each with the roles of its own token). Only its sha256 is
kept; it works once, before it expires, and only for its kind (a refusal for the wrong kind spends nothing: the
token stays as secret as it was). The machine that presents it with a certificate signing request becomes that
agent or leaf with a short-lived certificate whose subject names tenant, island and agent id. It renews with its
current certificate and a request signed by that certificate's key. Revoking an agent revokes its certificates:
its NATS user (or its island's binding) leaves the broker's configuration at the next sync, which closes its
connection, and renewal is refused from then on. Every step is audited.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from dataclasses import dataclass

from cryptography import x509
from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from adaptery.auth.agent_ca import CertificateAuthority, CertificateRefused, pem, serial_hex
from adaptery.auth.principal import Principal, Role
from adaptery.db import models as m
from adaptery.db.ids import new_id, random_token
from adaptery.messaging import identity
from adaptery.messaging.accounts import PLATFORM_ORGANIZATION, Member
from adaptery.services import audit
from adaptery.services.errors import InvalidRequest, NotFound, PermissionDenied, Unauthenticated

ROLES = ("train", "infer")
KINDS = ("agent", "leaf")
_ISLAND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
_REFUSED_TOKEN = "This enrollment token is not valid: it is unknown, already used or expired. Ask for a new one."
_WRONG_KIND = {
    "agent": "This token enrolls an agent (`adaptery agent enroll`), not an island's leaf node: ask for a leaf token "
    "(`adaptery agents token create --kind leaf`).",
    "leaf": "This token enrolls an island's leaf node (`adaptery island up`), not an agent: ask for an agent token "
    "(`adaptery agents token create`).",
}


_CREATOR_GONE = (
    "This enrollment token was withdrawn: the person who made it may no longer enroll machines for its scope. "
    "Ask an admin for a new one."
)
ENROLLING_ROLES = (Role.OWNER.value, Role.ADMIN.value)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_roles(roles: list[str]) -> list[str]:
    unknown = sorted(set(roles) - set(ROLES))
    if not roles or unknown:
        got = ", ".join(roles) or "none"
        raise InvalidRequest(f"roles are one or more of {', '.join(ROLES)} (got {got})", param="roles")
    return sorted(set(roles))


def token_roles(kind: str, roles: list[str] | None) -> list[str]:
    """An agent's token: the roles given (default train). A leaf's: none, and roles given are refused rather than
    kept with no meaning (its island's agents act with the roles of their own tokens)."""
    if kind not in KINDS:
        raise InvalidRequest("kind is 'agent' or 'leaf'", param="kind")
    if kind == "agent":
        return check_roles(["train"] if roles is None else roles)
    if roles:
        raise InvalidRequest(
            "a leaf token takes no roles: an island's leaf runs nothing itself, its agents enroll with tokens of "
            "their own, which carry their roles",
            param="roles",
        )
    return []


def may_enroll_for(who: Principal, tenant_id: str | None) -> bool:
    """The platform's machines: platform admins. A tenant's: its owners and admins."""
    if tenant_id is None:
        return who.is_platform_admin
    return who.is_platform_admin or (who.tenant_id == tenant_id and who.role in (Role.OWNER, Role.ADMIN))


@dataclass(frozen=True)
class NewToken:
    record: m.EnrollmentToken
    token: str  # shown once


def create_token(
    system: Session,
    who: Principal,
    *,
    scope: str,
    island: str,
    kind: str = "agent",
    roles: list[str] | None = None,
    ttl_seconds: float,
    max_seconds: float,
    trust_pem: bytes,
) -> NewToken:
    if scope not in ("platform", "tenant"):
        raise InvalidRequest("scope is 'platform' or 'tenant'", param="scope")
    if not _ISLAND.match(island or ""):
        raise InvalidRequest("an island name is 1-48 letters, digits, '.', '_' or '-'", param="island")
    if not 0 < ttl_seconds <= max_seconds:
        raise InvalidRequest(f"ttl is more than 0 and at most {max_seconds:.0f} seconds", param="ttl_seconds")
    roles = token_roles(kind, roles)
    tenant_id = None if scope == "platform" else who.tenant_id
    if not may_enroll_for(who, tenant_id):
        needed = "a platform admin" if tenant_id is None else "the tenant's owner or an admin"
        raise PermissionDenied(f"Enrolling machines for the {scope} needs {needed}.", code="insufficient_role")
    secret = random_token(43)
    record = m.EnrollmentToken(
        id=new_id("enroll-", 16),
        token_hash=_hash(secret),
        tenant_scope=tenant_id,
        island=island,
        kind=kind,
        roles=roles,
        created_by=who.user_id,
        expires_at=time.time() + ttl_seconds,
    )
    system.add(record)
    system.flush()
    audit.record(
        system,
        who,
        "agent.token.create",
        target=record.id,
        detail={"scope": scope, "island": island, "kind": kind, "roles": roles, "expires_at": record.expires_at},
        tenant_id=tenant_id or who.tenant_id,
    )
    return NewToken(record, identity.make_token(secret, trust_pem))


def creator_may_enroll(system: Session, record: m.EnrollmentToken) -> bool:
    """A token is worth no more than its maker's right to make it, now: a platform token's maker is still a
    platform admin, a tenant token's still an owner or admin of that tenant (or a platform admin). Tokens are
    also withdrawn when their maker leaves or is demoted (`withdraw_tokens_of`); this holds whatever the path."""
    user = system.get(m.User, record.created_by) if record.created_by else None
    if user is None:
        return False
    if user.is_platform_admin:
        return True
    if record.tenant_scope is None:
        return False
    role = system.scalar(
        select(m.Membership.role).where(m.Membership.tenant_id == record.tenant_scope, m.Membership.user_id == user.id)
    )
    return role in ENROLLING_ROLES


def withdraw_tokens_of(session: Session, user_id: str, tenant_id: str) -> int:
    """The unspent tokens a person made for a tenant, gone (they left it, or no longer may enroll for it)."""
    return session.execute(
        delete(m.EnrollmentToken).where(
            m.EnrollmentToken.created_by == user_id,
            m.EnrollmentToken.tenant_scope == tenant_id,
            m.EnrollmentToken.used_at.is_(None),
        )
    ).rowcount


def _visible_tokens(who: Principal):  # noqa: ANN202 - a select
    """The unspent, unexpired tokens the caller may see and withdraw: their tenant's, and the platform's for a
    platform admin."""
    query = select(m.EnrollmentToken).where(
        m.EnrollmentToken.used_at.is_(None), m.EnrollmentToken.expires_at > time.time()
    )
    if who.is_platform_admin:
        return query.where(
            or_(m.EnrollmentToken.tenant_scope.is_(None), m.EnrollmentToken.tenant_scope == who.tenant_id)
        )
    if not may_enroll_for(who, who.tenant_id):
        raise PermissionDenied("Enrollment tokens are for the tenant's owner or an admin.", code="insufficient_role")
    return query.where(m.EnrollmentToken.tenant_scope == who.tenant_id)


@dataclass(frozen=True)
class PendingToken:
    record: m.EnrollmentToken
    created_by: str | None  # the maker's username


def list_tokens(system: Session, who: Principal) -> list[PendingToken]:
    records = system.scalars(_visible_tokens(who).order_by(m.EnrollmentToken.created_at)).all()
    makers = {record.created_by for record in records if record.created_by}
    names = dict(system.execute(select(m.User.id, m.User.username).where(m.User.id.in_(makers))).all())
    return [PendingToken(record, names.get(record.created_by)) for record in records]


def withdraw_token(system: Session, who: Principal, token_id: str) -> None:
    """Withdraw an unspent token; one the caller may not see (another tenant's, spent, expired) is a 404."""
    record = system.scalar(_visible_tokens(who).where(m.EnrollmentToken.id == token_id))
    if record is None:
        raise NotFound(f"no unspent enrollment token '{token_id}'", param="token_id")
    system.delete(record)
    audit.record(
        system,
        who,
        "agent.token.withdraw",
        target=token_id,
        detail={"island": record.island, "kind": record.kind},
        tenant_id=record.tenant_scope or who.tenant_id,
    )


def _server_name(kind: str, tenant_id: str | None, island: str | None) -> str | None:
    """A leaf's certificate also serves its island's agents, under its island's name; an agent's serves nothing."""
    if kind != "leaf" or island is None:
        return None
    return identity.leaf_server_name(tenant_id or PLATFORM_ORGANIZATION, island)


def subject_of(tenant_id: str | None, island: str, agent_id: str) -> x509.Name:
    return identity.subject_name(tenant_id or PLATFORM_ORGANIZATION, island, agent_id)


@dataclass(frozen=True)
class Issued:
    agent: m.Agent
    certificate: bytes  # PEM


def _record_certificate(system: Session, agent_id: str, cert: x509.Certificate) -> None:
    system.add(
        m.AgentCertificate(
            serial=serial_hex(cert),
            agent_id=agent_id,
            subject=identity.subject_string(cert.subject),
            expires_at=cert.not_valid_after_utc.timestamp(),
        )
    )


def enroll(
    system: Session,
    token: str,
    csr_pem: bytes,
    *,
    kind: str,
    ca: CertificateAuthority,
    trust_pem: bytes,
    lifetime: dt.timedelta,
    ip: str | None = None,
) -> Issued:
    """`kind`: what the machine means to be; a token made for the other kind is refused before it is spent.
    `trust_pem`: the CA bundle the platform serves; a token pinned to another (the CA changed) is refused."""
    if kind not in KINDS:
        raise InvalidRequest("kind is 'agent' or 'leaf'", param="kind")
    try:
        secret, pin = identity.parse_token(token)
    except ValueError as exc:
        raise Unauthenticated(_REFUSED_TOKEN) from exc
    now = time.time()
    record = system.scalar(select(m.EnrollmentToken).where(m.EnrollmentToken.token_hash == _hash(secret)))
    if record is None or record.used_at is not None or record.expires_at <= now or pin != identity.ca_pin(trust_pem):
        raise Unauthenticated(_REFUSED_TOKEN)
    if kind != record.kind:
        raise PermissionDenied(_WRONG_KIND[record.kind], param="kind", code="wrong_token_kind")
    if not creator_may_enroll(system, record):
        raise Unauthenticated(_CREATOR_GONE)
    # One use, even against a racing request: only the UPDATE that finds it unused wins.
    won = system.execute(
        update(m.EnrollmentToken)
        .where(m.EnrollmentToken.id == record.id, m.EnrollmentToken.used_at.is_(None))
        .values(used_at=now)
    ).rowcount
    if won != 1:
        raise Unauthenticated(_REFUSED_TOKEN)
    agent_id = new_id("agent-", 16)
    prefix = "island" if kind == "leaf" else record.island
    agent = m.Agent(
        id=agent_id,
        name=f"{prefix}-{agent_id.removeprefix('agent-')}"[:64],
        secret_hash="",  # no password: its certificate is its credential
        tenant_scope=record.tenant_scope,
        island=record.island,
        roles=list(record.roles),
        kind=kind,
    )
    system.add(agent)
    record.agent_id = agent_id
    try:
        subject = subject_of(record.tenant_scope, record.island, agent_id)
        cert = ca.issue(csr_pem, subject, lifetime, server_name=_server_name(kind, record.tenant_scope, record.island))
    except CertificateRefused as exc:
        raise InvalidRequest(str(exc), param="csr") from exc
    system.flush()
    _record_certificate(system, agent_id, cert)
    audit.record(
        system,
        None,
        "agent.enroll",
        actor=agent_id,
        target=agent_id,
        tenant_id=record.tenant_scope,
        ip=ip,
        detail={
            "token": record.id,
            "kind": kind,
            "island": record.island,
            "roles": record.roles,
            "serial": serial_hex(cert),
        },
    )
    return Issued(agent, pem(cert))


def renew(
    system: Session, cert_pem: bytes, csr_pem: bytes, *, ca: CertificateAuthority, lifetime: dt.timedelta
) -> Issued:
    """A new certificate for the holder of a current, unrevoked one: the request must be signed with its key."""
    try:
        current = ca.check(cert_pem)
        csr = x509.load_pem_x509_csr(csr_pem)
    except (CertificateRefused, ValueError) as exc:
        raise Unauthenticated(f"Renewal refused: {exc}") from exc
    if not csr.is_signature_valid or csr.public_key() != current.public_key():
        raise Unauthenticated("Renewal refused: the request must be signed with the current certificate's key")
    record = system.get(m.AgentCertificate, serial_hex(current))
    agent = system.get(m.Agent, record.agent_id) if record else None
    if record is None or record.revoked_at is not None or agent is None or agent.revoked_at is not None:
        raise Unauthenticated("Renewal refused: this certificate or its agent has been revoked")
    server_name = _server_name(agent.kind, agent.tenant_scope, agent.island)
    cert = ca.issue(csr_pem, current.subject, lifetime, server_name=server_name)
    _record_certificate(system, agent.id, cert)
    audit.record(
        system,
        None,
        "agent.renew",
        actor=agent.id,
        target=agent.id,
        tenant_id=agent.tenant_scope,
        detail={"serial": serial_hex(cert), "previous": record.serial},
    )
    return Issued(agent, pem(cert))


def visible_agent(system: Session, who: Principal, agent_id: str) -> m.Agent:
    """An agent the caller administers: another tenant's (or, for a tenant admin, the platform's) is a 404."""
    agent = system.get(m.Agent, agent_id)
    if agent is None or agent.embedded or not may_enroll_for(who, agent.tenant_scope):
        raise NotFound(f"no agent '{agent_id}'", param="agent_id")
    return agent


def revoke(system: Session, agent: m.Agent, who: Principal | None = None) -> m.Agent:
    now = time.time()
    agent.revoked_at = agent.revoked_at or now
    system.execute(
        update(m.AgentCertificate)
        .where(m.AgentCertificate.agent_id == agent.id, m.AgentCertificate.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    audit.record(
        system,
        who,
        "agent.revoke",
        target=agent.id,
        tenant_id=agent.tenant_scope or (who.tenant_id if who else None),
        actor=None if who else "cli",
    )
    return agent


def members(system: Session) -> list[Member]:
    """The unrevoked agents and island leaves enrolled by certificate, as the broker's configuration names them."""
    rows = system.scalars(
        select(m.Agent).where(m.Agent.revoked_at.is_(None), m.Agent.secret_hash == "", m.Agent.island.is_not(None))
    )
    return [
        Member(
            agent.id,
            agent.tenant_scope,
            agent.island,
            identity.subject_string(subject_of(agent.tenant_scope, agent.island, agent.id)),
            leaf=agent.kind == "leaf",
        )
        for agent in rows
    ]
