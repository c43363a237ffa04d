"""Federations: the coordinating tenant's record of who takes part in a federated fine-tuning.

A federation holds its sites' identity public keys (the keys each site's SuperNode authenticates
with and signs its secure-aggregation keys with); its roster, `{number: key}`, is what
`adaptery federated coordinator` and every site run with. The platform is the coordinator's side:
each site must compare the roster's fingerprints with the other sites out of band before it trusts
it (README, "Federated fine-tuning"). Nothing of a site's data is ever stored here.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal, Role
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.services.errors import Conflict, InvalidRequest, NotFound, PermissionDenied

MAX_SITES = 64


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


def add_site(
    session: Session, federation: m.Federation, *, name: str, public_key: str, who: Principal | None = None
) -> m.FederationSite:
    """A site joins the roster, the federation's root of trust: so only its creator or a tenant admin adds one."""
    if who is not None and who.user_id != federation.created_by and not who.has_role(Role.ADMIN):
        raise PermissionDenied(
            "Only the federation's creator or a tenant admin adds sites: the roster decides who trains with you.",
            param="federation_id",
            code="insufficient_role",
        )
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
    )
    session.add(site)
    session.flush()
    return site


def roster(session: Session, federation: m.Federation) -> dict[str, str]:
    """{"site number": "OpenSSH public key"}: the file the coordinator and the sites run with."""
    return {str(site.number): site.public_key for site in sites_of(session, federation)}
