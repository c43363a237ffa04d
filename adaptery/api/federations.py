"""/api/federations: the coordinating tenant's federations and their sites' identity keys.

The platform records who takes part; the rounds run in `adaptery federated coordinator` (Flower's
SuperLink) and `adaptery federated site` next to each site's data, and the result comes back as an
ordinary adapter (`adaptery models import`). Every change is audited.

Two routes are public, each proven by what the caller holds: `join` (a one-time invitation token, and a
signature by the key it registers) and a site's `check-in` (a fresh signature by its registered key).
"""

from __future__ import annotations

from typing import Annotated, Literal

from cryptography import x509
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from adaptery.api.deps import platform, principal
from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.messaging import identity
from adaptery.platform import Platform
from adaptery.services import audit, federations, models
from adaptery.services.errors import InvalidRequest, NotFound, Unauthenticated

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


class NewInvitation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME, description="The site's name once it has joined")
    ttl_seconds: float = Field(3600, gt=0)


class Invitation(BaseModel):
    object: Literal["federation.invitation"] = "federation.invitation"
    id: str
    name: str
    expires_at: float
    token: str | None = Field(None, description="Shown once, when made: only its hash is kept")


class JoinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(max_length=512)
    public_key: str = Field(max_length=2000, description="The site's OpenSSH public key, made on the site")
    signature: str = Field(max_length=1024, description="Hex ECDSA-SHA384 signature of the join message by that key")


class CheckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    time_ms: int = Field(ge=0, le=2**50, description="Unix milliseconds, as signed: after the last accepted check-in")
    signature: str = Field(max_length=1024, description="Hex ECDSA-SHA384 signature of the check-in message")


class Coordinator(BaseModel):
    model_config = ConfigDict(extra="forbid")
    superlink: str = Field(pattern=r"^[A-Za-z0-9.:\[\]-]{1,250}:[0-9]{1,5}$", description="HOST:PORT sites dial")
    superlink_ca: str = Field(max_length=16 * 1024, description="PEM of the CA the SuperLink's certificate chains to")
    rounds: int = Field(ge=1, le=10_000)
    sites: list[int] | None = Field(
        None, max_length=federations.MAX_SITES, description="The site numbers the run admits [default: all]"
    )

    @field_validator("superlink")
    @classmethod
    def _port(cls, value: str) -> str:
        if not 1 <= int(value.rsplit(":", 1)[1]) <= 65535:
            raise ValueError("the port is 1 to 65535")
        return value

    @field_validator("superlink_ca")
    @classmethod
    def _pem(cls, value: str) -> str:
        """Sites write it as the CA they trust: anything but certificates would only fail there, later."""
        try:
            x509.load_pem_x509_certificates(value.encode())
        except ValueError as error:
            raise ValueError("not PEM certificates") from error
        return value


class ProgressEvent(BaseModel):
    """One line of the coordinator's progress.jsonl (other fields it writes are ignored)."""

    model_config = ConfigDict(extra="ignore")
    event: Literal["start", "round", "done", "failed", "adapter"] | None = None
    round: int | None = Field(None, ge=1, le=10_000)
    stage: str | None = Field(None, max_length=32)
    rounds: int | None = Field(None, ge=1, le=10_000)
    loss: float | None = None
    survivors: list[Annotated[int, Field(ge=1, le=2**31)]] = Field(  # site numbers, of the federation's (checked)
        default_factory=list, max_length=federations.MAX_SITES
    )
    seconds: float = Field(0.0, ge=0, allow_inf_nan=False)
    epsilon: float | None = Field(None, ge=0, allow_inf_nan=False)
    error: str | None = Field(None, max_length=4000)
    model: str | None = Field(None, max_length=255)


class Site(BaseModel):
    object: str = "federation.site"
    id: str
    number: int
    name: str
    public_key: str
    fingerprint: str
    created_at: int
    status: str = Field("added", description="added, joined, online, offline or dropped (left out of the last round)")
    joined: bool = False
    last_seen: float | None = None


class Round(BaseModel):
    number: int
    loss: float | None
    survivors: list[int]
    seconds: float
    epsilon: float | None
    created_at: float


