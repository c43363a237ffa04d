"""/api/federations: the coordinating tenant's federations and their sites' identity keys.

The platform records who takes part; the rounds run in `adaptery federated coordinator` (Flower's
SuperLink) and `adaptery federated site` next to each site's data, and the result comes back as an
ordinary adapter (`adaptery models import`). Every change is audited.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import platform, principal
from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.platform import Platform
from adaptery.services import audit, federations, models
from adaptery.services.errors import InvalidRequest

router = APIRouter(prefix="/api/federations", tags=["federations"])
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class NewFederation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME)
    base_model: str = Field(max_length=255)
    threshold: int | None = Field(None, ge=2, le=federations.MAX_SITES)


class NewSite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME)
    public_key: str = Field(max_length=2000, description="The site's OpenSSH public key (adaptery federated keygen)")


class Site(BaseModel):
    object: str = "federation.site"
    id: str
    number: int
    name: str
    public_key: str
    fingerprint: str
    created_at: int


class FederationObject(BaseModel):
    object: str = "federation"
    id: str
    name: str
    base_model: str
    threshold: int | None
    sites: list[Site]
    created_at: int


class FederationList(BaseModel):
    object: str = "list"
    data: list[FederationObject]


def _site(site: m.FederationSite) -> Site:
    return Site(
        id=site.id,
        number=site.number,
        name=site.name,
        public_key=site.public_key,
        fingerprint=site.fingerprint,
        created_at=int(site.created_at),
    )


def _federation(record: m.Federation, sites: list[m.FederationSite]) -> FederationObject:
    return FederationObject(
        id=record.id,
        name=record.name,
        base_model=record.base_model,
        threshold=record.threshold,
        sites=[_site(s) for s in sites],
        created_at=int(record.created_at),
    )


@router.post("", status_code=201)
def create_federation(
    body: NewFederation, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> FederationObject:
    with p.db.tenant(who.tenant_id) as s:
        ref = models.get_model(s, body.base_model, param="base_model", viewer=who)  # a hidden adapter: 404
        if ref.adapter is not None:
            raise InvalidRequest("base_model must be a base model, not an adapter", param="base_model")
        record = federations.create_federation(
            s, name=body.name, base_model=body.base_model, threshold=body.threshold, created_by=who.user_id
        )
        audit.record(s, who, "federation.create", target=record.id, detail={"name": body.name})
        return _federation(record, [])


@router.get("")
def list_federations(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> FederationList:
    with p.db.tenant(who.tenant_id) as s:
        return FederationList(
            data=[_federation(f, federations.sites_of(s, f)) for f in federations.list_federations(s)]
        )


@router.get("/{federation_id}")
def get_federation(
    federation_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> FederationObject:
    with p.db.tenant(who.tenant_id) as s:
        record = federations.get_federation(s, federation_id)
        return _federation(record, federations.sites_of(s, record))


@router.post("/{federation_id}/sites", status_code=201)
def add_site(
    federation_id: str, body: NewSite, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> Site:
    with p.db.tenant(who.tenant_id) as s:
        record = federations.get_federation(s, federation_id)
        site = federations.add_site(s, record, name=body.name, public_key=body.public_key, who=who)
        audit.record(
            s,
            who,
            "federation.site_add",
            target=record.id,
            detail={"site": site.number, "fingerprint": site.fingerprint},
        )
        return _site(site)


@router.get("/{federation_id}/roster")
def get_roster(
    federation_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict[str, str]:
    """{"site number": "OpenSSH public key"}: the roster file for the coordinator and the sites."""
    with p.db.tenant(who.tenant_id) as s:
        return federations.roster(s, federations.get_federation(s, federation_id))
