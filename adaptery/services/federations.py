"""Federations: the coordinating tenant's record of who takes part in a federated fine-tuning.

A federation holds its sites' identity public keys (the keys each site's SuperNode authenticates
with and signs its secure-aggregation keys with); its roster, `{number: key}`, is what
`adaptery federated coordinator` and every site run with. The platform is the coordinator's side:
each site must compare the roster's fingerprints with the other sites out of band before it trusts
it (README, "Federated fine-tuning"). Nothing of a site's data is ever stored here.

A site joins either out of band (an admin adds its public key) or by invitation: the admin makes a one-time,
expiring token (only its sha256 kept, as for agent enrollment tokens) and the site presents it with its own
public key and a signature by that key (`adaptery fed join`). From then on the site proves itself by signing
its check-ins with the same key: they fetch the coordinator's SuperLink address and the roster, and mark it seen.
The coordinator reports its progress here, so the rounds can be watched in the web UI.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal, Role
from adaptery.db import models as m
from adaptery.db.ids import new_id, random_token
from adaptery.federated.join import check_in_message, join_message
from adaptery.services.errors import Conflict, InvalidRequest, NotFound, PermissionDenied, Unauthenticated

MAX_SITES = 64
CHECK_IN_WINDOW = 300.0  # seconds a signed check-in's timestamp may be off the platform's clock
ONLINE_SECONDS = 60.0  # a site that checked in this recently is shown online
STATUSES = ("created", "running", "done", "failed")
_REFUSED_TOKEN = "This invitation is not valid: it is unknown, already used or expired. Ask for a new one."
_WITHDRAWN = "This invitation was withdrawn: the person who made it may no longer add sites. Ask for a new one."


def _verify(public_key: str, signature: bytes, message: bytes) -> bool:
    key = serialization.load_ssh_public_key(public_key.encode())
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


def parse_site_key(text: str) -> tuple[str, str]:
    """The OpenSSH public key, normalised (type and data, no comment), and its fingerprint; 400 if it is
    not an EC key on a NIST curve (what Flower's node authentication accepts)."""
    parts = text.strip().split()
    try:
        key = serialization.load_ssh_public_key(" ".join(parts[:2]).encode())
    except (ValueError, IndexError, TypeError, UnsupportedAlgorithm) as error:
        raise InvalidRequest("public_key is not an OpenSSH public key", param="public_key") from error
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise InvalidRequest("public_key must be an EC key on P-256, P-384 or P-521", param="public_key")
    normal = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return normal, hashlib.sha256(normal.split()[1].encode()).hexdigest()


def create_federation(
    session: Session, *, name: str, base_model: str, threshold: int | None, created_by: str | None
) -> m.Federation:
    if session.scalar(select(m.Federation.id).where(m.Federation.name == name)) is not None:
        raise Conflict(f"A federation named '{name}' exists.", param="name")
    federation = m.Federation(
        id=new_id("fed_"), name=name, base_model=base_model, threshold=threshold, created_by=created_by
    )
    session.add(federation)
    session.flush()
    return federation


def list_federations(session: Session) -> list[m.Federation]:
    return list(session.scalars(select(m.Federation).order_by(m.Federation.created_at)))


def get_federation(session: Session, federation_id: str) -> m.Federation:
    federation = session.get(m.Federation, federation_id)
    if federation is None or federation.tenant_id != session.info.get("tenant_id"):
        raise NotFound(f"No federation '{federation_id}'.", param="federation_id", code="federation_not_found")
    return federation


def sites_of(session: Session, federation: m.Federation) -> list[m.FederationSite]:
    return list(
        session.scalars(
            select(m.FederationSite)
            .where(m.FederationSite.federation_id == federation.id)
            .order_by(m.FederationSite.number)
        )
    )


def check_steward(federation: m.Federation, who: Principal) -> None:
    """The roster is the federation's root of trust and the coordinator's reports are its record: only its
    creator or a tenant admin changes either."""
    if who.user_id != federation.created_by and not who.has_role(Role.ADMIN):
        raise PermissionDenied(
            "Only the federation's creator or a tenant admin adds sites: the roster decides who trains with you.",
            param="federation_id",
            code="insufficient_role",
        )


def add_site(
    session: Session,
    federation: m.Federation,
    *,
    name: str,
    public_key: str,
    who: Principal | None = None,
    joined: bool = False,
) -> m.FederationSite:
    """A site joins the roster, the federation's root of trust: so only its creator or a tenant admin adds one."""
    if who is not None:
        check_steward(federation, who)
    key, fingerprint = parse_site_key(public_key)
    sites = sites_of(session, federation)
    if any(site.fingerprint == fingerprint for site in sites):
        raise Conflict("This key is already a site of the federation.", param="public_key")
    if any(site.name == name for site in sites):
        raise Conflict(f"The federation already has a site named {name!r}.", param="name")
    if len(sites) >= MAX_SITES:
        raise InvalidRequest(f"A federation has at most {MAX_SITES} sites.", param="public_key")
    number = (session.scalar(select(func.max(m.FederationSite.number)).where(
        m.FederationSite.federation_id == federation.id)) or 0) + 1  # fmt: skip
    site = m.FederationSite(
        id=new_id("site_"),
        federation_id=federation.id,
        number=number,
        name=name,
        public_key=key,
        fingerprint=fingerprint,
        joined=joined,
    )
    session.add(site)
    session.flush()
    return site


def roster(session: Session, federation: m.Federation) -> dict[str, str]:
    """{"site number": "OpenSSH public key"}: the file the coordinator and the sites run with."""
    return {str(site.number): site.public_key for site in sites_of(session, federation)}


def site_status(site: m.FederationSite, federation: m.Federation, rounds: list[m.FederationRound]) -> str:
    """online / offline (its last check-in), dropped (left out of the last round), or added (out of band: it
    never checks in)."""
    members = federation.members or []
    if rounds and site.number in members and site.number not in rounds[-1].survivors:
        return "dropped"
    if site.last_seen is not None:
        return "online" if time.time() - site.last_seen < ONLINE_SECONDS else "offline"
    return "joined" if site.joined else "added"


def rounds_of(session: Session, federation: m.Federation) -> list[m.FederationRound]:
    return list(
        session.scalars(
            select(m.FederationRound)
            .where(m.FederationRound.federation_id == federation.id)
            .order_by(m.FederationRound.number)
        )
    )


def pending_invitations(session: Session, federation: m.Federation) -> list[m.FederationInvitation]:
    return list(
        session.scalars(
            select(m.FederationInvitation)
            .where(
                m.FederationInvitation.federation_id == federation.id,
                m.FederationInvitation.used_at.is_(None),
                m.FederationInvitation.expires_at > time.time(),
            )
            .order_by(m.FederationInvitation.created_at)
        )
    )


def _token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def invite(
    session: Session, federation: m.Federation, who: Principal, *, name: str, ttl_seconds: float, max_seconds: float
) -> tuple[m.FederationInvitation, str]:
    """A one-time, expiring invitation for a site named `name`; the secret is returned once, only its hash kept."""
    check_steward(federation, who)
    if not 0 < ttl_seconds <= max_seconds:
        raise InvalidRequest(f"ttl is more than 0 and at most {max_seconds:.0f} seconds", param="ttl_seconds")
    taken = {site.name for site in sites_of(session, federation)}
    taken |= {i.name for i in pending_invitations(session, federation)}
    if name in taken:
        raise Conflict(f"The federation already has a site or invitation named {name!r}.", param="name")
    secret = random_token(43)
    invitation = m.FederationInvitation(
        id=new_id("fedinv_"),
        federation_id=federation.id,
        name=name,
        token_hash=_token_hash(secret),
        created_by=who.user_id,
        expires_at=time.time() + ttl_seconds,
    )
    session.add(invitation)
    session.flush()
    return invitation, secret


def _maker_still_steward(session: Session, invitation: m.FederationInvitation) -> bool:
    """An invitation is worth no more than its maker's right to make it, now: still in the tenant, and still the
    federation's creator or an owner or admin (`check_steward`). Their invitations also go when they leave
    (`withdraw_invitations_of`); this holds whatever the path."""
    federation = session.get(m.Federation, invitation.federation_id)
    role = session.scalar(
        select(m.Membership.role).where(
            m.Membership.tenant_id == invitation.tenant_id, m.Membership.user_id == invitation.created_by
        )
    )
    if federation is None or role is None:
        return False
    creator_and_member = invitation.created_by == federation.created_by and role == Role.MEMBER.value
    return creator_and_member or role in (Role.OWNER.value, Role.ADMIN.value)  # a viewer adds no site


def withdraw_invitation(session: Session, federation: m.Federation, who: Principal, invitation_id: str) -> None:
    """Withdraw an unused invitation (its federation's steward); one not pending in this federation is a 404."""
    check_steward(federation, who)
    invitation = session.scalar(
        select(m.FederationInvitation).where(
            m.FederationInvitation.id == invitation_id,
            m.FederationInvitation.federation_id == federation.id,
            m.FederationInvitation.used_at.is_(None),
        )
    )
    if invitation is None:
        raise NotFound(f"No unused invitation '{invitation_id}'.", param="invitation_id")
    session.delete(invitation)


def withdraw_invitations_of(session: Session, user_id: str, tenant_id: str) -> None:
    """The unused site invitations a person made in a tenant, gone (they left it, or their role changed: one
    regained later does not bring them back)."""
    session.execute(
        delete(m.FederationInvitation).where(
            m.FederationInvitation.tenant_id == tenant_id,
            m.FederationInvitation.created_by == user_id,
            m.FederationInvitation.used_at.is_(None),
        )
    )


def invitation_tenant(system: Session, secret: str) -> str:
    """The tenant an invitation belongs to (looked up unfiltered by its hash); 401 if it is unknown."""
    tenant_id = system.scalar(
        select(m.FederationInvitation.tenant_id).where(m.FederationInvitation.token_hash == _token_hash(secret))
    )
    if tenant_id is None:
        raise Unauthenticated(_REFUSED_TOKEN)
    return tenant_id


def join(session: Session, secret: str, *, public_key: str, signature: bytes) -> m.FederationSite:
    """Use an invitation (in its tenant's session): the site is added with its key, the token is spent."""
    invitation = session.scalar(
        select(m.FederationInvitation).where(m.FederationInvitation.token_hash == _token_hash(secret))
    )
    now = time.time()
    if invitation is None or invitation.used_at is not None or invitation.expires_at <= now:
        raise Unauthenticated(_REFUSED_TOKEN)
    if not _maker_still_steward(session, invitation):
        raise Unauthenticated(_WITHDRAWN)
    key, _ = parse_site_key(public_key)
    if not _verify(key, signature, join_message(secret)):
        raise Unauthenticated("The join request is not signed by the key it registers.")
    # One use, even against a racing request: only the UPDATE that finds it unused wins.
    won = session.execute(
        update(m.FederationInvitation)
        .where(m.FederationInvitation.id == invitation.id, m.FederationInvitation.used_at.is_(None))
        .values(used_at=now)
    ).rowcount
    if won != 1:
        raise Unauthenticated(_REFUSED_TOKEN)
    federation = session.get(m.Federation, invitation.federation_id)
    site = add_site(session, federation, name=invitation.name, public_key=key, joined=True)
    invitation.site_id = site.id
    site.last_seen = now
    return site


def site_tenant(system: Session, site_id: str) -> str:
    tenant_id = system.scalar(select(m.FederationSite.tenant_id).where(m.FederationSite.id == site_id))
    if tenant_id is None:
        raise NotFound(f"No site '{site_id}'.", param="site_id")
    return tenant_id


def check_in(session: Session, site_id: str, *, when_ms: int, signature: bytes) -> m.FederationSite:
    """A site's signed check-in: marks it seen. 401 unless signed by the site's key within the clock window; 409
    unless its signed time is after the last check-in accepted from the site (a captured one replayed)."""
    site = session.get(m.FederationSite, site_id)
    if site is None or site.tenant_id != session.info.get("tenant_id"):
        raise NotFound(f"No site '{site_id}'.", param="site_id")
    if abs(time.time() - when_ms / 1000) > CHECK_IN_WINDOW or not _verify(
        site.public_key, signature, check_in_message(site_id, when_ms)
    ):
        raise Unauthenticated("The check-in is not signed by this site's key, or its clock is off by over 5 minutes.")
    # Only the UPDATE that finds an older last check-in wins, so two racing copies cannot both be accepted.
    newer = session.execute(
        update(m.FederationSite)
        .where(
            m.FederationSite.id == site_id,
            or_(m.FederationSite.last_check_in.is_(None), m.FederationSite.last_check_in < when_ms),
        )
        .values(last_check_in=when_ms, last_seen=time.time())
        .execution_options(synchronize_session=False)
    ).rowcount
    if newer != 1:
        raise Conflict(
            f"Check-in refused: its time ({when_ms} ms) is not after the last check-in accepted from this site "
            "(a replayed or out-of-order check-in). Sign a new one."
        )
    session.refresh(site)
    return site


def publish_coordinator(
    session: Session,
    federation: m.Federation,
    who: Principal,
    *,
    superlink: str,
    superlink_ca: str,
    rounds: int,
    sites: list[int] | None = None,
) -> list[int]:
    """Where sites dial, and the roster the run admits (`sites`, default all recorded now): sites fetch both on
    check-in, so the coordinator publishes once their keys are registered with its SuperLink."""
    check_steward(federation, who)
    recorded = [site.number for site in sites_of(session, federation)]
    members = recorded if sites is None else sorted(set(sites))
    if not members:
        raise InvalidRequest("The federation has no sites yet.", param="sites")
    if not set(members) <= set(recorded):
        raise InvalidRequest(f"No such sites: {sorted(set(members) - set(recorded))}", param="sites")
    federation.superlink, federation.superlink_ca, federation.rounds = superlink, superlink_ca, rounds
    federation.members = members
    federation.status, federation.progress, federation.error, federation.adapter = "created", None, None, None
    session.execute(delete(m.FederationRound).where(m.FederationRound.federation_id == federation.id))  # a new run
    return members


def member_roster(session: Session, federation: m.Federation) -> dict[str, str]:
    """The roster the coordinator's run admits (every site until a coordinator has published one)."""
    full = roster(session, federation)
    if federation.members is None:
        return full
    return {number: key for number, key in full.items() if int(number) in federation.members}


def record_event(session: Session, federation: m.Federation, who: Principal, event: dict[str, Any]) -> None:
    """One line of the coordinator's progress (`apps._progress`): a run started, a stage done, a round done, the
    run done or failed, the adapter imported."""
    check_steward(federation, who)
    kind = event.get("event")
    if kind == "start":
        federation.status, federation.error = "running", None
        federation.rounds = int(event.get("rounds") or federation.rounds or 0) or None
        federation.progress = {"round": 1, "stage": "training"}
    elif kind == "round":
        if "round" not in event:
            raise InvalidRequest("a round event names its round", param="round")
        number = int(event["round"])
        if federation.rounds and number > federation.rounds:
            raise InvalidRequest(f"The run has {federation.rounds} rounds.", param="round")
        outsiders = set(event.get("survivors", [])) - {site.number for site in sites_of(session, federation)}
        if outsiders:
            raise InvalidRequest(f"No such sites: {sorted(outsiders)}", param="survivors")
        if session.scalar(
            select(m.FederationRound.id).where(
                m.FederationRound.federation_id == federation.id, m.FederationRound.number == number
            )
        ):
            raise Conflict(f"Round {number} is already recorded.", param="round")
        loss, epsilon = event.get("loss"), event.get("epsilon")
        session.add(
            m.FederationRound(
                id=new_id("fedround_"),
                federation_id=federation.id,
                number=number,
                loss=None if loss is None else float(loss),
                survivors=[int(s) for s in event.get("survivors", [])],
                seconds=float(event.get("seconds", 0.0)),
                epsilon=None if epsilon is None else float(epsilon),
            )
        )
        federation.progress = {"round": number + 1, "stage": "training"}
    elif kind == "done":
        federation.status, federation.progress = "done", None
    elif kind == "failed":
        federation.status, federation.error = "failed", str(event.get("error", ""))[:2000]
    elif kind == "adapter":
        federation.adapter = str(event["model"])
    elif "stage" in event and "round" in event:
        federation.progress = {"round": int(event["round"]), "stage": str(event["stage"])}
    else:
        raise InvalidRequest("unknown progress event", param="event")
    session.flush()
