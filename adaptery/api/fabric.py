"""Joining the fabric: enrollment tokens and revocation (admins), and the public routes an enrolling machine
calls with what proves it (a token, or its current certificate): /api/fabric/ca, /enroll, /renew; and the
presigned artifact transfers of enrolled agents (/api/fabric/transfers, `services/transfers.py`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import platform, principal
from adaptery.api.errors import error_body
from adaptery.auth.principal import Principal
from adaptery.auth.transfers import CERTIFICATE_HEADER, PROOF_HEADER, TRANSFER_PATH, Grant, TransferRefused
from adaptery.platform import Platform
from adaptery.services import enrollment, transfers
from adaptery.services.control_plane import TransferSource

router = APIRouter(tags=["fabric"])
PEM_MAX = 16 * 1024


class CreateTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scope: Literal["platform", "tenant"] = "tenant"
    island: str = Field("default", max_length=48)
    kind: Literal["agent", "leaf"] = Field(
        "agent", description="What the token enrolls: an agent, or an island's leaf node (`adaptery island up`)"
    )
    roles: list[str] | None = Field(
        None, max_length=4, description="An agent's: train, infer or both (default train). A leaf's: none."
    )
    ttl_seconds: float = Field(3600, gt=0)


class EnrollmentTokenObject(BaseModel):
    object: Literal["enrollment_token"] = "enrollment_token"
    id: str
    token: str = Field(description="Shown once: only its hash is kept")
    scope: str
    tenant_id: str | None
    island: str
    kind: str
    roles: list[str]
    expires_at: float


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(max_length=512)
    csr: str = Field(max_length=PEM_MAX, description="PEM certificate signing request; its subject is ignored")
    kind: Literal["agent", "leaf"] = Field("agent", description="What this machine joins as: its token's kind")


class RenewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    certificate: str = Field(max_length=PEM_MAX, description="The current certificate (PEM)")
    csr: str = Field(max_length=PEM_MAX, description="Signed with the current certificate's key")


class Enrolled(BaseModel):
    object: Literal["agent.certificate"] = "agent.certificate"
    agent_id: str
    kind: str
    tenant_id: str | None
    island: str | None
    roles: list[str]
    certificate: str
    ca: str
    nats_url: str | None
    leaf_url: str | None


class RevokedAgent(BaseModel):
    object: Literal["agent"] = "agent"
    id: str
    revoked_at: float


def _enrolled(p: Platform, issued: enrollment.Issued) -> Enrolled:
    agent = issued.agent
    return Enrolled(
        agent_id=agent.id,
        kind=agent.kind,
        tenant_id=agent.tenant_scope,
        island=agent.island,
        roles=list(agent.roles or []),
        certificate=issued.certificate.decode(),
        ca=p.trust_pem().decode(),
        **p.fabric_urls(),
    )


def _lifetime(p: Platform) -> dt.timedelta:
    return dt.timedelta(hours=p.settings.agent_certificate_hours)


@router.post("/api/admin/agents/tokens")
def create_token(
    body: CreateTokenRequest, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> EnrollmentTokenObject:
    with p.db.system() as s:
        new = enrollment.create_token(
            s,
            who,
            scope=body.scope,
            island=body.island,
            kind=body.kind,
            roles=body.roles,
            ttl_seconds=body.ttl_seconds,
            max_seconds=p.settings.enrollment_token_max_hours * 3600,
            trust_pem=p.trust_pem(),
        )
        record = new.record
        return EnrollmentTokenObject(
            id=record.id,
            token=new.token,
            scope=body.scope,
            tenant_id=record.tenant_scope,
            island=record.island,
            kind=record.kind,
            roles=list(record.roles),
            expires_at=record.expires_at,
        )


class PendingTokenObject(BaseModel):
    object: Literal["enrollment_token"] = "enrollment_token"
    id: str
    scope: str
    tenant_id: str | None
    island: str
    kind: str
    roles: list[str]
    created_by: str | None = Field(description="The username of the admin who made it")
    created_at: float
    expires_at: float


class PendingTokenList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PendingTokenObject]


@router.get("/api/admin/agents/tokens")
def list_tokens(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> PendingTokenList:
    """The enrollment tokens not spent yet and not expired: the tenant's (and the platform's, for a platform
    admin). The tokens themselves are never shown again; withdraw one with DELETE."""
    with p.db.system() as s:
        return PendingTokenList(
            data=[
                PendingTokenObject(
                    id=pending.record.id,
                    scope="platform" if pending.record.tenant_scope is None else "tenant",
                    tenant_id=pending.record.tenant_scope,
                    island=pending.record.island,
                    kind=pending.record.kind,
                    roles=list(pending.record.roles),
                    created_by=pending.created_by,
                    created_at=pending.record.created_at,
                    expires_at=pending.record.expires_at,
                )
                for pending in enrollment.list_tokens(s, who)
            ]
        )


@router.delete("/api/admin/agents/tokens/{token_id}", status_code=204)
def withdraw_token(token_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> Response:
    """Withdraw an unspent enrollment token: nothing can enroll with it from now on."""
    with p.db.system() as s:
        enrollment.withdraw_token(s, who, token_id)
    return Response(status_code=204)


@router.post("/api/admin/agents/{agent_id}/revoke")
def revoke_agent(agent_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> RevokedAgent:
    with p.db.system() as s:
        agent = enrollment.revoke(s, enrollment.visible_agent(s, who, agent_id), who)
        revoked = RevokedAgent(id=agent.id, revoked_at=agent.revoked_at)
    p.sync_agents()  # its connections close now, not at the next sync
    return revoked


@router.get(
    "/api/fabric/ca",
    response_class=Response,
    responses={200: {"content": {"application/x-pem-file": {"schema": {"type": "string"}}}, "description": "PEM"}},
)
def certificate_authority(p: Platform = Depends(platform)) -> Response:
    """The CA an enrolling machine checks against its token's pin before trusting anything else."""
    return Response(p.trust_pem(), media_type="application/x-pem-file")