class FederationObject(BaseModel):
    object: str = "federation"
    id: str
    name: str
    base_model: str
    threshold: int | None
    sites: list[Site]
    created_at: int
    status: str = "created"
    superlink: str | None = None
    rounds: int | None = Field(None, description="Rounds the coordinator runs")
    progress: dict | None = Field(None, description="The round and stage under way")
    history: list[Round] = Field(default_factory=list, description="Finished rounds, with their mean loss")
    adapter: str | None = None
    error: str | None = None
    invitations: list[Invitation] = Field(default_factory=list, description="Unused, unexpired invitations")


class JoinedSite(BaseModel):
    object: Literal["federation.site"] = "federation.site"
    id: str
    number: int
    name: str
    federation_id: str
    federation: str
    base_model: str


class SiteView(BaseModel):
    """What a site learns at check-in: where to dial and whom it trains with (compare the fingerprints out of band)."""

    object: Literal["federation.site_view"] = "federation.site_view"
    site: int
    federation_id: str
    status: str
    superlink: str | None
    superlink_ca: str | None
    roster: dict[str, str]


class FederationList(BaseModel):
    object: str = "list"
    data: list[FederationObject]


def _site(site: m.FederationSite, status: str | None = None) -> Site:
    return Site(
        id=site.id,
        number=site.number,
        name=site.name,
        public_key=site.public_key,
        fingerprint=site.fingerprint,
        created_at=int(site.created_at),
        status=status or ("joined" if site.joined else "added"),
        joined=site.joined,
        last_seen=site.last_seen,
    )


def _federation(s, record: m.Federation) -> FederationObject:  # noqa: ANN001 - a tenant Session
    rounds = federations.rounds_of(s, record)
    return FederationObject(
        id=record.id,
        name=record.name,
        base_model=record.base_model,
        threshold=record.threshold,
        sites=[_site(x, federations.site_status(x, record, rounds)) for x in federations.sites_of(s, record)],
        created_at=int(record.created_at),
        status=record.status,
        superlink=record.superlink,
        rounds=record.rounds,
        progress=record.progress,
        history=[
            Round(
                number=r.number,
                loss=r.loss,
                survivors=r.survivors,
                seconds=r.seconds,
                epsilon=r.epsilon,
                created_at=r.created_at,
            )
            for r in rounds
        ],
        adapter=record.adapter,
        error=record.error,
        invitations=[
            Invitation(id=i.id, name=i.name, expires_at=i.expires_at)
            for i in federations.pending_invitations(s, record)
        ],
    )