@router.post("/api/fabric/enroll")
def enroll(body: EnrollRequest, request: Request, p: Platform = Depends(platform)) -> Enrolled:
    with p.db.system() as s:
        issued = enrollment.enroll(
            s,
            body.token,
            body.csr.encode(),
            kind=body.kind,
            ca=p.agent_ca,
            trust_pem=p.trust_pem(),
            lifetime=_lifetime(p),
            ip=request.client.host if request.client else None,
        )
        enrolled = _enrolled(p, issued)
    p.sync_agents()  # admitted by the broker before the answer leaves
    return enrolled


@router.post("/api/fabric/renew")
def renew(body: RenewRequest, p: Platform = Depends(platform)) -> Enrolled:
    with p.db.system() as s:
        return _enrolled(
            p, enrollment.renew(s, body.certificate.encode(), body.csr.encode(), ca=p.agent_ca, lifetime=_lifetime(p))
        )


class StoredArtifact(BaseModel):
    object: Literal["blob"] = "blob"
    sha256: str
    bytes: int


def _refusal(exc: TransferRefused) -> JSONResponse:
    return JSONResponse(error_body(exc.message, "permission_error", code="transfer_refused"), exc.status)


def _admit(p: Platform, request: Request, token: str, method: str, sha256: str) -> tuple[Grant, TransferSource]:
    return transfers.admit(
        p.db,
        p.transfers,
        p.control,
        p.agent_ca,
        token=token,
        method=method,
        sha256=sha256,
        certificate=request.headers.get(CERTIFICATE_HEADER),
        proof=request.headers.get(PROOF_HEADER),
    )


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as source:
        yield from iter(lambda: source.read(1024 * 1024), b"")


TOKEN = Query(max_length=4096, description="The presigned grant the control plane handed the agent")


@router.get(
    TRANSFER_PATH + "/{sha256}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The blob's bytes"}},
)
def download_artifact(sha256: str, request: Request, token: str = TOKEN, p: Platform = Depends(platform)) -> Response:
    """A blob an enrolled agent's leased work needs, streamed from the tenant's store (the agent checks its hash)."""
    try:
        _, source = _admit(p, request, token, "GET", sha256)
    except TransferRefused as exc:
        return _refusal(exc)
    if source.path is not None:  # a base model's file
        size, chunks = source.path.stat().st_size, _file_chunks(source.path)
    else:
        size, chunks = p.blobs.size(source.tenant_id, sha256), p.blobs.iter_bytes(source.tenant_id, sha256)
    headers = {"Content-Length": str(size), "Cache-Control": "no-store"}
    return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)


@router.put(TRANSFER_PATH + "/{sha256}", response_model=StoredArtifact)
async def upload_artifact(
    sha256: str, request: Request, token: str = TOKEN, p: Platform = Depends(platform)
) -> StoredArtifact | Response:
    """An artifact of an enrolled agent's leased job (a checkpoint's or the adapter's file), streamed into the
    job's tenant's store and kept only if it is the blob granted."""
    try:
        grant, source = await run_in_threadpool(_admit, p, request, token, "PUT", sha256)
        stored = await transfers.receive(p.blobs, source.tenant_id, grant, request.stream())
    except TransferRefused as exc:
        return _refusal(exc)
    return StoredArtifact(sha256=stored.sha256, bytes=stored.size)