def _signature(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as error:
        raise InvalidRequest("signature is hex", param="signature") from error


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
        return _federation(s, record)


@router.get("")
def list_federations(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> FederationList:
    with p.db.tenant(who.tenant_id) as s:
        return FederationList(data=[_federation(s, f) for f in federations.list_federations(s)])


@router.get("/{federation_id}")
def get_federation(
    federation_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> FederationObject:
    with p.db.tenant(who.tenant_id) as s:
        return _federation(s, federations.get_federation(s, federation_id))


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


@router.post("/{federation_id}/invitations", status_code=201)
def invite_site(
    federation_id: str, body: NewInvitation, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> Invitation:
    """A one-time, expiring token for a site to join with `adaptery fed join --token` (it names this platform's CA,
    as an enrollment token does, so the site trusts the right server before it sends anything)."""
    with p.db.tenant(who.tenant_id) as s:
        record = federations.get_federation(s, federation_id)
        invitation, secret = federations.invite(
            s,
            record,
            who,
            name=body.name,
            ttl_seconds=body.ttl_seconds,
            max_seconds=p.settings.enrollment_token_max_hours * 3600,
        )
        audit.record(
            s,
            who,
            "federation.invite",
            target=record.id,
            detail={"invitation": invitation.id, "name": body.name, "expires_at": invitation.expires_at},
        )
        return Invitation(
            id=invitation.id,
            name=invitation.name,
            expires_at=invitation.expires_at,
            token=identity.make_token(secret, p.trust_pem()),
        )


@router.delete("/{federation_id}/invitations/{invitation_id}", status_code=204)
def withdraw_invitation(
    federation_id: str, invitation_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> Response:
    """Withdraw an unused site invitation (its creator or a tenant admin): no site can join with it any more."""
    with p.db.tenant(who.tenant_id) as s:
        record = federations.get_federation(s, federation_id)
        federations.withdraw_invitation(s, record, who, invitation_id)
        audit.record(s, who, "federation.invitation.withdraw", target=record.id, detail={"invitation": invitation_id})
    return Response(status_code=204)


@router.post("/join", status_code=201)
def join(body: JoinRequest, request: Request, p: Platform = Depends(platform)) -> JoinedSite:
    try:
        secret, pin = identity.parse_token(body.token)
    except ValueError as error:
        raise Unauthenticated(str(error)) from error
    if pin != identity.ca_pin(p.trust_pem()):
        raise Unauthenticated("This invitation was made for another platform CA. Ask for a new one.")
    with p.db.system() as s:
        tenant_id = federations.invitation_tenant(s, secret)
    with p.db.tenant(tenant_id) as s:
        site = federations.join(s, secret, public_key=body.public_key, signature=_signature(body.signature))
        record = s.get(m.Federation, site.federation_id)
        audit.record(
            s,
            None,
            "federation.site_join",
            actor=site.id,
            target=record.id,
            tenant_id=tenant_id,
            ip=request.client.host if request.client else None,
            detail={"site": site.number, "name": site.name, "fingerprint": site.fingerprint},
        )
        return JoinedSite(
            id=site.id,
            number=site.number,
            name=site.name,
            federation_id=record.id,
            federation=record.name,
            base_model=record.base_model,
        )


@router.post("/sites/{site_id}/check-in")
def check_in(site_id: str, body: CheckIn, p: Platform = Depends(platform)) -> SiteView:
    with p.db.system() as s:
        tenant_id = federations.site_tenant(s, site_id)
    with p.db.tenant(tenant_id) as s:
        site = federations.check_in(s, site_id, when_ms=body.time_ms, signature=_signature(body.signature))
        record = s.get(m.Federation, site.federation_id)
        return SiteView(
            site=site.number,
            federation_id=record.id,
            status=record.status,
            superlink=record.superlink,
            superlink_ca=record.superlink_ca,
            roster=federations.member_roster(s, record),
        )


@router.put("/{federation_id}/coordinator")
def publish_coordinator(
    federation_id: str, body: Coordinator, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict[str, str]:
    """The coordinator says where its SuperLink listens, once it has registered the sites' keys there: those sites
    are the run's roster (returned)."""
    with p.db.tenant(who.tenant_id) as s:
        record = federations.get_federation(s, federation_id)
        members = federations.publish_coordinator(
            s,
            record,
            who,
            superlink=body.superlink,
            superlink_ca=body.superlink_ca,
            rounds=body.rounds,
            sites=body.sites,
        )
        audit.record(
            s, who, "federation.coordinator", target=record.id, detail={"superlink": body.superlink, "sites": members}
        )
        return federations.member_roster(s, record)


@router.post("/{federation_id}/events")
def report_progress(
    federation_id: str, body: ProgressEvent, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> FederationObject:
    """The coordinator's progress, one event at a time: the web UI's federation page shows it as it comes."""
    with p.db.tenant(who.tenant_id) as s:
        record = federations.get_federation(s, federation_id)
        if body.event == "adapter":  # the federation's readers see it: one they all may see, or the caller's own
            ref = models.get_model(s, body.model or "", param="model", viewer=who)
            if ref.adapter is not None and ref.adapter.visibility != "tenant" and ref.adapter.created_by != who.user_id:
                raise NotFound(
                    f"The model '{body.model}' does not exist or you do not have access to it.",
                    param="model",
                    code="model_not_found",
                )
        event = body.model_dump(exclude_none=True)
        federations.record_event(s, record, who, event)
        if body.event in ("done", "failed", "adapter"):
            audit.record(s, who, f"federation.{body.event}", target=record.id, detail=event)
        return _federation(s, record)
